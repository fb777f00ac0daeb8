"""The report of a study directory: tables, plots and a verdict on each of the paper's claims.

``python -m nbjax.report STUDY_DIR`` (a directory written by :mod:`nbjax.study.runner`) writes
``report.md`` and PNG plots. Every number in it is read from the runs' own files: final test
accuracy from ``final_metrics.json``, the burden index and ``pruned_signal`` from
``metrics.jsonl`` at the end of pruning (the first logged step at or after the schedule's end
for gmp/pdwp; the last logged step for methods at constant sparsity).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HIGH_SPARSITY = 0.9  # "high sparsity" for the mitigation claim: this and above
MUCH = 0.5  # "much of the lost accuracy": at least this share recovered


@dataclasses.dataclass
class RunResult:
    """What the report needs of one finished run."""

    name: str
    method: str
    sparsity: float
    mitigation: str
    seed: int
    accuracy: float
    burden_index: float | None
    pruned_signal: float | None
    final_sparsity: float | None


def is_study(path: str) -> bool:
    return os.path.exists(os.path.join(path, "study.json"))


def _records(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _end_of_pruning(run_dir: str, method: str) -> int | None:
    """The step at which the run reaches its final sparsity (None: the last step)."""
    if method not in ("gmp", "pdwp"):
        return None
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        steps = json.load(f)["train/steps"]
    return int(round(config["pruning"]["end_frac"] * steps))


def _at_end_of_pruning(records: list[dict[str, Any]], end: int | None) -> dict[str, Any]:
    train = [r for r in records if "train/loss" in r]
    if not train:
        return {}
    if end is None:
        return train[-1]
    after = [r for r in train if r["step"] >= end]
    return after[0] if after else train[-1]


def _mean_of(record: dict[str, Any], prefix: str) -> float | None:
    values = [v for k, v in record.items() if k.startswith(prefix) and v is not None]
    return float(np.mean(values)) if values else None


def load_study(study_dir: str) -> list[RunResult]:
    """The finished runs of the study (unfinished ones are left out, and counted)."""
    with open(os.path.join(study_dir, "study.json")) as f:
        manifest = json.load(f)
    results = []
    for run in manifest["runs"]:
        path = os.path.join(study_dir, run["dir"])
        final_path = os.path.join(path, "final_metrics.json")
        if not os.path.exists(final_path):
            continue
        with open(final_path) as f:
            final = json.load(f)
        rec = _at_end_of_pruning(_records(os.path.join(path, "metrics.jsonl")),
                                 _end_of_pruning(path, run["method"]))
        results.append(RunResult(
            name=run["name"], method=run["method"], sparsity=float(run["sparsity"]),
            mitigation=run["mitigation"], seed=int(run["seed"]),
            accuracy=float(final["test/accuracy"]),
            burden_index=rec.get("burden/index"),
            pruned_signal=_mean_of(rec, "burden/pruned_signal/block_"),
            final_sparsity=rec.get("pruning/sparsity")))
    return results


def _group(results: list[RunResult]) -> dict[tuple[str, float, str], list[RunResult]]:
    groups: dict[tuple[str, float, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.method, r.sparsity, r.mitigation)].append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (average ranks for ties); None when undefined."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> np.ndarray:
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclasses.dataclass
class Summary:
    """The numbers behind the report, also returned for tests and notebooks."""

    accuracy: dict[tuple[str, float, str], tuple[float, float, int]]  # mean, std, seeds
    dense: dict[str, tuple[float, float, int]]  # mitigation -> accuracy mean, std, n
    recovered: dict[tuple[str, float, str], tuple[float, float | None]]  # gain, share
    burden: dict[tuple[str, float], tuple[float | None, float | None]]  # index, signal
    claims: list[tuple[str, str, str]]  # claim, verdict, evidence


def summarize(results: list[RunResult]) -> Summary:
    """Tables and claim verdicts from the finished runs."""
    groups = _group(results)
    accuracy = {}
    for key, runs in groups.items():
        if key[0] == "none":
            continue
        mean, std = _mean_std([r.accuracy for r in runs])
        accuracy[key] = (mean, std, len(runs))
    dense = {}
    for (method, _, mitigation), runs in groups.items():
        if method == "none":
            mean, std = _mean_std([r.accuracy for r in runs])
            dense[mitigation] = (mean, std, len(runs))
    dense_acc = dense.get("none", (None,))[0]

    recovered = {}
    for (method, sparsity, mitigation), (mean, _, _) in accuracy.items():
        if mitigation == "none" or (method, sparsity, "none") not in accuracy:
            continue
        base = accuracy[(method, sparsity, "none")][0]
        gain = mean - base
        lost = None if dense_acc is None else dense_acc - base
        share = gain / lost if lost is not None and lost > 1e-9 else None
        recovered[(method, sparsity, mitigation)] = (gain, share)

    burden = {}
    for (method, sparsity, mitigation), runs in groups.items():
        if method == "none" or mitigation != "none":
            continue
        idx = [r.burden_index for r in runs if r.burden_index is not None]
        sig = [r.pruned_signal for r in runs if r.pruned_signal is not None]
        burden[(method, sparsity)] = (float(np.mean(idx)) if idx else None,
                                      float(np.mean(sig)) if sig else None)
    return Summary(accuracy, dense, recovered, burden, _claims(accuracy, dense_acc,
                                                               recovered, burden))


def _claims(accuracy, dense_acc, recovered, burden) -> list[tuple[str, str, str]]:
    claims = []
    methods = sorted({m for m, _, _ in accuracy})

    # 1. Accuracy falls with sparsity.
    evidence, falls = [], []
    for m in methods:
        pts = sorted((s, a[0]) for (mm, s, mit), a in accuracy.items()
                     if mm == m and mit == "none")
        if len(pts) < 2:
            continue
        rho = _spearman([s for s, _ in pts], [a for _, a in pts])
        drop = pts[0][1] - pts[-1][1]
        falls.append(drop > 0 and (rho is None or rho < 0))
        evidence.append(f"{m}: {pts[0][1]:.4f} at s={pts[0][0]:g} → {pts[-1][1]:.4f} at "
                        f"s={pts[-1][0]:g} (Spearman {_fmt(rho)})")
    claims.append(("Accuracy falls as sparsity grows", _verdict(falls), "; ".join(evidence)
                   + (f"; dense {dense_acc:.4f}" if dense_acc is not None else "")))

    # 2. The burden rises with sparsity.
    evidence, rises = [], []
    for m in methods:
        pts = sorted((s, v[0]) for (mm, s), v in burden.items() if mm == m and v[0] is not None)
        if len(pts) < 2:
            continue
        rho = _spearman([s for s, _ in pts], [b for _, b in pts])
        rises.append(pts[-1][1] > pts[0][1] and (rho is None or rho > 0))
        evidence.append(f"{m}: burden index {pts[0][1]:.3f} at s={pts[0][0]:g} → "
                        f"{pts[-1][1]:.3f} at s={pts[-1][0]:g} (Spearman {_fmt(rho)})")
    claims.append(("The burden index rises with sparsity", _verdict(rises),
                   "; ".join(evidence)))

    # 3. The mitigation recovers much of the lost accuracy at high sparsity.
    evidence, recovers = [], []
    for mitigation in ("both", "tome", "persistent"):
        shares = [(m, s, v[1]) for (m, s, mit), v in recovered.items()
                  if mit == mitigation and s >= HIGH_SPARSITY and v[1] is not None]
        if not shares:
            continue
        mean_share = float(np.mean([x for _, _, x in shares]))
        if mitigation == "both" or not evidence:
            recovers = [x >= MUCH for _, _, x in shares]
        evidence.append(f"{mitigation}: mean share of the lost accuracy recovered at s ≥ "
                        f"{HIGH_SPARSITY:g} = {mean_share:+.2f} over {len(shares)} cells ("
                        + ", ".join(f"{m}@{s:g} {x:+.2f}" for m, s, x in shares) + ")")
    claims.append((f"The mitigation recovers much (≥ {MUCH:.0%}) of the lost accuracy at high "
                   "sparsity", _verdict(recovers), "; ".join(evidence)))
    return claims


def _verdict(flags: list[bool]) -> str:
    if not flags:
        return "not tested (no runs)"
    if all(flags):
        return "supported"
    if any(flags):
        return f"partly supported ({sum(flags)} of {len(flags)})"
    return "not supported"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


# ----------------------------------------------------------------------------------- plots


def plot_accuracy(summary: Summary, path: str) -> str:
    methods = sorted({m for m, _, _ in summary.accuracy})
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.6 * max(len(methods), 1), 3),
                             squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods, strict=False):
        for mit in ("none", "tome", "persistent", "both"):
            pts = sorted((s, a[0], a[1]) for (mm, s, mi), a in summary.accuracy.items()
                         if mm == m and mi == mit)
            if pts:
                s, a, e = zip(*pts, strict=True)
                ax.errorbar(s, a, yerr=e, marker="o", capsize=2, label=mit)
        if "none" in summary.dense:
            ax.axhline(summary.dense["none"][0], color="k", ls="--", lw=1, label="dense")
        ax.set_title(m)
        ax.set_xlabel("sparsity")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_burden_vs_sparsity(summary: Summary, path: str) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for m in sorted({m for m, _ in summary.burden}):
        pts = sorted((s, v[0]) for (mm, s), v in summary.burden.items()
                     if mm == m and v[0] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="dense reference")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("burden index at end of pruning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def burden_vs_drop(results: list[RunResult], dense_acc: float | None
                   ) -> tuple[list[float], list[float], float | None]:
    """Burden index and accuracy drop (dense − run) of every pruned run without mitigation."""
    pts = [(r.burden_index, dense_acc - r.accuracy) for r in results
           if dense_acc is not None and r.method != "none" and r.mitigation == "none"
           and r.burden_index is not None]
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    return x, y, _pearson(x, y)


def plot_burden_vs_drop(results: list[RunResult], dense_acc: float | None, path: str) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    x, y, r = burden_vs_drop(results, dense_acc)
    methods = sorted({res.method for res in results if res.method != "none"})
    for m in methods:
        pts = [(res.burden_index, dense_acc - res.accuracy) for res in results
               if res.method == m and res.mitigation == "none" and res.burden_index is not None
               and dense_acc is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=m, s=18)
    ax.set_xlabel("burden index at end of pruning")
    ax.set_ylabel("accuracy drop vs dense")
    ax.set_title(f"Pearson r = {_fmt(r)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- report


def write_study_report(study_dir: str, out: str | None = None) -> str:
    """Writes report.md and its plots into ``out`` (default: the study directory)."""
    out = out or study_dir
    os.makedirs(out, exist_ok=True)
    results = load_study(study_dir)
    with open(os.path.join(study_dir, "study.json")) as f:
        manifest = json.load(f)
    summary = summarize(results)
    dense_acc = summary.dense.get("none", (None,))[0]
    figures = [plot_accuracy(summary, os.path.join(out, "accuracy_vs_sparsity.png")),
               plot_burden_vs_sparsity(summary, os.path.join(out, "burden_vs_sparsity.png")),
               plot_burden_vs_drop(results, dense_acc, os.path.join(out, "burden_vs_drop.png"))]
    lines = [f"# Study report: {os.path.basename(os.path.abspath(study_dir))}", "",
             f"{len(results)} of {len(manifest['runs'])} runs finished. Grid: "
             f"`{json.dumps(manifest['grid'])}`.", "", "## The paper's claims", "",
             "| claim | verdict | evidence |", "| --- | --- | --- |"]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in summary.claims]
    lines += ["", "## Test accuracy (mean ± std over seeds)", ""]
    mitigations = [m for m in ("none", "tome", "persistent", "both")
                   if any(k[2] == m for k in summary.accuracy)]
    lines += ["| method | sparsity | " + " | ".join(mitigations) + " |",
              "| --- | --- | " + " | ".join("---" for _ in mitigations) + " |"]
    for mit, (mean, std, n) in sorted(summary.dense.items()):
        lines.append(f"| dense ({mit}) | 0 | {mean:.4f} ± {std:.4f} (n={n}) |"
                     + " |" * (len(mitigations) - 1))
    for method, sparsity in sorted({(m, s) for m, s, _ in summary.accuracy}):
        cells = []
        for mit in mitigations:
            a = summary.accuracy.get((method, sparsity, mit))
            cells.append(f"{a[0]:.4f} ± {a[1]:.4f} (n={a[2]})" if a else "–")
        lines.append(f"| {method} | {sparsity:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Accuracy recovered by each mitigation", "",
              "Gain = accuracy with the mitigation − without; share = gain / (dense − without).",
              "", "| method | sparsity | mitigation | gain | share of the loss |",
              "| --- | --- | --- | --- | --- |"]
    for (method, sparsity, mit), (gain, share) in sorted(summary.recovered.items()):
        lines.append(f"| {method} | {sparsity:g} | {mit} | {gain:+.4f} | {_fmt(share)} |")
    lines += ["", "## Burden at the end of pruning (no mitigation)", "",
              "| method | sparsity | burden index | pruned_signal (mean over blocks) |",
              "| --- | --- | --- | --- |"]
    for (method, sparsity), (idx, sig) in sorted(summary.burden.items()):
        lines.append(f"| {method} | {sparsity:g} | {_fmt(idx, 3).lstrip('+')} | "
                     f"{_fmt(sig, 3).lstrip('+')} |")
    _, _, r = burden_vs_drop(results, dense_acc)
    lines += ["", f"Correlation of burden index and accuracy drop across runs: Pearson r = "
              f"{_fmt(r)}.", "", "## Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
