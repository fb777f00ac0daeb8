"""Token-merging sensitivity and equal compute on real MNIST, at gmp 0.9 and 0.98.

Per sparsity and seed (0, 1, 2): gmp without mitigation; single-pass merging keeping 0.5
(the main grid's tome), 0.75 and 0.9 of the tokens; every-layer merging of 2 tokens per
block; and the keep-0.5 cell trained for more epochs so that its training FLOPs equal the
unmerged cell's (``tome-keep0.5-eqflops``). 36 cells, recorded in the MNIST study's store
(``docs/results/mnist/cells``), so the 12 cells both grids hold (gmp none and tome) run once
and one report compares every arm:
``python -m nbjax.study --config configs/study_mnist_mitigation.py --workdir DIR``.
"""

from pathlib import Path

from nbjax.config import load_config_file
from nbjax.study.grid import grid_config, study_config


def get_config():
    base = load_config_file(Path(__file__).with_name("mnist_vit4.py"))
    grid = grid_config(methods=("gmp",), sparsities=(0.9, 0.98), mitigations=("none", "tome"),
                       seeds=(0, 1, 2), dense=False,
                       tome_variants=("keep0.9", "keep0.75", "keep0.5", "every_r2"),
                       equal_compute=("keep0.5",), variant_sparsities=(0.9, 0.98))
    return study_config(name="mnist_mitigation", base=base, grid=grid,
                        records_dir="docs/results/mnist/cells")
