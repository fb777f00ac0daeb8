"""Default experiment: a dense depth-4 ViT on real MNIST (embedded, offline).

Patch 7 (16 patches + class token), width 64, 4 heads, MLP 256. Change the pruning method
with ``--config.pruning.method=gmp`` and friends.
"""

from nbjax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "mnist"
    config.train.num_epochs = 10.0
    return config
