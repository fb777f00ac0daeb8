"""The study report's figures: means with 95 % CI error bars against sparsity, and the
accuracy drop against each burden index (drawn with :mod:`nbjax.study.plots`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from nbjax.study import findings as fd
from nbjax.study import plots


def _series(cells: Sequence[fd.Cell], metric: str, method: str, arm: str) -> plots.Series:
    """(sparsities, means, CI half-widths) of one method and arm."""
    table = fd.table([c for c in cells if c.method == method and c.arm == arm], metric)
    points = sorted((s, e.mean, e.half_width) for (_, s, _), e in table.items()
                    if e.mean is not None)
    if not points:
        return [], [], []
    x, y, err = zip(*points, strict=True)
    return list(x), list(y), list(err)


def _pruned(cells: Sequence[fd.Cell]) -> list[str]:
    return list(dict.fromkeys(c.method for c in cells if c.method != fd.DENSE))


def accuracy_vs_sparsity(cells: Sequence[fd.Cell], path: str) -> str | None:
    """One panel per method, one line per arm; the dense accuracy as the dotted line."""
    methods = _pruned(cells)
    if not methods:
        return None
    dense = fd.table([c for c in cells if c.method == fd.DENSE], "accuracy")
    reference = dense.get((fd.DENSE, 0.0, fd.PLAIN))
    fig, axes = plots.panels(1, len(methods))
    for ax, method in zip(axes[0], methods, strict=True):
        plots.curves(ax, {arm: _series(cells, "accuracy", method, arm)
                          for arm in fd.arms(cells)}, plots.palette(fd.arms(cells)),
                     reference=reference.mean if reference else None, marker="o")
        ax.set(title=method, xlabel="sparsity")
    axes[0, 0].set_ylabel("test accuracy (%), mean ± 95 % CI")
    plots.legend(axes)
    fig.suptitle("dotted: dense, no mitigation", fontsize=8)
    return plots.save(fig, path)


def index_vs_sparsity(cells: Sequence[fd.Cell], path: str,
                      metrics: Sequence[str]) -> str | None:
    """One panel per burden metric logged, one line per method (no mitigation)."""
    metrics = [m for m in metrics if any(getattr(c, m) is not None for c in cells)]
    methods = _pruned(cells)
    if not metrics or not methods:
        return None
    fig, axes = plots.panels(1, len(metrics), 4.5, 3.2)
    for ax, metric in zip(axes[0], metrics, strict=True):
        plots.curves(ax, {m: _series(cells, metric, m, fd.PLAIN) for m in methods},
                     plots.palette(methods), reference=1.0, marker="o")
        ax.set(xlabel="sparsity", ylabel=f"{fd.METRICS[metric]} (end of pruning)")
    plots.legend(axes)
    return plots.save(fig, path)


def drop_vs_index(cells: Sequence[fd.Cell], path: str) -> str | None:
    """The accuracy drop (dense of the same seed − run) against each index, per method."""
    pairs = fd.drops(cells)
    metrics = [m for m in ("burden_index", "selection", "compensation")
               if any(getattr(c, m) is not None for c, _ in pairs)]
    if not metrics:
        return None
    fig, axes = plots.panels(1, len(metrics), 4.5, 3.2)
    for ax, metric in zip(axes[0], metrics, strict=True):
        groups = {}
        for method in _pruned(cells):
            pts = [(getattr(c, metric), drop) for c, drop in pairs
                   if c.method == method and getattr(c, metric) is not None]
            groups[method] = ([p[0] for p in pts], [p[1] for p in pts])
        plots.scatter(ax, groups, plots.palette(_pruned(cells)))
        ax.set(xlabel=f"{fd.METRICS[metric]} (end of pruning)",
               ylabel="accuracy drop vs dense (points)")
    plots.legend(axes)
    return plots.save(fig, path)


def draw_all(cells: Sequence[fd.Cell], out: str, prefix: str = "") -> list[str]:
    """Every figure that has data, as ``out/<prefix><name>.png``."""
    drawn = [
        accuracy_vs_sparsity(cells, os.path.join(out, f"{prefix}accuracy_vs_sparsity.png")),
        index_vs_sparsity(cells, os.path.join(out, f"{prefix}burden_vs_sparsity.png"),
                          ("burden_index",)),
        index_vs_sparsity(cells, os.path.join(out, f"{prefix}selection_compensation.png"),
                          ("selection", "compensation")),
        drop_vs_index(cells, os.path.join(out, f"{prefix}drop_vs_burden.png")),
    ]
    return [p for p in drawn if p]
