"""Shared by the tests: the smoke config and its synthetic dataset, built once per process."""

import functools
import pathlib

from nbjax.config import load_config_file, lock
from nbjax.data import pipeline as data


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


def one_device_mesh():
    """A mesh over the first device only: the single-device reference of the tests."""
    import jax

    from nbjax.parallel.mesh import make_mesh

    return make_mesh(jax.devices()[:1])


def run_steps(config, num_calls, state=None):
    """``num_calls`` compiled train calls on the smoke data, from ``state`` (default: fresh).

    Returns the built run, the final state and the host metrics of every call.
    """
    import jax

    from nbjax.train import loop

    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    state = run.state if state is None else state
    order = loop.BatchOrder(len(run.dataset.train_labels), config.train.batch_size, config.seed)
    k = config.train.steps_per_call
    history = []
    for c in range(num_calls):
        idx = jax.device_put(order.block(c * k, k))
        state, metrics = run.train_chunk(state, run.train_images, run.train_labels, idx)
        history.append(jax.device_get(metrics))
    return run, state, history
