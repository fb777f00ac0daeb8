"""Shared by the tests: the smoke config and its synthetic dataset, built once per process."""

import functools
import pathlib

from nbjax import data
from nbjax.config import load_config_file, lock


def smoke_config(**overrides):
    """configs/smoke.py with dotted-key overrides, e.g. ``**{"pruning.method": "gmp"}``."""
    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "smoke.py"
    config = load_config_file(path)
    config.train.progress = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return lock(config)


@functools.lru_cache(maxsize=4)
def smoke_dataset(num_train: int = 512, num_test: int = 200):
    cfg = smoke_config().data
    with cfg.unlocked():
        cfg.synthetic_num_train, cfg.synthetic_num_test = num_train, num_test
    return data.load_dataset(cfg)
