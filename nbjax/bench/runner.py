"""The benchmark: compile time, step time, img/s, FLOPs and memory of nbjax's train step.

    python -m nbjax.bench --config configs/mnist_vit4.py [--config.key=value ...] \\
        [--variants plain_jax,dense,gmp,rigl,gmp+burden,rigl+burden,gmp+burden+tome] \\
        [--steps 200] [--json bench.json] [--torch]

For one config it builds several *variants* of the run, compiles each one's real multi-step
call (``loop.build``'s jitted ``lax.scan`` over ``train.steps_per_call`` steps, with its
donation and shardings, on the same mesh a training run uses), and times them side by side,
interleaved call by call (A B C ... C B A ...), so a shared, noisy machine slows them alike.

Variants (``--variants``, comma-separated):

* ``plain_jax``: the reference: a minimal dense ``jax.jit`` step of the same model, no masks,
  no metrics, plain ``optax.adamw``, one device, one fixed batch, one step per call.
* ``dense``: nbjax unmasked: method ``none`` with *no* masks at all (:func:`unmasked_pruner`),
  burden off: the full step machinery (on-device gather, augmentation, schedule, clipping,
  metrics, sharding) without masks.
* ``<method>``: nbjax masked by ``gmp``, ``set``, ``rigl``, ``static``, ``pdwp`` or ``none``
  (all-ones masks) at ``pruning.sparsity``, burden off.
* ``...+burden``: with the burden metrics on (every-step metrics plus the ``pruned_signal``
  probe under ``lax.cond``): nbjax's full step, what a study runs.
* ``...+tome``: with token merging (the config's mode, or ``single_pass`` at keep ratio 0.5).
* ``...+bf16``: with ``model.dtype='bfloat16'`` (compute in bf16, params and moments fp32).

For every variant it prints and writes to ``--json``:

* ``compile_s``: trace, lower and compile of the step (``lower_s`` + XLA ``compile_s``);
  ``cache_hit``: whether the persistent compilation cache served it (so a second run of
  the same command compiles in a fraction of the first's time, see docs/performance.md);
* ``step_s``: median over the timed calls without a mask update of call time / steps per
  call (after ``--warmup`` calls), and ``img_s`` = batch / ``step_s``;
* ``flops_per_step``: XLA's cost analysis of the compiled call (summed over devices; it
  counts both branches of every ``lax.cond``, so the rare mask update and burden probe are
  in it) and ``model_flops_per_step`` = 3 x the compiled dense forward's FLOPs x batch (the
  FLOPs the model needs); ``flops_per_s`` and, where the device's peak is known
  (:data:`PEAK_FLOPS`: H100, H200, A100, TPU v4, v5e, v5p, v6e; none for CPU), ``mfu``;
* ``memory``: the compiled call's argument/output/temporary bytes (every backend) and the
  device's ``peak_bytes_in_use`` where ``device.memory_stats()`` reports it (GPU, TPU);
* for masked methods, the mask-update amortisation: ``update_call_s`` (median call time of
  the calls that contain a mask update) and the average step time over a ΔT window,
  ``window_step_s = step_s + (update_call_s - plain_call_s) / ΔT``, with
  ``window_ratio = window_step_s / step_s`` (target ≤ 1.15). The timed range starts just
  before the method's first mask update so that the update calls are in it.

``--torch``: also times the PyTorch eager masked ViT step of the same shape
(:mod:`nbjax.bench.torch_ref`), interleaved with the others, when ``torch`` is importable
(``--torch_threads N``: its intra-op threads; default one per core).

On a CPU host nbjax runs one XLA device per core by default (:func:`nbjax.parallel.mesh
.use_all_cpu_cores`); ``--devices N`` uses only the first N of them (N=1: the one-device
ablation), ``XLA_FLAGS=--xla_force_host_platform_device_count=1`` the real one-device host.
The data is synthetic of the config's image shape (throughput does not depend on the
pixels); ``--real_data`` loads the config's dataset instead.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from nbjax import config as config_lib
from nbjax.bench import report as bench_report
from nbjax.bench.variants import (
    DEFAULT_VARIANTS,
    Variant,
    unmasked_pruner,
    variant_config,
)
from nbjax.data import pipeline as data_lib
from nbjax.model import vit as model_lib
from nbjax.parallel import mesh as sharding_lib
from nbjax.parallel import runtime
from nbjax.tome import cost as flops_lib
from nbjax.train import loop
from nbjax.train import step as train

# Dense peak FLOP/s by compute dtype, matched in order against ``device.device_kind``.
# fp32 matmuls on A100/H100 run as TF32 (XLA's default precision), on TPU as bf16 passes.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v6e", {"bfloat16": 918e12, "float32": 918e12}),
)
JSON_KEYS = ("config", "overrides", "platform", "device_kind", "num_devices", "grad_reduce",
             "batch_size",
             "steps_per_call", "steps", "load_average", "compilation_cache", "variants",
             "ratios", "torch")
VARIANT_KEYS = ("name", "compile_s", "lower_s", "xla_compile_s", "cache_hit", "step_s",
                "img_s", "mean_step_s", "flops_per_step", "model_flops_per_step",
                "flops_per_s", "model_flops_per_s", "mfu", "memory", "num_devices",
                "num_calls", "update")


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` (:data:`PEAK_FLOPS`), or None."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def _image_channels(config: Any) -> int:
    source = config.data.source
    if source == "synthetic":
        return int(config.data.synthetic_channels)
    return 1 if source in ("mnist", "idx") else 3


def bench_dataset(config: Any, real_data: bool = False) -> Any:
    """The config's dataset (``real_data``) or synthetic data of its image shape."""
    if real_data:
        return data_lib.load_dataset(config.data)
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    num_classes = (int(cfg.synthetic_num_classes) if cfg.source == "synthetic" else 10)
    cfg.source = "synthetic"
    cfg.synthetic_image_size = int(config.model.image_size)
    cfg.synthetic_channels = _image_channels(config)
    cfg.synthetic_num_classes = num_classes
    cfg.synthetic_num_train = max(8 * int(config.train.batch_size), 4096)
    cfg.synthetic_num_test = int(config.train.eval_batch_size)
    cfg.train_limit = cfg.test_limit = 0
    return data_lib.load_dataset(cfg)


def scan_flops_factor() -> int:
    """How many times XLA's cost analysis counts the body of a 2-step ``lax.scan`` (1 or 2).

    XLA counts a while loop's body once; checked at run time on a tiny program so that the
    per-step FLOPs stay right if that ever changes.
    """
    def f(c, xs):
        return jax.lax.scan(lambda c, x: (c @ x, None), c, xs)[0]

    c = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    xs = jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)
    flops = _cost(jax.jit(f).lower(c, xs).compile()).get("flops", 0.0)
    return 2 if flops > 1.5 * 2 * 8**3 else 1


def _cost(compiled: Any) -> dict[str, float]:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return {}
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def _memory(compiled: Any) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes)}


def device_peak_memory(devices: Sequence[Any]) -> int | None:
    """The largest ``peak_bytes_in_use`` over ``devices``; None where the backend has none."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


class _CacheHits:
    """Counts the persistent compilation cache's hits and misses (JAX monitoring events)."""

    def __init__(self) -> None:
        self.hits = self.misses = 0

        def listener(event: str, **kwargs: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                self.hits += 1
            elif event == "/jax/compilation_cache/cache_misses":
                self.misses += 1

        jax.monitoring.register_event_listener(listener)

    def snapshot(self) -> tuple[int, int]:
        """(hits, misses) so far."""
        return self.hits, self.misses

    def served(self, since: tuple[int, int]) -> bool:
        """Whether every compile since ``since`` was a cache hit (and there was one)."""
        return self.hits > since[0] and self.misses == since[1]


@dataclasses.dataclass
class _Timed:
    """A compiled variant ready to be called, and its measurements."""

    variant: Variant
    call: Any  # () -> (seconds, updated: bool); takes ``steps`` steps
    steps: int  # steps per call
    batch: int
    info: dict[str, Any]
    update_every: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    updated: list[bool] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        plain = [t for t, u in zip(self.times, self.updated, strict=True) if not u]
        upd = [t for t, u in zip(self.times, self.updated, strict=True) if u]
        plain_call = statistics.median(plain) if plain else statistics.median(self.times)
        step_s = plain_call / self.steps
        out = dict(self.info)
        out.update(step_s=step_s, img_s=self.batch / step_s,
                   mean_step_s=sum(self.times) / (len(self.times) * self.steps),
                   num_calls=len(self.times))
        flops, model_flops = out.get("flops_per_step"), out.get("model_flops_per_step")
        out["flops_per_s"] = flops / step_s if flops else None
        out["model_flops_per_s"] = model_flops / step_s if model_flops else None
        peak = out.pop("_peak", None)
        out["mfu"] = out["model_flops_per_s"] / peak if peak and model_flops else None
        if self.update_every:
            update: dict[str, Any] = {"every": self.update_every, "plain_call_s": plain_call,
                                      "num_update_calls": len(upd)}
            if upd:
                t_u = statistics.median(upd)
                window = step_s + (t_u - plain_call) / self.update_every
                update.update(update_call_s=t_u, window_step_s=window,
                              window_ratio=window / step_s)
            out["update"] = update
        else:
            out["update"] = None
        return out


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


def _prepare_nbjax(variant: Variant, base: Any, dataset: Any, mesh: Any, warmup: int,
                   cache: _CacheHits, forward_flops: dict[Any, float | None]) -> _Timed:
    """Builds and compiles a nbjax variant; its state starts just before its first update."""
    config = variant_config(base, variant)
    pruner = unmasked_pruner() if variant.head == "dense" else None
    run = loop.build(config, dataset, mesh, pruner=pruner)
    k, batch = int(config.train.steps_per_call), int(config.train.batch_size)
    order = loop.BatchOrder(len(dataset.train_labels), batch, config.seed)
    blocks = [loop.train_indices(run, order, i * k, k) for i in range(4)]
    hits = cache.snapshot()
    t0 = time.perf_counter()
    lowered = run.train_chunk.lower(run.state, run.train_images, run.train_labels, blocks[0])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    n = mesh.devices.size
    cost = _cost(compiled)
    flops = cost.get("flops")
    flops = flops * n / scan_flops_factor_cached() if flops else None
    model = model_lib.build_model(config, dataset.num_classes)
    key = (tuple(model.merge_r), str(model.dtype))
    if key not in forward_flops:
        try:
            forward_flops[key] = flops_lib.compiled_forward_flops(model, dataset.image_shape)
        except Exception:  # noqa: BLE001 - accounting never stops the benchmark
            forward_flops[key] = None
    fwd = forward_flops[key]
    peak = peak_flops(mesh.devices.flat[0].device_kind, config.model.dtype)
    info = {"name": variant.name, "lower_s": t1 - t0, "xla_compile_s": t2 - t1,
            "compile_s": t2 - t0, "cache_hit": cache.served(hits), "flops_per_step": flops,
            "model_flops_per_step": 3 * fwd * batch if fwd else None,
            "memory": _memory(compiled), "num_devices": n, "_peak": peak}

    first = run.pruner.first_update
    update_every = run.pruner.update_every if first is not None else None
    start = max(0, first - (warmup + 2) * k) if first is not None else 0
    repl = sharding_lib.replicated(mesh)
    box = {"state": run.state.replace(
        step=jax.device_put(np.asarray(start, np.int32), repl)), "i": 0}
    images, labels = run.train_images, run.train_labels
    del run

    def call() -> tuple[float, bool]:
        idx = blocks[box["i"] % len(blocks)]
        box["i"] += 1
        t = time.perf_counter()
        state, metrics = compiled(box["state"], images, labels, idx)
        _block((state, metrics))
        elapsed = time.perf_counter() - t
        box["state"] = state
        flag = metrics.get("pruning/mask_updated")
        return elapsed, bool(flag is not None and np.any(np.asarray(flag) > 0))

    return _Timed(variant, call, k, batch, info, update_every=update_every)


def _prepare_plain(variant: Variant, base: Any, dataset: Any, device: Any, cache: _CacheHits,
                   forward_flops: dict[Any, float | None]) -> _Timed:
    """The minimal dense jitted step on one device (the reference of the issue)."""
    config = variant_config(base, variant)
    model = model_lib.build_model(config, dataset.num_classes)
    t = config.train
    tx = optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
    batch, k = int(t.batch_size), int(t.steps_per_call)
    x = jax.device_put(data_lib.normalize(dataset.train_images[:batch], dataset.mean,
                                          dataset.std), device)
    y = jax.device_put(jnp.asarray(dataset.train_labels[:batch]), device)
    one = jax.sharding.SingleDeviceSharding(device)
    params = jax.jit(model.init, out_shardings=one)(jax.random.PRNGKey(0), x[:1])["params"]
    opt_state = jax.jit(tx.init, out_shardings=one)(params)
    num_classes = dataset.num_classes

    def step(params, opt_state, x, y):
        def loss_fn(p):
            return train.cross_entropy(model.apply({"params": p}, x), y, num_classes)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    hits = cache.snapshot()
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops = _cost(compiled).get("flops")
    key = (tuple(model.merge_r), str(model.dtype))
    if key not in forward_flops:
        forward_flops[key] = flops_lib.compiled_forward_flops(model, dataset.image_shape)
    fwd = forward_flops[key]
    info = {"name": variant.name, "lower_s": t1 - t0, "xla_compile_s": t2 - t1,
            "compile_s": t2 - t0, "cache_hit": cache.served(hits), "flops_per_step": flops,
            "model_flops_per_step": 3 * fwd * batch if fwd else None,
            "memory": _memory(compiled), "num_devices": 1,
            "_peak": peak_flops(device.device_kind, config.model.dtype)}
    box = {"params": params, "opt_state": opt_state}

    def call() -> tuple[float, bool]:
        t = time.perf_counter()
        p, o = box["params"], box["opt_state"]
        for _ in range(k):
            p, o, loss = compiled(p, o, x, y)
        _block((p, o, loss))
        elapsed = time.perf_counter() - t
        box["params"], box["opt_state"] = p, o
        return elapsed, False

    return _Timed(variant, call, k, batch, info)


def _torch_device() -> str:
    """'cuda' when JAX runs on a GPU and torch sees one too, else 'cpu': the reference runs
    on the same kind of device as the nbjax variants."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _prepare_torch(base: Any, dataset: Any, threads: int = 0) -> _Timed:
    from nbjax.bench import torch_ref as bench_torch

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    m, t = base.model, base.train
    shape = bench_torch.TorchShape(
        image_size=int(m.image_size), channels=int(dataset.image_shape[-1]),
        patch_size=int(m.patch_size), hidden_dim=int(m.hidden_dim), depth=int(m.depth),
        num_heads=int(m.num_heads), mlp_dim=int(m.mlp_dim), num_classes=dataset.num_classes,
        batch_size=int(t.batch_size), sparsity=float(base.pruning.sparsity),
        learning_rate=float(t.learning_rate), weight_decay=float(t.weight_decay))
    step = bench_torch.TorchStep(shape, device=_torch_device())
    k = int(t.steps_per_call)

    def call() -> tuple[float, bool]:
        return step.run(k), False

    info = {"name": "torch_eager", "flops_per_step": None, "model_flops_per_step": None,
            "memory": None, "num_devices": None, **step.describe()}
    return _Timed(Variant("torch_eager", "torch"), call, k, shape.batch_size, info)


_SCAN_FACTOR: list[int] = []


def scan_flops_factor_cached() -> int:
    """:func:`scan_flops_factor`, computed once per process."""
    if not _SCAN_FACTOR:
        _SCAN_FACTOR.append(scan_flops_factor())
    return _SCAN_FACTOR[0]


def run_bench(config: Any, variants: Sequence[str] = DEFAULT_VARIANTS, steps: int = 200,
              warmup: int = 2, torch: bool = False, real_data: bool = False,
              devices: int = 0, torch_threads: int = 0, print_fn: Callable[[str], Any] = print,
              config_path: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Builds, compiles and times ``variants`` of ``config``; returns the JSON-able results.

    ``steps``: timed steps per variant (rounded up to whole calls); ``warmup``: untimed calls
    after compiling; ``devices``: use the first N devices (0 = all).
    """
    parsed = [Variant.parse(v) for v in variants]
    if len({v.name for v in parsed}) != len(parsed):
        raise ValueError(f"duplicate variants in {list(variants)}")
    load_start = os.getloadavg()
    dataset = bench_dataset(config, real_data)
    all_devices = jax.devices()
    mesh = sharding_lib.make_mesh(all_devices[:devices] if devices > 0 else all_devices)
    cache = _CacheHits()
    forward_flops: dict[Any, float | None] = {}
    timed: list[_Timed] = []
    for v in parsed:
        if v.head == "plain_jax":
            timed.append(_prepare_plain(v, config, dataset, all_devices[0], cache,
                                        forward_flops))
        else:
            timed.append(_prepare_nbjax(v, config, dataset, mesh, warmup, cache,
                                        forward_flops))
        info = timed[-1].info
        print_fn(f"compiled {v.name:<22} in {info['compile_s']:6.2f} s "
                 f"(trace+lower {info['lower_s']:.2f} s, XLA {info['xla_compile_s']:.2f} s"
                 f"{', persistent cache hit' if info['cache_hit'] else ''})")
    torch_result: dict[str, Any] | None = None
    if torch:
        from nbjax.bench import torch_ref as bench_torch

        if bench_torch.available():
            timed.append(_prepare_torch(config, dataset, torch_threads))
        else:
            torch_result = {"error": "torch is not importable (pip install torch)"}
            print_fn("--torch: torch is not importable; skipped (pip install torch)")
    for item in timed:
        for _ in range(warmup):
            item.call()
    k = int(config.train.steps_per_call)
    num_calls = max(1, -(-steps // k))
    loads = []
    for r in range(num_calls):
        loads.append(os.getloadavg()[0])
        for item in (timed if r % 2 == 0 else timed[::-1]):
            seconds, updated = item.call()
            item.times.append(seconds)
            item.updated.append(updated)
    load_end = os.getloadavg()
    results = {item.variant.name: item.summary() for item in timed}
    if "torch_eager" in results:
        torch_result = results.pop("torch_eager")
    peak = device_peak_memory(list(mesh.devices.flat))
    for r in results.values():
        r.setdefault("memory", None)
        if r["memory"] is not None:
            r["memory"]["device_peak_bytes"] = peak
    out = {
        "config": config_path,
        "overrides": list(overrides),
        "platform": all_devices[0].platform,
        "device_kind": all_devices[0].device_kind,
        "num_devices": mesh.devices.size,
        "grad_reduce": ("flat" if sharding_lib.flat_grad_reduce(config, mesh) else "compiler")
        if mesh.devices.size > 1 else None,
        "batch_size": int(config.train.batch_size),
        "steps_per_call": k,
        "steps": num_calls * k,
        "load_average": {"start": list(load_start), "end": list(load_end),
                         "max_1min_while_timing": max(loads)},
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "model_dtype": config.model.dtype,
        "variants": results,
        "ratios": bench_report.ratios(results, torch_result),
        "torch": torch_result,
    }
    print_fn(bench_report.format_table(out))
    return out


def main(argv: list[str]) -> None:
    """absl entry: parses the flags, runs :func:`run_bench`, writes ``--json``."""
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    runtime.enable_compilation_cache()
    f = flags.FLAGS
    config = f.config
    try:
        config_lib.validate(config)
    except ValueError as err:
        sys.exit(f"error: {err}")
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    out = run_bench(config, f.variants, f.steps, f.warmup, f.torch, f.real_data, f.devices,
                    torch_threads=f.torch_threads,
                    config_path=f["config"].config_filename, overrides=overrides)
    if f.json:
        bench_report.write_json(out, f.json)
        print(f"wrote {f.json}")


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", "configs/mnist_vit4.py",
                                    "Experiment config (.py file).", lock_config=True)
    flags.DEFINE_list("variants", list(DEFAULT_VARIANTS), "Variants to time (see --help).")
    flags.DEFINE_integer("steps", 200, "Timed steps per variant (whole calls).")
    flags.DEFINE_integer("warmup", 2, "Untimed calls per variant after compiling.")
    flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
    flags.DEFINE_bool("torch", False, "Also time the PyTorch eager step (if importable).")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for --torch (0: torch's "
                         "default, one per core).")
    flags.DEFINE_bool("real_data", False, "Use the config's dataset, not synthetic data.")
    flags.DEFINE_integer("devices", 0, "Use only the first N devices (0 = all).")


def run() -> None:
    """Console entry: one XLA device per CPU core (before JAX starts), then the benchmark."""
    sharding_lib.use_all_cpu_cores()
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
