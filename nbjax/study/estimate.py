"""Time estimates for ``--dry-run``, and the population size that fits an accelerator.

Times: each unit of work (a cell alone, or a population) costs its compile time plus its
steps at a step time. Step times are either measured here (each distinct model variant,
i.e. token-merging setting, timed for a few real steps on the study's data; pruning adds
little per step, so the cells of one variant share a rate), or taken from the study
config's ``timing`` figures, measured on the target machine (their ``source`` says where).
A population of N members costs N member-steps per step: at the measured per-member step
time where ``timing`` gives one, else at the single run's step time. That single-run
estimate is right on a CPU, where a population is no faster than its members one after
another (docs/performance.md), and an upper bound on a GPU, where one small run is
launch-bound.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from nbjax.study.grid import RunSpec
from nbjax.train import order as order_lib

MAX_POPULATION = 64
MEMORY_SHARE = 0.5  # of the device's memory, for the members; the rest: XLA's own buffers
STATE_FACTOR = 2  # the state, plus its gradient and optimizer update of the same size
ACTIVATION_FACTOR = 2  # saved activations twice over: the backward pass's temporaries
UNKNOWN_DEVICE_BYTES = 16 * 2**30  # a device that reports no memory limit


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
    order = order_lib.BatchOrder(len(dataset.train_labels), config.train.batch_size, config.seed)
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


def _measured(units: Sequence[Sequence[RunSpec]]) -> tuple[list[float], str]:
    """Seconds of each unit at step times measured on this machine (one process)."""
    from nbjax.data import pipeline as data_lib

    busy = busy_note()  # before this process's own measuring adds to the load
    rates: dict[str, tuple[float, float]] = {}
    datasets: dict[str, Any] = {}
    out = []
    for unit in units:
        config = unit[0].config
        key = json.dumps(config.data.to_dict(), sort_keys=True)
        if key not in datasets:
            datasets[key] = data_lib.load_dataset(config.data)
        variant = _variant(config)
        if variant not in rates:
            rates[variant] = measure_rate(config, datasets[key])
        per_step, compile_s = rates[variant]
        steps = order_lib.total_steps(config, len(datasets[key].train_labels))
        out.append(compile_s + steps * len(unit) * per_step)
    note = "step times measured on this machine (one process)" + busy
    if any(len(unit) > 1 for unit in units):
        note += "; a population's per-member step time is not measured: single-run estimate"
    return out, note


def busy_note() -> str:
    """A warning when other processes are using the CPUs (1-minute load average at least half
    the cores): step times measured now run long."""
    if not hasattr(os, "getloadavg"):  # Windows has no load average
        return ""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.5 * cores:
        return ""
    return (f"; the CPUs were busy (load average {load:.1f} on {cores} cores), so these "
            "estimates run long")


def _from_figures(units: Sequence[Sequence[RunSpec]],
                  timing: ml_collections.ConfigDict) -> tuple[list[float], str]:
    """Seconds of each unit at the study config's ``timing`` figures (and the set-up once)."""
    out = []
    member_measured = True
    for unit in units:
        config = unit[0].config
        tome = config.mitigation.token_merging.mode != "off"
        step_s = timing.tome_step_s if tome else timing.step_s
        member_s = timing.member_tome_step_s if tome else timing.member_step_s
        if len(unit) > 1:
            member_measured &= member_s > 0
        per_step = member_s if len(unit) > 1 and member_s > 0 else step_s
        steps = order_lib.total_steps(config, timing.train_examples)
        out.append(timing.compile_s + steps * len(unit) * per_step)
    if out:
        out[0] += timing.setup_s
    note = f"step times: {timing.source}"
    if any(len(unit) > 1 for unit in units):
        note += ("; populations at the measured per-member step time" if member_measured else
                 "; a population's per-member step time is not measured: single-run estimate, "
                 "an upper bound on a GPU")
    return out, note


def unit_seconds(units: Sequence[Sequence[RunSpec]],
                 timing: ml_collections.ConfigDict | None = None) -> tuple[list[float], str]:
    """(seconds of each unit of work, what the estimate rests on): from ``timing`` figures
    when the study config gives them (``timing.source`` set), else measured here."""
    if timing is not None and timing.get("source"):
        return _from_figures(units, timing)
    return _measured(units)


def estimate_seconds(specs: Sequence[RunSpec]) -> dict[str, float]:
    """Seconds each cell should take alone on this machine (one process)."""
    seconds, _ = _measured([[spec] for spec in specs])
    return {spec.name: s for spec, s in zip(specs, seconds, strict=True)}


def member_bytes(config: ml_collections.ConfigDict, dataset: Any) -> int:
    """Device bytes one member needs: ``STATE_FACTOR`` × its train state (``jax.eval_shape``
    of a single run's step-0 state: params, masks, AdamW moments, pruning and burden state)
    plus the activations its backward pass keeps, per block and image ``tokens`` ×
    (4 × hidden: q, k, v, attention output; + mlp; + heads × tokens: attention weights)
    floats, × ``ACTIVATION_FACTOR``."""
    import jax

    from nbjax.burden import tracker as burden_tracker
    from nbjax.model import build as model_build
    from nbjax.pruning import make_pruner
    from nbjax.train import hparams as hparams_lib
    from nbjax.train import optimizer as optimizer_lib
    from nbjax.train import state as state_lib

    steps = order_lib.total_steps(config, len(dataset.train_labels))
    model = model_build.build_model(config, dataset.num_classes)
    pruner = make_pruner(config, steps)
    tx = optimizer_lib.make_optimizer(config, steps)
    tracker = burden_tracker.make_tracker(config, model, pruner, dataset.image_shape) \
        if config.burden.enabled else None
    state = jax.eval_shape(lambda: state_lib.init_state(
        model, tx, pruner, dataset.image_shape, config.seed, hparams_lib.from_config(config),
        burden_init=tracker.init if tracker is not None else None))
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    m = config.model
    tokens = model_build.num_input_tokens(config)
    floats = (config.train.batch_size * m.depth * tokens
              * (4 * m.hidden_dim + m.mlp_dim + m.num_heads * tokens))
    return STATE_FACTOR * state_bytes + ACTIVATION_FACTOR * 4 * floats


def population_size_for(bytes_per_member: int, free_bytes: int,
                        cap: int = MAX_POPULATION) -> int:
    """The largest power of two <= ``cap`` whose members fit ``free_bytes`` (at least 1)."""
    size = 1
    while size * 2 <= cap and size * 2 * bytes_per_member <= free_bytes:
        size *= 2
    return size


def auto_population_size(configs: Sequence[ml_collections.ConfigDict], dataset: Any) -> int:
    """``population_size`` 0: 1 on a CPU backend (a population is not faster there); on an
    accelerator the largest power of two <= 64 whose members fit in ``MEMORY_SHARE`` of the
    first device's memory, less the dataset kept on it, for the largest member of
    ``configs`` (:func:`member_bytes`, once per compiled program)."""
    import jax

    from nbjax.population import members

    if jax.default_backend() == "cpu":
        return 1
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = int(stats.get("bytes_limit", UNKNOWN_DEVICE_BYTES))
    data = sum(a.nbytes for a in (dataset.train_images, dataset.train_labels,
                                  dataset.test_images, dataset.test_labels))
    programs = {members.program_key(c): c for c in configs}
    largest = max(member_bytes(c, dataset) for c in programs.values())
    return population_size_for(largest, int(limit * MEMORY_SHARE) - data)
