"""The report of a study, rebuilt from its records alone: ``python -m nbjax.report DIR``.

DIR is a records store (``docs/results/<name>``, holding ``cells/``, or the cells directory
itself) or a study directory (``--workdir`` of the run; its records store, plus run
directories that finished without a record). Writes ``report.md`` (status and missing cells,
the claims with verdicts, the tables as mean ± 95 % CI) and plots with error bars.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from nbjax.study import findings as fd
from nbjax.study import store, study_plots

METHOD_ORDER = ("none", "gmp", "static", "rigl", "set", "pdwp")
WORKDIR_MANIFEST = "study.json"


def is_study(path: str) -> bool:
    """Whether ``path`` is a study directory or a records store."""
    return os.path.exists(os.path.join(path, WORKDIR_MANIFEST)) or store.is_store(path)


def _cell_fields(run: dict[str, Any]) -> dict[str, Any]:
    """A run entry of ``study.json`` as cell fields (older entries say ``name``, no arm)."""
    fields = {k: v for k, v in run.items() if k not in ("dir", "name")}
    fields.setdefault("cell", run.get("name"))
    fields.setdefault("arm", run["mitigation"])
    fields.setdefault("variant", {})
    return fields


def _from_workdir(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Records of a study directory: its store's, plus finished runs without a record."""
    from nbjax.study import records as record_lib

    with open(os.path.join(path, WORKDIR_MANIFEST)) as f:
        manifest = json.load(f)
    name = manifest.get("name") or os.path.basename(os.path.abspath(path))
    cells = [_cell_fields(run) for run in manifest["runs"]]
    found = {r["cell"]: r for r in store.load_records(manifest.get("records_dir", ""))}
    for run, fields in zip(manifest["runs"], cells, strict=True):
        run_dir = os.path.join(path, run["dir"])
        if fields["cell"] not in found and os.path.exists(
                os.path.join(run_dir, "final_metrics.json")):
            found[fields["cell"]] = record_lib.from_run_dir(run_dir, {"study": name, **fields})
    return list(found.values()), cells, name


def load(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """(records, expected cells or None when unknown, study name) of DIR."""
    if os.path.exists(os.path.join(path, WORKDIR_MANIFEST)):
        return _from_workdir(path)
    cells_dir = store.cells_dir(path)
    manifest = store.read_manifest(cells_dir)
    records = store.load_records(cells_dir)
    name = manifest["name"] if manifest else os.path.basename(os.path.abspath(path))
    return records, (manifest["cells"] if manifest else None), name


def sort_cells(cells: Sequence[fd.Cell]) -> list[fd.Cell]:
    """A canonical order, whatever order the records came in."""
    arm_order = fd.arms(cells)

    def rank(c: fd.Cell) -> tuple:
        method = METHOD_ORDER.index(c.method) if c.method in METHOD_ORDER else len(METHOD_ORDER)
        return (c.dataset, method, c.method, c.sparsity, arm_order.index(c.arm), c.seed)

    return sorted(cells, key=rank)


def status_lines(records: Sequence[dict[str, Any]],
                 expected: Sequence[dict[str, Any]] | None) -> list[str]:
    """Whether the study is complete, and the missing cells by name."""
    done = {r["cell"] for r in records}
    if expected is None:
        return [f"{len(done)} cells recorded; the grid is unknown (no {store.MANIFEST}), so "
                "missing cells cannot be named."]
    missing = [c for c in expected if c["cell"] not in done]
    if not missing:
        return [f"Complete: all {len(expected)} cells of the grid are recorded."]
    return [f"**Unfinished study**: {len(expected) - len(missing)} of {len(expected)} cells "
            f"recorded. Missing ({len(missing)}): " + ", ".join(_seeds_together(missing)) + "."]


def _seeds_together(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Cell names with the seeds of one setting in braces: `gmp_s0.9_tome_seed{0,1,2}`."""
    seeds: dict[str, list[str]] = {}
    for c in cells:
        suffix = f"_seed{c.get('seed')}"
        if c["cell"].endswith(suffix):
            seeds.setdefault(c["cell"][:-len(suffix)] + "_seed", []).append(str(c["seed"]))
        else:
            seeds.setdefault(c["cell"], [])
    out = []
    for stem, found in seeds.items():
        if len(found) > 1:
            out.append(f"`{stem}{{{','.join(found)}}}`")
        else:
            out.append(f"`{stem}{''.join(found)}`")
    return out


def metric_table(cells: Sequence[fd.Cell], metric: str, digits: int) -> list[str]:
    """One markdown table: rows (method, sparsity), columns the arms, mean ± CI (n)."""
    estimates = fd.table(cells, metric)
    if all(e.n == 0 for e in estimates.values()):
        return [f"No cell logs the {fd.METRICS[metric]}.", ""]
    columns = fd.arms(cells)
    lines = ["| method | sparsity | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    rows = dict.fromkeys((c.method, c.sparsity) for c in cells)
    for method, sparsity in rows:
        label = "dense" if method == fd.DENSE else method
        texts = [estimates[(method, sparsity, a)].text(digits)
                 if (method, sparsity, a) in estimates else "" for a in columns]
        lines.append(f"| {label} | {sparsity:g} | " + " | ".join(texts) + " |")
    return [*lines, ""]


def claim_lines(rows: Sequence[fd.Finding]) -> list[str]:
    """The verdict counts per claim, then every row of every claim."""
    lines = ["| claim | supported | contradicted | inconclusive | no verdict / other |",
             "| --- | --- | --- | --- | --- |"]
    for key, text in fd.CLAIMS.items():
        verdicts = [r.verdict for r in rows if r.claim == key]
        counts = [verdicts.count(v) for v in ("supported", "contradicted", "inconclusive")]
        lines.append(f"| ({key}) {text} | " + " | ".join(map(str, counts))
                     + f" | {len(verdicts) - sum(counts)} |")
    lines += ["", "| claim | subject | metric | verdict | effect (mean ± 95 % CI) |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| ({r.claim}) | {r.subject} | {r.metric} | **{r.verdict}** | {r.effect} |"
              for r in rows]
    return [*lines, ""]


def provenance_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Code commits, machines and the summed wall time of the records."""
    commits = sorted({f"{(r.get('code') or {}).get('commit', '?')[:10]}"
                      + (" (dirty)" if (r.get("code") or {}).get("dirty") else "")
                      for r in records if r.get("code")})
    machines = sorted({f"{m['hostname']} ({m['jax_backend']} × {m['device_count']}, "
                       f"{m['cpu_count']} CPUs)" for r in records if (m := r.get("machine"))})
    wall = [r["wall_time_s"] for r in records if r.get("wall_time_s")]
    return ["## Provenance", "",
            f"- code: {', '.join(commits) or 'unknown'}",
            f"- machines: {', '.join(machines) or 'unknown'}",
            f"- wall time: {sum(wall) / 3600:.2f} h over {len(wall)} cells", ""]


def dataset_section(label: str, cells: list[fd.Cell], out: str,
                    prefix: str) -> tuple[list[str], list[str]]:
    """The claims, tables and figures of one dataset: (markdown lines, figure paths)."""
    lines = [f"## Dataset: {label}", "", "### Claims", "", *claim_lines(fd.findings(cells))]
    for metric, digits in fd.DIGITS.items():
        where = "" if metric == "accuracy" else " at the end of pruning"
        lines += [f"### {fd.METRICS[metric].capitalize()}{where}: mean ± 95 % CI (n seeds)",
                  "", *metric_table(cells, metric, digits)]
    figures = study_plots.draw_all(cells, out, prefix)
    lines += ["### Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                    for p in figures]
    return [*lines, ""], figures


def write_study_report(path: str, out: str | None = None) -> list[str]:
    """Writes ``report.md`` and the figures into ``out`` (default: the directory holding
    ``cells/``, or DIR); returns the figure paths and the report's."""
    records, expected, name = load(path)
    if out is None:
        out = os.path.dirname(os.path.abspath(path)) \
            if os.path.basename(os.path.normpath(path)) == store.CELLS else path
    os.makedirs(out, exist_ok=True)
    cells = sort_cells([fd.cell_of(r) for r in records])
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    lines = [f"# Study report: {name}", "", *status_lines(records, expected), "",
             "Every ± is the half-width of a 95 % confidence interval over seeds; how each "
             "number is computed: `docs/statistics.md`.", ""]
    paths: list[str] = []
    for label in datasets:
        prefix = "" if len(datasets) == 1 else label.replace(":", "_") + "_"
        section, figures = dataset_section(label, [c for c in cells if c.dataset == label],
                                           out, prefix)
        lines += section
        paths += figures
    lines += provenance_lines(records)
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    return [*paths, report]
