"""Token-merging sensitivity and equal compute on Fashion-MNIST, at gmp 0.9 and 0.98.

The grid of ``configs/study_mnist_mitigation.py`` (36 cells) on the Fashion-MNIST config,
recorded in the Fashion-MNIST study's store (``docs/results/fashion_mnist/cells``):
``python -m nbjax.study --config configs/study_fashion_mnist_mitigation.py --workdir DIR``.
"""

from pathlib import Path

from nbjax.config import load_config_file
from nbjax.study.grid import study_config


def get_config():
    here = Path(__file__)
    mnist = load_config_file(here.with_name("study_mnist_mitigation.py"))
    base = load_config_file(here.with_name("fashion_mnist_vit4.py"))
    return study_config(name="fashion_mnist_mitigation", base=base, grid=mnist.grid,
                        records_dir="docs/results/fashion_mnist/cells")
