"""A tiny study for tests and CI: two methods, two sparsities, with and without token
merging, on synthetic data, in about a minute on a laptop CPU."""

from pathlib import Path

import ml_collections

from nbjax.config import load_config_file
from nbjax.study.runner import grid_config


def get_config():
    study = ml_collections.ConfigDict()
    study.base = load_config_file(Path(__file__).with_name("smoke.py"))
    study.base.train.num_steps = 24
    study.base.train.checkpoint_every = 8
    study.grid = grid_config(methods=("gmp", "static"), sparsities=(0.5, 0.9),
                             mitigations=("none", "tome"))
    return study
