"""Default experiment: a dense depth-4 ViT on real MNIST (embedded, offline).

Patch 7 (16 patches + class token), width 64, 4 heads, MLP 256, 12 epochs of AdamW with
random 2-pixel shifts. Change the pruning method with ``--config.pruning.method=gmp`` and
friends (docs/pruning.md).
"""

from nbjax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "mnist"
    config.data.augment = "crop"  # random shifts; digits must not be mirrored
    config.data.augment_pad = 2
    config.train.num_epochs = 12.0
    return config
