"""What one compiled call costs, read without calling it: compile time, XLA's FLOP and byte
counts, the model FLOPs a step needs, and the device's peak FLOP/s and memory."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nbjax.tome import cost

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


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` (:data:`PEAK_FLOPS`), or None."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


@functools.cache
def scan_flops_factor() -> int:
    """How many times XLA's cost analysis counts the body of a 2-step ``lax.scan`` (1 or 2).

    XLA counts a while loop's body once; checked once per process on a tiny program so that
    the per-step FLOPs stay right if that ever changes.
    """
    def f(c, xs):
        return jax.lax.scan(lambda c, x: (c @ x, None), c, xs)[0]

    c = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    xs = jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)
    flops = cost.cost_analysis(jax.jit(f).lower(c, xs).compile()).get("flops", 0.0)
    return 2 if flops > 1.5 * 2 * 8**3 else 1


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """The compiled program's argument, output, aliased and temporary bytes, or None."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis
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
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


class CacheHits:
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


def compile_timed(jitted: Any, args: Sequence[Any], cache: CacheHits
                  ) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles ``jitted`` for ``args``: the compiled call and what compiling took
    (``lower_s``: trace and lower, ``xla_compile_s``, their sum ``compile_s``, ``cache_hit``)."""
    hits = cache.snapshot()
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "xla_compile_s": t2 - t1, "compile_s": t2 - t0,
                      "cache_hit": cache.served(hits)}


class ModelFlops:
    """The FLOPs a train step of a model needs: 3 x its compiled dense forward x batch.

    The forward is compiled once per merge schedule and dtype, the only model differences
    between the variants of one benchmark.
    """

    def __init__(self) -> None:
        self._forward: dict[tuple[Any, ...], float | None] = {}

    def per_step(self, model: Any, image_shape: Sequence[int], batch: int) -> float | None:
        """Model FLOPs of one step of ``batch`` images; None without a cost analysis."""
        key = (tuple(model.merge_r), str(model.dtype))
        if key not in self._forward:
            try:
                self._forward[key] = cost.compiled_forward_flops(model, image_shape)
            except Exception:  # noqa: BLE001 - accounting never stops the benchmark
                self._forward[key] = None
        forward = self._forward[key]
        return 3 * forward * batch if forward else None
