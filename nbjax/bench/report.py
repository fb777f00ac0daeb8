"""The benchmark's report: ratios, the printed table, the speed targets and the JSON file.

:func:`nbjax.bench.runner.run_bench` returns one JSON-able dict; everything here reads only that
dict, so a saved ``--json`` file can be re-printed or compared without re-running.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nbjax.bench.variants import Variant

# A population of 32 members should give this many times the single run's img/s, and a bf16
# population step this share of the device's peak FLOP/s (docs/performance.md).
POPULATION_SPEEDUP_TARGET = (32, 10.0)
POPULATION_MFU_TARGET = 0.15


def ratios(results: dict[str, dict[str, Any]], torch_result: dict[str, Any] | None
           ) -> dict[str, float]:
    """Step time of each variant over ``dense`` (and ``plain_jax``), img/s over torch's."""
    out: dict[str, float] = {}
    for ref in ("dense", "plain_jax"):
        if ref in results:
            for name, r in results.items():
                if name != ref:
                    out[f"{name}/{ref}"] = r["step_s"] / results[ref]["step_s"]
    if torch_result and "img_s" in torch_result:
        for name, r in results.items():
            out[f"{name}_vs_torch_img_s"] = r["img_s"] / torch_result["img_s"]
    return out


def format_table(out: dict[str, Any]) -> str:
    """The human-readable table of :func:`run_bench`'s results."""
    reduce = f" ({out['grad_reduce']} gradient all-reduce)" if out.get("grad_reduce") else ""
    rows = [f"{out['platform']} ({out['device_kind']}) x{out['num_devices']}{reduce}, batch "
            f"{out['batch_size']}, {out['steps_per_call']} steps/call, {out['steps']} timed "
            f"steps, load average {out['load_average']['start'][0]:.2f} -> "
            f"{out['load_average']['end'][0]:.2f}, dtype {out['model_dtype']}"]
    head = (f"{'variant':<22}{'compile s':>10}{'step ms':>9}{'img/s':>8}{'GFLOP/step':>11}"
            f"{'GFLOP/s':>9}{'MFU':>7}{'vs dense':>9}{'upd. window':>12}")
    rows.append(head)
    dense = out["variants"].get("dense")
    entries = list(out["variants"].items())
    if out["torch"] and "img_s" in out["torch"]:
        entries.append((out["torch"]["name"], out["torch"]))

    for name, r in entries:
        mflops = r.get("model_flops_per_step")
        rows.append(
            f"{name:<22}{_num(r.get('compile_s'), '.2f'):>10}{1e3 * r['step_s']:>9.2f}"
            f"{r['img_s']:>8.0f}{_num(mflops and mflops / 1e9, '.3f'):>11}"
            f"{_num(r.get('model_flops_per_s') and r['model_flops_per_s'] / 1e9, '.1f'):>9}"
            f"{_num(r.get('mfu') and 100 * r['mfu'], '.1f'):>7}"
            f"{_num(dense and r['step_s'] / dense['step_s'], '.3f'):>9}"
            f"{_num((r.get('update') or {}).get('window_ratio'), '.3f'):>12}")
    rows.append("step ms: median per step of the calls without a mask update; GFLOP: model "
                "FLOPs (3x the dense forward); upd. window: average step time over a ΔT window "
                "with its mask update / plain masked step")
    rows.extend(target_lines(out))
    if out.get("population"):
        rows.extend(population_table(out["population"]))
    return "\n".join(rows)


def compile_line(info: dict[str, Any]) -> str:
    """The line printed when a variant (or a population) has been compiled."""
    return (f"compiled {info['name']:<22} in {info['compile_s']:6.2f} s "
            f"(trace+lower {info['lower_s']:.2f} s, XLA {info['xla_compile_s']:.2f} s"
            f"{', persistent cache hit' if info['cache_hit'] else ''})")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def population_table(population: dict[str, Any]) -> list[str]:
    """The population rows: each size N against the single run timed beside it, then the
    population targets."""
    rows = [f"population of {population['variant']} (members differ in the seed), "
            f"each size timed in turn with the single run",
            f"{'N':>4}{'mesh':>8}{'compile s':>10}{'step ms':>9}{'member ms':>10}"
            f"{'img/s':>9}{'x single':>9}{'seq. ms':>9}{'pop/seq':>8}{'GFLOP/s':>9}"
            f"{'MFU':>7}{'MiB':>8}"]
    for n, r in population["rows"].items():
        mesh = "x".join(str(v) for v in r["mesh_shape"].values())
        rows.append(
            f"{n:>4}{mesh:>8}{r['compile_s']:>10.2f}{1e3 * r['step_s']:>9.2f}"
            f"{1e3 * r['per_member_step_s']:>10.3f}{r['img_s']:>9.0f}"
            f"{r['img_s_vs_single']:>9.2f}{1e3 * r['sequence_step_s']:>9.2f}"
            f"{r['population_vs_sequence']:>8.3f}"
            f"{_num(r['model_flops_per_s'] and r['model_flops_per_s'] / 1e9, '.1f'):>9}"
            f"{_num(r['mfu'] and 100 * r['mfu'], '.1f'):>7}"
            f"{_num(_peak_mib(r.get('memory')), '.0f'):>8}")
    rows.append("step ms: one population step (every member one step); member ms: step / N; "
                "img/s: N x batch / step; seq. ms: N x the single step timed beside it; "
                "pop/seq: step / seq. (< 1: the population is faster); MiB: the device's peak "
                "(the program's per-device bytes where the device reports none)")
    rows.extend(population_target_lines(population))
    return rows


def _peak_mib(memory: dict[str, Any] | None) -> float | None:
    """The device's peak bytes in MiB, else the compiled program's argument + output +
    temporary bytes less the aliased ones (one device's share)."""
    if not memory:
        return None
    peak = memory.get("device_peak_bytes")
    if peak is None:
        peak = (memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"]
                - memory["alias_bytes"])
    return peak / 2**20


def population_target_lines(population: dict[str, Any]) -> list[str]:
    """The population targets of docs/performance.md, where the figures reach them: the
    aggregate img/s at N = 32 over the single run's, and the best MFU of a bf16 step."""
    lines = []
    size, speedup = POPULATION_SPEEDUP_TARGET
    row = population["rows"].get(str(size))
    if row is not None:
        ratio = row["img_s_vs_single"]
        lines.append(f"target: {row['name']} aggregate img/s = {ratio:.2f} x the single run "
                     f"(>= {speedup:g}: {'met' if ratio >= speedup else 'NOT met'})")
    with_mfu = [r for r in population["rows"].values() if r["mfu"] is not None]
    if with_mfu and Variant.parse(population["variant"]).bf16:
        best = max(with_mfu, key=lambda r: r["mfu"])
        met = "met" if best["mfu"] >= POPULATION_MFU_TARGET else "NOT met"
        lines.append(f"target: best MFU {100 * best['mfu']:.1f} % at {best['name']} "
                     f"(>= {100 * POPULATION_MFU_TARGET:g} %: {met})")
    return lines


def target_lines(out: dict[str, Any]) -> list[str]:
    """The speed targets of docs/performance.md, checked on these figures (a line each, where
    they apply)."""
    lines = []
    variants = out["variants"]
    torch_img_s = (out.get("torch") or {}).get("img_s")
    for name, r in variants.items():
        v = Variant.parse(name)
        reference = "dense+bf16" if v.bf16 else "dense"  # the same compute dtype
        dense = variants.get(reference)
        if v.masked and v.burden and not v.tome and dense:
            ratio = r["step_s"] / dense["step_s"]
            lines.append(f"target: {name} / {reference} = {ratio:.3f} (<= 1.10: "
                         f"{'met' if ratio <= 1.10 else 'NOT met'})")
            if torch_img_s:
                met = "met" if r["img_s"] > torch_img_s else "NOT met"
                lines.append(f"target: {name} {r['img_s']:.0f} img/s vs torch eager "
                             f"{torch_img_s:.0f} img/s ({met})")
        window = (r.get("update") or {}).get("window_ratio")
        if window is not None:
            lines.append(f"target: {name} mask-update window / plain step = {window:.3f} "
                         f"(<= 1.15: {'met' if window <= 1.15 else 'NOT met'})")
    return lines


def write_json(out: dict[str, Any], path: str) -> None:
    """Writes the results as indented JSON (atomically: a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=2)
    os.replace(tmp, path)
