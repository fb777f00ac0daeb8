"""An nbjax variant, ready to time: the real train call of :func:`nbjax.train.loop.build`.

It is the jitted ``lax.scan`` over ``train.steps_per_call`` steps with the donation,
shardings and mesh of a training run, so what is timed is what a study runs. The state
starts a few calls before the method's first mask update, so that the timed calls hold one.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from nbjax.bench import measure
from nbjax.bench.timing import Timed
from nbjax.bench.variants import Variant, unmasked_pruner, variant_config
from nbjax.model import build as model_build
from nbjax.parallel import mesh as sharding_lib
from nbjax.tome import cost
from nbjax.train import loop
from nbjax.train import order as order_lib

NUM_INDEX_BLOCKS = 4  # distinct batch-index blocks the calls rotate through


def prepare(variant: Variant, base: Any, dataset: Any, mesh: Any, warmup: int,
            cache: measure.CacheHits, model_flops: measure.ModelFlops) -> Timed:
    """Builds and compiles ``variant`` of ``base`` on ``mesh``; ``warmup`` is the number of
    untimed calls that will precede the timed ones."""
    config = variant_config(base, variant)
    run = loop.build(config, dataset, mesh, pruner=None if variant.masked else unmasked_pruner())
    k, batch = int(config.train.steps_per_call), int(config.train.batch_size)
    order = order_lib.BatchOrder(len(dataset.train_labels), batch, config.seed)
    blocks = [loop.train_indices(run, order, i * k, k) for i in range(NUM_INDEX_BLOCKS)]
    compiled, compile_info = measure.compile_timed(
        run.train_call, (run.state, run.train_images, run.train_labels, blocks[0]), cache)
    model = model_build.build_model(config, dataset.num_classes)
    info = call_info(variant.name, compiled, compile_info, mesh,
                     model_flops.per_step(model, dataset.image_shape, batch))
    state = start_state(run.state, run.pruner, warmup, k, mesh)
    caller = TrainCaller(compiled, state, run.train_images, run.train_labels, blocks)
    return Timed(variant.name, caller, k, batch, info,
                 peak_flops=measure.peak_flops(mesh.devices.flat[0].device_kind,
                                               config.model.dtype),
                 update_every=update_interval(run.pruner))


def call_info(name: str, compiled: Any, compile_info: dict[str, Any], mesh: Any,
              model_flops_per_step: float | None) -> dict[str, Any]:
    """What is known of a compiled train call before timing it: compile time, FLOPs per
    step (XLA's count and the model's) and the program's memory."""
    n = mesh.devices.size
    # XLA counts one device's program and the scan's body once: per step, times the devices.
    flops = cost.cost_analysis(compiled).get("flops")
    return {"name": name, **compile_info,
            "flops_per_step": flops * n / measure.scan_flops_factor() if flops else None,
            "model_flops_per_step": model_flops_per_step,
            "memory": measure.memory_bytes(compiled), "num_devices": n}


def start_state(state: Any, pruner: Any, warmup: int, steps_per_call: int, mesh: Any) -> Any:
    """``state`` moved to the step from which the warm-up calls and two timed plain calls
    come just before the method's first mask update (step 0 without updates)."""
    first = pruner.first_update
    start = 0 if first is None else max(0, first - (warmup + 2) * steps_per_call)
    return state.replace(
        step=jax.device_put(np.asarray(start, np.int32), sharding_lib.replicated(mesh)))


def update_interval(pruner: Any) -> int | None:
    """The mask-update interval ΔT of a method that updates masks, else None."""
    return pruner.update_every if pruner.first_update is not None else None


class TrainCaller:
    """Calls the compiled train call on the index blocks in turn, carrying the state; each
    call returns its seconds and whether it updated the masks."""

    def __init__(self, compiled: Any, state: Any, images: jax.Array, labels: jax.Array,
                 blocks: list[jax.Array]) -> None:
        self.compiled, self.state = compiled, state
        self.images, self.labels, self.blocks = images, labels, blocks
        self.num_calls = 0

    def __call__(self) -> tuple[float, bool]:
        idx = self.blocks[self.num_calls % len(self.blocks)]
        self.num_calls += 1
        start = time.perf_counter()
        state, metrics = self.compiled(self.state, self.images, self.labels, idx)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        self.state = state
        flag = metrics.get("pruning/mask_updated")
        return elapsed, bool(flag is not None and np.any(np.asarray(flag) > 0))
