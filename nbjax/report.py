"""Plots and a markdown summary of one or more runs' burden metrics: ``python -m nbjax.report``.

    python -m nbjax.report WORKDIR                      # PNGs + report.md into WORKDIR
    python -m nbjax.report RUN_A RUN_B --out DIR        # the runs overlaid, one colour each
    python -m nbjax.report STUDY_DIR                    # a study's records (nbjax.study.report)

Reads each workdir's ``metrics.jsonl`` (one JSON object per logged step), ``config.json`` and
``final_metrics.json`` as :mod:`nbjax.train.loop` writes them, and draws against the training step:
the burden index, the per-block load, the dormant and overloaded unit fractions, the
survivors' weight and gradient rms and the pruned signal, the sparsity and the accuracy, and
the burden index against the sparsity. What the metrics mean and how to read the plots:
``docs/burden.md``. One function per figure, so other reports (the study) can reuse them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nbjax import errors, pruning
from nbjax.study import plots
from nbjax.study import report as study_report

B = "burden"
# Where the total sparsity is logged (the pruning methods own it, nbjax.pruning.common).
SPARSITY_KEYS = ("pruning/sparsity",)


@dataclasses.dataclass
class RunLog:
    """One run's log: its records (non-final, by step), final metrics and config."""

    workdir: str
    label: str
    records: list[dict[str, Any]]
    final: dict[str, Any]
    config: dict[str, Any]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key`` over the records that hold a finite number for it."""
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def metric_names(self) -> set[str]:
        """Every metric name in the log."""
        out: set[str] = set()
        for r in self.records:
            out.update(r)
        return out

    def last(self, key: str) -> float | None:
        """The last finite value of ``key`` (the final record first), or None."""
        v = self.final.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        _, values = self.series(key)
        return float(values[-1]) if len(values) else None

    @property
    def method(self) -> str:
        """The run's pruning method (``?`` without a config)."""
        return str(self.config.get("pruning", {}).get("method", "?"))

    def sparsity(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, total sparsity): the pruning method's log, or 0 for a dense run."""
        for key in SPARSITY_KEYS:
            steps, values = self.series(key)
            if len(steps):
                return steps, values
        if self.method in pruning.registered() and not pruning.method(self.method).prunes:
            steps, _ = self.series("train/loss")
            return steps, np.zeros(len(steps))
        return np.zeros(0, np.int64), np.zeros(0)


def load_run(workdir: str, label: str | None = None) -> RunLog:
    """Reads a run directory written by :func:`nbjax.train.loop.train_and_evaluate`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a run directory?")
    records, final = [], {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("final"):
                    final = r
                else:
                    records.append(r)
    records.sort(key=lambda r: r["step"])
    final_path = os.path.join(workdir, "final_metrics.json")
    if os.path.exists(final_path):
        with open(final_path) as f:
            final = {**json.load(f), **final}
    config: dict[str, Any] = {}
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    if label is None:
        label = os.path.basename(os.path.normpath(workdir)) or workdir
    return RunLog(workdir, label, records, final, config)


def block_names(runs: Sequence[RunLog], metric: str) -> list[str]:
    """The groups (``block_0``, ..., ``patch_embed``) any run logs ``burden/<metric>/...`` for,
    blocks in order first."""
    prefix = f"{B}/{metric}/"
    names = {k[len(prefix):] for run in runs for k in run.metric_names() if k.startswith(prefix)}

    def order(name: str) -> tuple[int, int, str]:
        if name.startswith("block_") and name[6:].isdigit():
            return (0, int(name[6:]), name)
        return (1, 0, name)

    return sorted(names, key=order)


def _colors(runs: Sequence[RunLog]) -> dict[str, Any]:
    return plots.palette([run.label for run in runs])


def _plot_runs(ax: Any, runs: Sequence[RunLog], colors: dict[str, Any],
               get: Callable[[RunLog], tuple[np.ndarray, np.ndarray]], **kwargs: Any) -> bool:
    """One line per run through ``get(run)``; False if no run has a point."""
    return plots.curves(ax, {run.label: (*get(run), None) for run in runs}, colors, **kwargs)


def plot_burden_index(runs: Sequence[RunLog], path: str) -> str | None:
    """``burden/index`` against the step, one line per run. None if no run logs it."""
    colors = _colors(runs)
    fig, axes = plots.panels(1, 1, 6.0, 3.6)
    ax = axes[0, 0]
    if not _plot_runs(ax, runs, colors, lambda r: r.series(f"{B}/index")):
        plots.discard(fig)
        return None
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="step", ylabel="burden index (mean load over blocks)", title="Burden index")
    ax.legend(fontsize=8)
    return plots.save(fig, path)


def plot_block_metric(runs: Sequence[RunLog], metric: str, path: str, title: str,
                      reference: float | None = None) -> str | None:
    """``burden/<metric>/<block>`` against the step: one panel per block, runs overlaid."""
    blocks = block_names(runs, metric)
    if not blocks:
        return None
    colors = _colors(runs)
    fig, axes = plots.panels(1, len(blocks))
    for ax, block in zip(axes[0], blocks, strict=True):
        _plot_runs(ax, runs, colors, lambda r, b=block: r.series(f"{B}/{metric}/{b}"))
        if reference is not None:
            ax.axhline(reference, color="0.6", lw=0.8, ls=":")
        ax.set(title=block, xlabel="step")
    axes[0, 0].set_ylabel(metric)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    return plots.save(fig, path)


def _plot_block_grid(runs: Sequence[RunLog], metrics: Sequence[str], path: str, title: str,
                     y_from_zero: bool = False) -> str | None:
    """One row per logged metric of ``metrics``, one column per block, runs overlaid."""
    metrics = [m for m in metrics if block_names(runs, m)]
    if not metrics:
        return None
    blocks = block_names(runs, metrics[0])
    colors = _colors(runs)
    fig, axes = plots.panels(len(metrics), len(blocks))
    for row, metric in enumerate(metrics):
        for col, block in enumerate(blocks):
            ax = axes[row, col]
            _plot_runs(ax, runs, colors, lambda r, m=metric, b=block: r.series(f"{B}/{m}/{b}"))
            if y_from_zero:
                ax.set_ylim(-0.02, None)
            if row == 0:
                ax.set_title(block)
            if col == 0:
                ax.set_ylabel(metric)
            if row == len(metrics) - 1:
                ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    return plots.save(fig, path)


def plot_unit_fractions(runs: Sequence[RunLog], path: str) -> str | None:
    """Dormant and overloaded fractions of the MLP units and attention channels, per block.

    Rows: ``dormant_frac``, ``overload_frac``, ``attn_dormant_frac``, ``attn_overload_frac``
    (those logged); columns: blocks; runs overlaid.
    """
    return _plot_block_grid(
        runs, ("dormant_frac", "overload_frac", "attn_dormant_frac", "attn_overload_frac"),
        path, "Dormant (a/mean ≤ τ) and overloaded (a/mean ≥ κ) units", y_from_zero=True)


def plot_survivors(runs: Sequence[RunLog], path: str) -> str | None:
    """The survivors: ``kept_weight_rms``, ``kept_grad_rms`` and ``pruned_signal`` per block."""
    return _plot_block_grid(
        runs, ("kept_weight_rms", "kept_grad_rms", "pruned_signal"), path,
        "Survivors: kept-weight rms (rel. to reference), kept-gradient rms, pruned signal")

def plot_sparsity_accuracy(runs: Sequence[RunLog], path: str) -> str:
    """Sparsity, train accuracy and test accuracy against the step, runs overlaid."""
    colors = _colors(runs)
    fig, axes = plots.panels(1, 3)
    _plot_runs(axes[0, 0], runs, colors, RunLog.sparsity)
    axes[0, 0].set(title="sparsity (total)", xlabel="step", ylim=(-0.02, 1.0))
    _plot_runs(axes[0, 1], runs, colors, lambda r: r.series("train/accuracy"))
    axes[0, 1].set(title="train accuracy (batch)", xlabel="step")
    _plot_runs(axes[0, 2], runs, colors, lambda r: _test_accuracy(r), marker="o", ms=3)
    axes[0, 2].set(title="test accuracy", xlabel="step")
    axes[0, 0].legend(fontsize=7)
    return plots.save(fig, path)


def _test_accuracy(run: RunLog) -> tuple[np.ndarray, np.ndarray]:
    steps, values = run.series("test/accuracy")
    final = run.final.get("test/accuracy")
    at = run.final.get("step")
    if isinstance(final, (int, float)) and at is not None and (not len(steps)
                                                              or steps[-1] != at):
        steps, values = np.append(steps, at), np.append(values, final)
    return steps, values


def plot_burden_vs_sparsity(runs: Sequence[RunLog], path: str) -> str | None:
    """The burden index against the sparsity at the same logged steps, one curve per run."""
    colors = _colors(runs)
    fig, axes = plots.panels(1, 1, 5.0, 3.6)
    ax = axes[0, 0]

    def paired(run: RunLog) -> tuple[np.ndarray, np.ndarray]:
        s_steps, s = run.sparsity()
        b_steps, b = run.series(f"{B}/index")
        common, si, bi = np.intersect1d(s_steps, b_steps, return_indices=True)
        del common
        return s[si], b[bi]

    if not _plot_runs(ax, runs, colors, paired, marker=".", ms=4):
        plots.discard(fig)
        return None
    ax.set(xlabel="sparsity (total)", ylabel="burden index", title="Burden vs sparsity")
    ax.legend(fontsize=8)
    return plots.save(fig, path)


FIGURES: tuple[tuple[str, Callable[[Sequence[RunLog], str], str | None]], ...] = (
    ("burden_index.png", plot_burden_index),
    ("load_per_block.png", lambda runs, path: plot_block_metric(
        runs, "load", path, "Load per block (1 = dense layer at the reference step)", 1.0)),
    ("unit_fractions.png", plot_unit_fractions),
    ("survivors.png", plot_survivors),
    ("sparsity_accuracy.png", plot_sparsity_accuracy),
    ("burden_vs_sparsity.png", plot_burden_vs_sparsity),
)


def write_summary(runs: Sequence[RunLog], figures: Sequence[str], path: str) -> str:
    """``report.md``: per run, final accuracy, sparsity and burden; then the figures."""
    fmt = plots.fmt
    lines = ["# Burden report", "",
             "Metrics are defined in `docs/burden.md`; load and the burden index are 1 for "
             "the dense layer at the reference step.", "",
             "| run | method | sparsity | test accuracy | burden index | load per block "
             "| dormant (MLP, mean) | overload (MLP, mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        _, sparsity = run.sparsity()
        blocks = [b for b in block_names([run], "load") if b.startswith("block_")]
        loads = " / ".join(fmt(run.last(f"{B}/load/{b}"), 2) for b in blocks) or plots.MISSING

        def mean_last(metric: str, r: RunLog = run) -> float | None:
            vals = [r.last(f"{B}/{metric}/{b}") for b in block_names([r], metric)]
            vals = [v for v in vals if v is not None]
            return float(np.mean(vals)) if vals else None

        lines.append(
            f"| {run.label} | {run.method} | {fmt(sparsity[-1] if len(sparsity) else None)} "
            f"| {fmt(run.last('test/accuracy'), 4)} | {fmt(run.last(f'{B}/index'))} "
            f"| {loads} | {fmt(mean_last('dormant_frac'))} | {fmt(mean_last('overload_frac'))} |")
    lines += ["", "Values are the last logged ones. Workdirs:", ""]
    lines += [f"- `{run.label}`: `{run.workdir}`" for run in runs]
    lines += ["", "## Figures", ""]
    for fig in figures:
        name = os.path.basename(fig)
        lines += [f"![{name}]({name})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def make_report(workdirs: Sequence[str], out: str | None = None,
                labels: Sequence[str] | None = None) -> list[str]:
    """Draws every figure of :data:`FIGURES` and writes ``report.md``; returns the paths.

    ``out`` defaults to the workdir when there is one, and must be given for several.
    """
    if not workdirs:
        raise ValueError("give at least one run directory")
    if out is None:
        if len(workdirs) > 1:
            raise ValueError("several runs: say where the report goes with --out DIR")
        out = workdirs[0]
    if labels is not None and len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} runs")
    runs = [load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
    seen: dict[str, int] = {}
    for run in runs:  # distinct labels, so the colours and legends tell runs apart
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    os.makedirs(out, exist_ok=True)
    figures = [p for name, draw in FIGURES if (p := draw(runs, os.path.join(out, name)))]
    summary = write_summary(runs, figures, os.path.join(out, "report.md"))
    return [*figures, summary]


def main(argv: Sequence[str] | None = None) -> list[str]:
    """``python -m nbjax.report``: the run report, or a study's when given one study
    directory or records store."""
    parser = argparse.ArgumentParser(prog="python -m nbjax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+",
                        help="run directories (with metrics.jsonl), or one study directory "
                        "or records store (with cells/)")
    parser.add_argument("--out", default=None,
                        help="where the PNGs and report.md go (default: the one workdir)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend labels, one per run (default: dir names)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if len(args.workdirs) == 1 and study_report.is_study(args.workdirs[0]):
        paths = study_report.write_study_report(args.workdirs[0], args.out)
    else:
        paths = make_report(args.workdirs, args.out, labels)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    errors.run_cli(main)
