"""Runs a study: every cell of the grid as an ordinary nbjax run, then its record.

``python -m nbjax.study --config configs/study_mnist.py --workdir DIR`` trains each cell in
``DIR/runs/<cell>`` and, when it finishes, writes its record to the study's records store
(``docs/results/<name>/cells`` by default; ``--records DIR`` or ``--config.records_dir``).
A cell with a record is skipped before anything else, so a study continues wherever its
store goes (``docs/study.md``). An interrupted cell resumes from its checkpoint; processes
sharing DIR split the grid through claims (:mod:`nbjax.study.claims`). ``--dry-run`` lists
the plan with time estimates; ``--status`` prints the grid's done / running / missing cells.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from nbjax.study import claims, progress, store
from nbjax.study import records as record_lib
from nbjax.study.grid import (  # noqa: F401  (the names a study config imports)
    MITIGATIONS,
    RunSpec,
    expand,
    grid_config,
    records_dir,
    study_config,
)

WORKDIR_MANIFEST = "study.json"


def run_dir(workdir: str, spec: RunSpec) -> str:
    """The run directory of a cell."""
    return os.path.join(workdir, "runs", spec.name)


def is_finished(path: str) -> bool:
    """Whether the run at ``path`` has finished (its final metrics are written)."""
    return os.path.exists(os.path.join(path, "final_metrics.json"))


def write_workdir_manifest(study: ml_collections.ConfigDict, workdir: str, records: str,
                           specs: list[RunSpec]) -> None:
    """``DIR/study.json``: the study's name, records store and cells, for the report."""
    os.makedirs(workdir, exist_ok=True)
    manifest = {"name": study.name, "records_dir": os.path.abspath(records),
                "grid": study.grid.to_dict(),
                "runs": [s.fields() | {"dir": os.path.join("runs", s.name)} for s in specs]}
    tmp = os.path.join(workdir, f"{WORKDIR_MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(workdir, WORKDIR_MANIFEST))


def build_record(spec: RunSpec, path: str, study_name: str) -> dict[str, Any]:
    """The record of the cell's finished run, with this machine and code commit."""
    record = record_lib.from_run_dir(path, {"study": study_name, **spec.fields()})
    record["machine"] = store.machine()
    record["code"] = store.code_commit()
    return record


def _train(spec: RunSpec, path: str) -> float:
    """Trains (or resumes) the cell; adds this session's seconds to the run's wall time."""
    from nbjax.train import loop

    start = time.perf_counter()
    try:
        loop.train_and_evaluate(spec.config, path)
    finally:
        seconds = time.perf_counter() - start
        record_lib.add_wall_time(path, seconds)
    return seconds


def run_cell(spec: RunSpec, workdir: str, records: str, study_name: str,
             bar: progress.Progress) -> str:
    """Runs and records one cell unless it is recorded or claimed; returns what happened."""
    if store.has_record(records, spec.name):
        return "skipped (recorded)"
    path = run_dir(workdir, spec)
    if not claims.claim(path):
        return "skipped (claimed by another process)"
    try:
        if store.has_record(records, spec.name):  # recorded by another process meanwhile
            return "skipped (recorded)"
        seconds, outcome = None, "recorded (finished run)"
        if not is_finished(path):
            bar.start(spec.name)
            seconds, outcome = _train(spec, path), "ran"
        store.write_record(records, build_record(spec, path, study_name))
        bar.finish(seconds)
        return outcome
    finally:
        claims.release(path)


def run_study(study: ml_collections.ConfigDict, workdir: str, records: str | None = None,
              dry_run: bool = False, log: Callable[[str], Any] = print) -> dict[str, str]:
    """Runs (or, with ``dry_run``, lists) every cell of the study; returns cell -> outcome."""
    specs = expand(study)
    records = records or records_dir(study)
    if dry_run:
        return dry_run_plan(specs, workdir, records, log)
    store.write_manifest(records, study.name, [s.fields() for s in specs])
    write_workdir_manifest(study, workdir, records, specs)
    bar = progress.Progress([s.name for s in specs], records, log)
    status = {s.name: run_cell(s, workdir, records, study.name, bar) for s in specs}
    log(bar.line(None))
    return status


def cell_state(spec: RunSpec, workdir: str, records: str) -> str:
    """``recorded``, ``finished`` (no record yet), ``partial`` (a checkpoint) or ``todo``."""
    path = run_dir(workdir, spec)
    if store.has_record(records, spec.name):
        return "recorded"
    if is_finished(path):
        return "finished"
    return "partial" if os.path.isdir(os.path.join(path, "checkpoints")) else "todo"


def dry_run_plan(specs: list[RunSpec], workdir: str, records: str,
                 log: Callable[[str], Any]) -> dict[str, str]:
    """Logs every cell with its state and estimated time here; trains nothing."""
    from nbjax.study import estimate

    states = {s.name: cell_state(s, workdir, records) for s in specs}
    todo = [s for s in specs if states[s.name] in ("partial", "todo")]
    seconds = estimate.estimate_seconds(todo)
    for spec in specs:
        guess = f"~{seconds[spec.name] / 60:6.1f} min" if spec.name in seconds else ""
        log(f"{spec.name:<44} {states[spec.name]:<9} {guess}")
    log(f"{len(specs)} cells, {len(todo)} to do, ~{sum(seconds.values()) / 3600:.2f} h on "
        f"this machine (one process); records: {records}")
    return states


def print_status(study: ml_collections.ConfigDict | None, target: str | None,
                 workdir: str | None) -> str:
    """The ``--status`` table, from the study config or from a store or study directory."""
    if target and os.path.exists(os.path.join(target, WORKDIR_MANIFEST)):
        with open(os.path.join(target, WORKDIR_MANIFEST)) as f:
            workdir, target = workdir or target, json.load(f).get("records_dir")
    if study is not None:
        cells = [s.fields() for s in expand(study)]
        target = store.cells_dir(target or records_dir(study))
    else:
        target = store.cells_dir(target or ".")
        manifest = store.read_manifest(target)
        if manifest is None:
            raise ValueError(f"{target} has no {store.MANIFEST}: give --config")
        cells = manifest["cells"]
    return progress.status_table(cells, progress.cell_states(cells, target, workdir))


def report_target(study: ml_collections.ConfigDict, records: str | None = None) -> str:
    """What to hand ``python -m nbjax.report``: the directory holding ``cells/``, or the
    store itself when it has another name."""
    path = os.path.normpath(records or records_dir(study))
    if os.path.basename(path) == store.CELLS:
        return os.path.dirname(path) or "."
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m nbjax.study`` (flags: :mod:`nbjax.study.cli`)."""
    from nbjax.study import cli

    cli.main(argv)


if __name__ == "__main__":
    main()
