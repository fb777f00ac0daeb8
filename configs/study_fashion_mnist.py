"""The study grid on Fashion-MNIST (IDX files): methods × sparsities × mitigations × seeds.

gmp, static, rigl, set, pdwp (in that order) × sparsity 0.5 / 0.9 / 0.98 × mitigation none /
tome / both (where the method has it: static and pdwp have no separate "both"), dense and
dense + tome, seeds 0, 1, 2; 123 cells. Records go to ``docs/results/fashion_mnist/cells``:
``python -m nbjax.study --config configs/study_fashion_mnist.py --workdir studies/fmnist``
(docs/study.md).
Narrow it with e.g. ``--config.grid.methods="('gmp',)"``; change every run with
``--config.base.<key>=<value>``.
"""

from pathlib import Path

from nbjax.config import load_config_file
from nbjax.study.grid import grid_config, study_config


def get_config():
    base = load_config_file(Path(__file__).with_name("fashion_mnist_vit4.py"))
    grid = grid_config(methods=("gmp", "static", "rigl", "set", "pdwp"),
                       sparsities=(0.5, 0.9, 0.98), mitigations=("none", "tome", "both"),
                       seeds=(0, 1, 2))
    return study_config(name="fashion_mnist", base=base, grid=grid)
