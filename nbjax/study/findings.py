"""The numbers of a study report, from its records: the cells, their per-arm tables, and the
paper's claims (a)-(f), each with a verdict, an effect size and its confidence interval.

``docs/statistics.md`` states how each number is computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from nbjax import pruning
from nbjax.study import statistics as st

DENSE = "none"  # the method name of the dense cells
PLAIN = "none"  # the arm without mitigation
HIGH_SPARSITY = 0.9  # "high sparsity" for claim (c): this and above
METRICS = {"accuracy": "test accuracy (%)", "burden_index": "burden index",
           "selection": "selection index", "compensation": "compensation index"}
DIGITS = {"accuracy": 2, "burden_index": 3, "selection": 3, "compensation": 3}
CLAIMS = {
    "a": "accuracy falls as sparsity grows (mean per-seed slope < 0; no mitigation)",
    "b": "the burden index rises with sparsity (mean per-seed slope > 0; no mitigation)",
    "c": f"the mitigation recovers accuracy at sparsity ≥ {HIGH_SPARSITY:g} "
         "(paired difference mitigated − plain > 0)",
    "d": "mechanism: the mitigation lowers the burden index and the compensation "
         "(paired difference < 0)",
    "e": "decomposition: across methods at the same sparsity, the index predicts the accuracy "
         "drop (partial correlation > 0; no mitigation)",
    "f": "static (random mask) has selection ≈ 1 (is 1 inside the CI?)",
}
Key = tuple[str, float, str]  # method, sparsity, arm


@dataclasses.dataclass(frozen=True)
class Cell:
    """What the report reads of one record (burden values at the end of pruning)."""

    name: str
    dataset: str
    method: str
    sparsity: float
    arm: str
    seed: int
    accuracy: float | None  # final test accuracy, percent
    burden_index: float | None
    selection: float | None
    compensation: float | None
    wall_time_s: float | None


def dataset_label(config: dict[str, Any]) -> str:
    """A short name of the run's data: ``mnist``, ``idx:fashion``, ``tfds:cifar10``."""
    data = config.get("data", {})
    source = data.get("source", "?")
    if source == "tfds":
        return f"tfds:{data.get('tfds_name')}"
    if data.get("path"):
        return f"{source}:{os.path.basename(os.path.normpath(data['path']))}"
    return source


def cell_of(record: dict[str, Any]) -> Cell:
    """The report's view of a record."""
    pruned = record.get("end_of_pruning", {})
    accuracy = record.get("final", {}).get("test/accuracy")
    return Cell(record["cell"], dataset_label(record["config"]), record["method"],
                float(record["sparsity"]), record["arm"], int(record["seed"]),
                None if accuracy is None else 100.0 * accuracy, pruned.get("burden/index"),
                pruned.get("burden/selection_index"), pruned.get("burden/compensation_index"),
                record.get("wall_time_s"))


def by_key(cells: Iterable[Cell]) -> dict[Key, list[Cell]]:
    """Cells grouped by (method, sparsity, arm), seeds together."""
    groups: dict[Key, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(c.method, c.sparsity, c.arm)].append(c)
    return groups


def per_seed(cells: Iterable[Cell], metric: str) -> dict[int, float | None]:
    """seed -> the metric's value."""
    return {c.seed: getattr(c, metric) for c in cells}


def table(cells: Sequence[Cell], metric: str) -> dict[Key, st.Estimate]:
    """Mean ± CI over seeds of ``metric`` for every (method, sparsity, arm)."""
    return {k: st.mean_ci(getattr(c, metric) for c in group)
            for k, group in by_key(cells).items()}


def arms(cells: Iterable[Cell]) -> list[str]:
    """The arms present: none, tome, persistent, both, then the variants in name order."""
    present = {c.arm for c in cells}
    fixed = [a for a in ("none", "tome", "persistent", "both") if a in present]
    return fixed + sorted(present - set(fixed))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One row of a claim: what it is about, its verdict and its effect with CI."""

    claim: str
    subject: str
    metric: str
    verdict: str
    effect: str


def _methods(cells: Iterable[Cell]) -> list[str]:
    seen: dict[str, None] = {}
    for c in cells:
        if c.method != DENSE:
            seen.setdefault(c.method)
    return list(seen)


def trends(cells: Sequence[Cell], claim: str, metric: str, direction: int,
           unit: str) -> list[Finding]:
    """Claims (a) and (b): per method, the mean per-seed slope over sparsity, no mitigation."""
    out = []
    for method in _methods(cells):
        points = [(c.seed, c.sparsity, getattr(c, metric)) for c in cells
                  if c.method == method and c.arm == PLAIN]
        result = st.trend(points)
        if result.slope.n == 0 and result.sparsities == 0:
            continue
        levels = st.sparsities(result.sparsities)
        effect = (f"{result.slope.text(DIGITS[metric], signed=True)} {unit}; {levels}"
                  if result.slope.n else
                  f"{levels}; a trend needs {st.MIN_TREND_SPARSITIES} in one seed")
        out.append(Finding(claim, method, METRICS[metric], st.trend_verdict(result, direction),
                           effect))
    return out


def paired(cells: Sequence[Cell], claim: str, metric: str, direction: int,
           min_sparsity: float = 0.0) -> list[Finding]:
    """Claims (c) and (d): per (method, sparsity, arm), mitigated − plain matched by seed."""
    groups = by_key(cells)
    out = []
    for (method, sparsity, arm), group in groups.items():
        plain = groups.get((method, sparsity, PLAIN))
        if method == DENSE or arm == PLAIN or sparsity < min_sparsity - 1e-9 or not plain:
            continue
        diff = st.paired_differences(per_seed(group, metric), per_seed(plain, metric))
        if diff.n == 0:
            continue
        out.append(Finding(claim, f"{method} s={sparsity:g} {arm}", METRICS[metric],
                           st.verdict(diff, direction), diff.text(DIGITS[metric], signed=True)))
    return out


def drops(cells: Sequence[Cell]) -> list[tuple[Cell, float]]:
    """(cell, dense accuracy of the same seed − its accuracy) of every pruned plain cell."""
    dense = {(c.dataset, c.seed): c.accuracy for c in cells
             if c.method == DENSE and c.arm == PLAIN and c.accuracy is not None}
    return [(c, dense[(c.dataset, c.seed)] - c.accuracy) for c in cells
            if c.method != DENSE and c.arm == PLAIN and c.accuracy is not None
            and (c.dataset, c.seed) in dense]


def decomposition(cells: Sequence[Cell]) -> list[Finding]:
    """Claim (e): partial correlation of each index with the accuracy drop, given sparsity,
    over the sparsities at which at least two methods have a cell (else within one method
    it would only correlate seed noise). Two rows per index: over the cells, and over the
    (method, sparsity) means, whose interval does not count a method's seeds as independent
    draws of the across-methods relation."""
    out = []
    pairs = drops(cells)
    for metric in ("compensation", "selection", "burden_index"):
        found = [(getattr(c, metric), drop, c.sparsity, c.method) for c, drop in pairs
                 if getattr(c, metric) is not None]
        methods = defaultdict(set)
        for *_, sparsity, method in found:
            methods[sparsity].add(method)
        pts = [p for p in found if len(methods[p[2]]) >= 2]
        if not pts:
            if found:
                out.append(Finding("e", "all methods", METRICS[metric],
                                   st.NO_VERDICT_METHODS, "one method per sparsity"))
            continue
        groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
        for x, y, sparsity, method in pts:
            groups[(method, sparsity)].append((x, y))
        means = [(*np.mean(xy, axis=0), sparsity) for (_, sparsity), xy in groups.items()]
        for subject, rows in (("all methods", [p[:3] for p in pts]),
                              ("method × sparsity means", means)):
            r = st.partial_correlation(*zip(*rows, strict=True))
            out.append(Finding("e", subject, METRICS[metric],
                               st.correlation_verdict(r, +1), f"r = {r.text(2)}"))
    return out


def static_selection(cells: Sequence[Cell]) -> list[Finding]:
    """Claim (f): the selection index of static cells, per sparsity, against 1."""
    out = []
    for (method, sparsity, arm), group in sorted(by_key(cells).items()):
        if not pruning.method(method).random_fixed_mask or arm != PLAIN:
            continue
        est = st.mean_ci(c.selection for c in group)
        if est.n:
            out.append(Finding("f", f"static s={sparsity:g}", METRICS["selection"],
                               st.contains_verdict(est, 1.0), est.text(3)))
    return out


def findings(cells: Sequence[Cell]) -> list[Finding]:
    """Every claim's rows for the cells of one dataset."""
    return [*trends(cells, "a", "accuracy", -1, "points per unit sparsity"),
            *trends(cells, "b", "burden_index", +1, "per unit sparsity"),
            *paired(cells, "c", "accuracy", +1, HIGH_SPARSITY),
            *paired(cells, "d", "burden_index", -1), *paired(cells, "d", "compensation", -1),
            *decomposition(cells), *static_selection(cells)]
