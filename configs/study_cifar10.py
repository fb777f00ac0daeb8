"""The paper's grid on CIFAR-10.

Methods × sparsities × mitigations × seeds, plus dense runs:
``python -m nbjax.study --config configs/study_cifar10.py --workdir studies/cifar10``;
records in ``docs/results/cifar10/cells``.
Narrow it with e.g. ``--config.grid.methods="('gmp','pdwp')" --config.grid.seeds="(0,1)"``,
and change every run with ``--config.base.<key>=<value>``.
"""

from pathlib import Path

from nbjax.config import load_config_file
from nbjax.study.grid import grid_config, study_config


def get_config():
    base = load_config_file(Path(__file__).with_name("cifar10_vit4.py"))
    return study_config(name="cifar10", base=base, grid=grid_config())
