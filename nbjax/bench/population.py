"""Population rows of the benchmark: N members of one variant trained as one vmapped program
(:func:`nbjax.population.build.build`), timed beside the single run of the same variant.

Sizes run one after another, smallest first. Each population is built, compiled, timed in
turn with the single run (:func:`nbjax.bench.timing.time_interleaved`) and freed before the
next, so the single run is measured beside every size and the device's peak memory read
after a size's timing is that size's (the peak is the process's, and grows with N). A row
sets the population step, in which every member takes one step, against N single steps run
one after another. docs/performance.md ("Populations") describes every figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nbjax import config as config_lib
from nbjax.bench import measure, train_variant
from nbjax.bench import report as bench_report
from nbjax.bench.timing import Timed, time_interleaved
from nbjax.bench.variants import Variant, variant_config
from nbjax.model import build as model_build
from nbjax.parallel import mesh as sharding_lib
from nbjax.population import build as population_build
from nbjax.train import order as order_lib


def member_configs(base: Any, variant: Variant, size: int) -> list[ml_collections.ConfigDict]:
    """``size`` configs of ``variant`` of ``base`` that differ only in the seed (seed, seed+1,
    ...): the members of one population, each also a valid single run."""
    config = variant_config(base, variant)
    members = []
    for i in range(size):
        member = ml_collections.ConfigDict(config.to_dict())
        member.seed = int(config.seed) + i
        members.append(config_lib.lock(member))
    return members


def prepare(variant: Variant, base: Any, dataset: Any, size: int, devices: Sequence[Any],
            warmup: int, cache: measure.CacheHits, model_flops: measure.ModelFlops) -> Timed:
    """Builds and compiles a population of ``size`` members of ``variant`` on ``devices``.

    Its ``batch`` is the aggregate one (members x the per-member batch) and its model FLOPs
    are ``size`` times a member's, so the Timed's img/s and MFU are the population's.
    """
    configs = member_configs(base, variant, size)
    mesh = sharding_lib.population_mesh(size, list(devices))
    pop = population_build.build(configs, dataset, mesh)
    k, batch = int(configs[0].train.steps_per_call), int(configs[0].train.batch_size)
    orders = [order_lib.BatchOrder(len(dataset.train_labels), batch, c.seed) for c in configs]
    sharding = NamedSharding(mesh, P(None, sharding_lib.MEMBER_AXIS, sharding_lib.DATA_AXIS))
    blocks = [sharding_lib.put_batch(np.stack([o.block(i * k, k) for o in orders], axis=1),
                                     sharding)
              for i in range(train_variant.NUM_INDEX_BLOCKS)]
    compiled, compile_info = measure.compile_timed(
        pop.train_call, (pop.state, pop.train_images, pop.train_labels, blocks[0]), cache)
    model = model_build.build_model(configs[0], dataset.num_classes)
    member_flops = model_flops.per_step(model, dataset.image_shape, batch)
    info = train_variant.call_info(row_name(variant.name, size), compiled, compile_info, mesh,
                                   size * member_flops if member_flops else None)
    info.update(members=size, member_batch=batch, mesh_shape=dict(mesh.shape))
    state = train_variant.start_state(pop.state, pop.pruner, warmup, k, mesh)
    caller = train_variant.TrainCaller(compiled, state, pop.train_images, pop.train_labels,
                                       blocks)
    return Timed(info["name"], caller, k, size * batch, info,
                 peak_flops=measure.peak_flops(mesh.devices.flat[0].device_kind,
                                               configs[0].model.dtype),
                 update_every=train_variant.update_interval(pop.pruner))


def row_name(variant: str, size: int) -> str:
    """``'gmp+burden x8'``: the population of 8 members of ``gmp+burden``."""
    return f"{variant} x{size}"


def run_sizes(single: Timed, variant: Variant, base: Any, dataset: Any, sizes: Sequence[int],
              devices: Sequence[Any], warmup: int, num_calls: int, cache: measure.CacheHits,
              model_flops: measure.ModelFlops, print_fn: Callable[[str], Any]
              ) -> tuple[dict[str, Any], list[float]]:
    """Times a population of each size beside ``single`` (the single run of ``variant``);
    returns the JSON-able figures (the variant, the sizes and a row per size) and the
    1-minute load averages seen while timing.

    ``single`` is timed afresh beside each size; its own record is left as it is.
    """
    rows, loads = {}, []
    for size in sorted(set(sizes)):
        timed = prepare(variant, base, dataset, size, devices, warmup, cache, model_flops)
        print_fn(bench_report.compile_line(timed.info))
        beside = dataclasses.replace(single, times=[], updated=[])
        loads += time_interleaved([beside, timed], warmup, num_calls)
        peak = measure.device_peak_memory(devices)
        rows[str(size)] = population_row(timed.summary(), beside.summary(), peak)
        del timed  # frees the population's state and program before the next size
    return {"variant": variant.name, "sizes": sorted(set(sizes)), "rows": rows}, loads


def population_row(pop: dict[str, Any], single: dict[str, Any], peak: int | None
                   ) -> dict[str, Any]:
    """One size's figures: ``pop`` (a Timed summary of the population, img/s aggregate) set
    against ``single`` (the single run's summary over the same stretch of time)."""
    n = pop["members"]
    sequence_step = n * single["step_s"]  # the N members run one after another
    row = dict(pop)
    if row["memory"] is not None:
        row["memory"] = {**row["memory"], "device_peak_bytes": peak}
    row.update(per_member_step_s=pop["step_s"] / n, single_step_s=single["step_s"],
               single_img_s=single["img_s"], sequence_step_s=sequence_step,
               population_vs_sequence=pop["step_s"] / sequence_step,
               img_s_vs_single=pop["img_s"] / single["img_s"])
    return row
