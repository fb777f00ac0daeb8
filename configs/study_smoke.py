"""A tiny study for tests and CI: dense, gmp and static at two sparsities, with and without
token merging, one seed, on synthetic data; about a minute on a laptop CPU."""

from pathlib import Path

from nbjax.config import load_config_file
from nbjax.study.grid import grid_config, study_config


def get_config():
    base = load_config_file(Path(__file__).with_name("smoke.py"))
    base.train.num_steps = 24
    base.train.checkpoint_every = 8
    grid = grid_config(methods=("gmp", "static"), sparsities=(0.5, 0.9),
                       mitigations=("none", "tome"))
    return study_config(name="smoke", base=base, grid=grid)
