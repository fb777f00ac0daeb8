"""Time estimates for ``--dry-run``: each cell's steps at a measured rate, plus compile time.

Each distinct model variant (token-merging setting) is timed for a few real steps on the
study's data; pruning adds little per step (masks are multiplied in, updates are amortised),
so the cells of one variant share a rate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from nbjax.study.grid import RunSpec


def _variant(config: ml_collections.ConfigDict) -> str:
    tm = config.mitigation.token_merging
    return f"{tm.mode}/{tm.keep_ratio}/{tm.r}"


def measure_rate(config: ml_collections.ConfigDict, dataset: Any,
                 calibration_steps: int = 20) -> tuple[float, float]:
    """(seconds per step, seconds to build and compile) of ``config`` on ``dataset``."""
    import jax

    from nbjax.train import loop

    t0 = time.perf_counter()
    run = loop.build(config, dataset)
    order = loop.BatchOrder(len(dataset.train_labels), config.train.batch_size, config.seed)
    k = config.train.steps_per_call
    state, m = run.train_call(run.state, run.train_images, run.train_labels,
                               loop.train_indices(run, order, 0, k))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    calls = max(1, calibration_steps // k)
    for c in range(1, calls + 1):
        state, m = run.train_call(state, run.train_images, run.train_labels,
                                   loop.train_indices(run, order, c * k, k))
    jax.block_until_ready(m)
    return (time.perf_counter() - t1) / (calls * k), compile_s


def estimate_seconds(specs: Sequence[RunSpec]) -> dict[str, float]:
    """Seconds each cell should take on this machine (one process)."""
    from nbjax.data import pipeline as data_lib
    from nbjax.train import loop

    rates: dict[str, tuple[float, float]] = {}
    datasets: dict[str, Any] = {}
    out = {}
    for spec in specs:
        config = spec.config
        key = json.dumps(config.data.to_dict(), sort_keys=True)
        if key not in datasets:
            datasets[key] = data_lib.load_dataset(config.data)
        dataset = datasets[key]
        variant = _variant(config)
        if variant not in rates:
            rates[variant] = measure_rate(config, dataset)
        per_step, compile_s = rates[variant]
        out[spec.name] = compile_s + loop.total_steps(config, len(dataset.train_labels)) \
            * per_step
    return out
