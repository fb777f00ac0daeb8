"""The benchmark run: compile time, step time, img/s, FLOPs and memory of nbjax's train step.

:func:`run_bench` builds the variants of one config (:mod:`nbjax.bench.variants`), compiles
each, times them interleaved (:mod:`nbjax.bench.timing`) and returns one JSON-able dict,
which :mod:`nbjax.bench.report` prints. docs/performance.md describes the variants and every
figure, and records the measurements.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from nbjax.bench import measure, plain_step, torch_ref, train_variant
from nbjax.bench import population as bench_population
from nbjax.bench import report as bench_report
from nbjax.bench.timing import Timed, time_interleaved
from nbjax.bench.variants import DEFAULT_VARIANTS, Variant
from nbjax.data import pipeline as data_lib
from nbjax.parallel import collectives
from nbjax.parallel import mesh as sharding_lib


def bench_dataset(config: Any, real_data: bool = False) -> Any:
    """The config's dataset (``real_data``) or synthetic data of its image shape: throughput
    does not depend on the pixels, and nothing is loaded from disk."""
    if real_data:
        return data_lib.load_dataset(config.data)
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    synthetic = cfg.source == "synthetic"
    if synthetic:
        channels = int(cfg.synthetic_channels)
    else:
        channels = 1 if cfg.source in ("mnist", "idx") else 3
    cfg.synthetic_num_classes = int(cfg.synthetic_num_classes) if synthetic else 10
    cfg.source = "synthetic"
    cfg.synthetic_image_size = int(config.model.image_size)
    cfg.synthetic_channels = channels
    cfg.synthetic_num_train = max(8 * int(config.train.batch_size), 4096)
    cfg.synthetic_num_test = int(config.train.eval_batch_size)
    cfg.train_limit = cfg.test_limit = 0
    return data_lib.load_dataset(cfg)


def run_bench(config: Any, variants: Sequence[str] = DEFAULT_VARIANTS, steps: int = 200,
              warmup: int = 2, torch: bool = False, real_data: bool = False,
              devices: int = 0, torch_threads: int = 0, print_fn: Callable[[str], Any] = print,
              config_path: str | None = None, overrides: Sequence[str] = (),
              population: Sequence[int] = (), population_variant: str = "gmp+burden"
              ) -> dict[str, Any]:
    """Builds, compiles and times ``variants`` of ``config``; prints the table and returns
    the JSON-able results.

    ``steps``: timed steps per variant (rounded up to whole calls); ``warmup``: untimed calls
    after compiling; ``devices``: use the first N devices (0 = all); ``torch``: also time
    the PyTorch reference when torch is importable. ``population``: sizes N of populations
    of ``population_variant``, each timed beside that variant's single run
    (:mod:`nbjax.bench.population`).
    """
    parsed, member = _parse_variants(variants, population, population_variant)
    load_start = os.getloadavg()
    dataset = bench_dataset(config, real_data)
    chosen = jax.devices()[:devices] if devices > 0 else jax.devices()
    mesh = sharding_lib.make_mesh(chosen)
    cache, model_flops = measure.CacheHits(), measure.ModelFlops()
    timed = _prepare(parsed, config, dataset, mesh, warmup, print_fn, cache, model_flops)
    torch_result = _add_torch(timed, config, dataset, torch_threads, print_fn) if torch else None
    k = int(config.train.steps_per_call)
    num_calls = max(1, -(-steps // k))
    loads = time_interleaved(timed, warmup, num_calls)
    results = {item.name: item.summary() for item in timed}
    torch_result = results.pop(torch_ref.NAME, torch_result)
    peak = measure.device_peak_memory(chosen)
    for r in results.values():
        if r["memory"] is not None:
            r["memory"]["device_peak_bytes"] = peak
    population_out = None
    if population:  # after the variants' figures, which it leaves as they are
        single = next(item for item in timed if item.name == member.name)
        population_out, population_loads = bench_population.run_sizes(
            single, member, config, dataset, population, chosen, warmup, num_calls, cache,
            model_flops, print_fn)
        loads += population_loads
    out = {"config": config_path, "overrides": list(overrides), **_machine(config, mesh),
           "batch_size": int(config.train.batch_size), "steps_per_call": k,
           "steps": num_calls * k,
           "load_average": {"start": list(load_start), "end": list(os.getloadavg()),
                            "max_1min_while_timing": max(loads)},
           "compilation_cache": jax.config.jax_compilation_cache_dir or None,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "model_dtype": config.model.dtype,
           "variants": results, "ratios": bench_report.ratios(results, torch_result),
           "torch": torch_result, "population": population_out}
    print_fn(bench_report.format_table(out))
    return out


def _add_torch(timed: list[Timed], config: Any, dataset: Any, torch_threads: int,
               print_fn: Callable[[str], Any]) -> dict[str, Any] | None:
    """Appends the PyTorch reference to ``timed`` if torch is importable, else returns the
    error that stands for its result."""
    if torch_ref.available():
        timed.append(torch_ref.prepare(config, dataset, torch_threads))
        return None
    print_fn("--torch: torch is not importable; skipped (pip install torch)")
    return {"error": "torch is not importable (pip install torch)"}


def _parse_variants(variants: Sequence[str], population: Sequence[int],
                    population_variant: str) -> tuple[list[Variant], Variant]:
    """The variants to time, with the population's member variant among them when
    ``population`` names sizes, and that member variant."""
    parsed = [Variant.parse(v) for v in variants]
    if len({v.name for v in parsed}) != len(parsed):
        raise ValueError(f"duplicate variants in {list(variants)}")
    member = Variant.parse(population_variant)
    if population:
        if member.plain or min(population) < 1:
            raise ValueError(f"a population needs sizes >= 1 of an nbjax variant, not "
                             f"{list(population)} of {member.name!r}")
        if member.name not in {v.name for v in parsed}:
            parsed.append(member)
    return parsed, member


def _prepare(variants: Sequence[Variant], config: Any, dataset: Any, mesh: Any, warmup: int,
             print_fn: Callable[[str], Any], cache: measure.CacheHits,
             model_flops: measure.ModelFlops) -> list[Timed]:
    """Builds and compiles every variant, printing each one's compile time."""
    timed = []
    for v in variants:
        if v.plain:
            item = plain_step.prepare(v, config, dataset, mesh.devices.flat[0], cache,
                                      model_flops)
        else:
            item = train_variant.prepare(v, config, dataset, mesh, warmup, cache, model_flops)
        print_fn(bench_report.compile_line(item.info))
        timed.append(item)
    return timed


def _machine(config: Any, mesh: Any) -> dict[str, Any]:
    """The platform, device kind and count, and which gradient all-reduce the step uses."""
    device = mesh.devices.flat[0]
    num_devices = int(mesh.devices.size)
    grad_reduce = collectives.grad_reduce_mode(config, mesh) if num_devices > 1 else None
    return {"platform": device.platform, "device_kind": device.device_kind,
            "num_devices": num_devices,
            "grad_reduce": grad_reduce}
