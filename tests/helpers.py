"""Shared by the tests: the smoke config and its synthetic dataset, built once per process."""

import functools

from nbjax import data
from nbjax.config import lock


def smoke_config(**overrides):
    """configs/smoke.py with dotted-key overrides, e.g. ``**{"pruning.method": "gmp"}``."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "smoke.py"
    spec = importlib.util.spec_from_file_location("smoke_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
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
