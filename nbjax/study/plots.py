"""Plot helpers shared by the run report (:mod:`nbjax.report`) and the study report: one per
plot kind (lines against x with optional error bars; scatter groups), the figure grid, the
save, and the one format of a possibly missing number."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MISSING = "–"
Series = tuple[Sequence[float], Sequence[float], Sequence[float] | None]


def fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (``signed``: always a sign); ``–`` when missing."""
    if value is None:
        return MISSING
    return f"{value:{'+' if signed else ''}.{digits}f}"


def panels(rows: int, cols: int, width: float = 3.6, height: float = 2.8) -> tuple[Any, Any]:
    """A figure with a [rows, cols] array of axes."""
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def save(fig: Any, path: str) -> str:
    """Saves and closes the figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def discard(fig: Any) -> None:
    """Closes a figure that has nothing to show."""
    plt.close(fig)


def curves(ax: Any, series: Mapping[str, Series], colors: Mapping[str, Any] | None = None,
           reference: float | None = None, **style: Any) -> bool:
    """One line per label through (x, y), with error bars where ``yerr`` is given (None
    entries: no bar); a dotted horizontal line at ``reference``. False if nothing drawn."""
    drew = False
    for label, (x, y, yerr) in series.items():
        if not len(x):
            continue
        color = None if colors is None else colors.get(label)
        if yerr is None:
            ax.plot(x, y, color=color, label=label, **style)
        else:
            err = np.asarray([0.0 if e is None else e for e in yerr], np.float64)
            ax.errorbar(x, y, yerr=err, color=color, label=label, capsize=2, **style)
        drew = True
    if reference is not None:
        ax.axhline(reference, color="0.6", lw=0.8, ls=":")
    return drew


def scatter(ax: Any, groups: Mapping[str, tuple[Sequence[float], Sequence[float]]],
            colors: Mapping[str, Any] | None = None) -> bool:
    """One marker colour per label; False if no point."""
    drew = False
    for label, (x, y) in groups.items():
        if len(x):
            ax.scatter(x, y, label=label, s=18,
                       color=None if colors is None else colors.get(label))
            drew = True
    return drew


def legend(axes: Any) -> Any:
    """One legend, on the last panel, naming every label drawn in any panel once, so a label
    the last panel lacks is still named; None if nothing is labelled."""
    handles: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if not handles:
        return None
    return np.ravel(axes)[-1].legend(list(handles.values()), list(handles), fontsize=7)


def palette(labels: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per label, so every panel and figure colours a label alike."""
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}
