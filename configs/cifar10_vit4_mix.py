"""A 100-epoch CIFAR-10 recipe for the paper's depth-4 ViT, with mixup and CutMix.

The candidate for dense >= 80 % on CIFAR-10 within 100 epochs, so that the CIFAR-10 study
prunes a model that has learned the task. Against ``cifar10_vit4.py``: width 256 (8 heads,
MLP 512), random crops with reflected padding and flips, then mixup or CutMix per batch (α
0.8, ``data.mix_alpha``, a per-member value, so one population sweeps it), 5 warm-up epochs,
100 epochs. ``scripts/device_tune.sh`` trains it on a GPU as one population over α; what it
reached is in docs/results/README.md. Meant for an accelerator: a train step is about 110
GFLOP (3 × 0.29 GFLOP forward per image × 128), 3.8 × the ``cifar10_vit4.py`` step.
"""

from pathlib import Path

from nbjax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("cifar10_vit4.py"))
    config.model.hidden_dim = 256
    config.model.num_heads = 8
    config.model.mlp_dim = 512
    config.data.augment_pad_mode = "reflect"
    config.data.mix = "mixup_cutmix"
    config.data.mix_alpha = 0.8
    config.train.num_epochs = 100.0
    config.train.warmup_steps = 1950  # 5 epochs of 390 steps
    config.train.eval_every = 3900  # every 10 epochs
    return config
