"""The paper's grid on real MNIST.

Methods × sparsities × mitigations × seeds, plus dense runs:
``python -m nbjax.study --config configs/study_mnist.py --workdir studies/mnist``.
Narrow it with e.g. ``--config.grid.methods="('gmp','pdwp')" --config.grid.seeds="(0,1)"``,
and change every run with ``--config.base.<key>=<value>``.
"""

from pathlib import Path

import ml_collections

from nbjax.config import load_config_file
from nbjax.study.runner import grid_config


def get_config():
    study = ml_collections.ConfigDict()
    study.base = load_config_file(Path(__file__).with_name("mnist_vit4.py"))
    study.grid = grid_config()
    return study
