"""Runs a study: every cell of the grid as an ordinary nbjax run, then its record.

``python -m nbjax.study --config configs/study_mnist.py --workdir DIR`` trains each cell in
``DIR/runs/<cell>`` and, when it finishes, writes its record to the study's records store
(``docs/results/<name>/cells`` by default; ``--records DIR`` or ``--config.records_dir``).
A cell with a record is skipped before anything else, so a study continues wherever its
store goes (``docs/study.md``). An interrupted cell resumes from its checkpoint; processes
sharing DIR split the grid through claims (:mod:`nbjax.study.claims`). ``--dry-run`` lists
the plan with time estimates; ``--status`` prints the grid's done / running / missing cells.

With ``population_size`` above 1, the cells not yet recorded that share a compiled program
train together as populations (:mod:`nbjax.population`), each member into its usual run
directory and the population's checkpoint in ``DIR/populations/``; size 1 runs every cell
alone, as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
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
POPULATIONS = "populations"


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


def build_record(spec: RunSpec, path: str, study_name: str,
                 population_size: int = 1) -> dict[str, Any]:
    """The record of the cell's finished run, with this machine and code commit; a member of
    a population also holds ``population_size`` (absent: the cell trained alone)."""
    record = record_lib.from_run_dir(path, {"study": study_name, **spec.fields()})
    record["machine"] = store.machine()
    record["code"] = store.code_commit()
    if population_size > 1:
        record["population_size"] = population_size
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


RECORDED = "skipped (recorded)"
CLAIMED = "skipped (claimed by another process)"


def _run_claimed(spec: RunSpec, workdir: str, records: str, study_name: str,
                 bar: progress.Progress) -> str:
    """Runs (or only records, when finished) a cell this process has claimed."""
    if store.has_record(records, spec.name):  # recorded by another process meanwhile
        return RECORDED
    path = run_dir(workdir, spec)
    seconds, outcome = None, "recorded (finished run)"
    if not is_finished(path):
        bar.start(spec.name)
        seconds, outcome = _train(spec, path), "ran"
    store.write_record(records, build_record(spec, path, study_name))
    bar.finish(seconds)
    return outcome


def run_cell(spec: RunSpec, workdir: str, records: str, study_name: str,
             bar: progress.Progress) -> str:
    """Runs and records one cell unless it is recorded or claimed; returns what happened."""
    if store.has_record(records, spec.name):
        return RECORDED
    path = run_dir(workdir, spec)
    if not claims.claim(path):
        return CLAIMED
    try:
        return _run_claimed(spec, workdir, records, study_name, bar)
    finally:
        claims.release(path)


def population_dir(workdir: str, specs: Sequence[RunSpec]) -> str:
    """``DIR/populations/<first cell>+<members>-<digest>``: the digest of the member names
    gives populations of other members other directories (a population resumes only with
    the members it began with)."""
    names = [spec.name for spec in specs]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    return os.path.join(workdir, POPULATIONS, f"{names[0]}+{len(names)}-{digest}")


def _has_own_run(spec: RunSpec, workdir: str) -> bool:
    """Whether the cell's run directory holds a run of its own: checkpoints (half-trained
    alone, or a finished member's final state) or final metrics."""
    path = run_dir(workdir, spec)
    return is_finished(path) or os.path.isdir(os.path.join(path, "checkpoints"))


def plan_units(specs: Sequence[RunSpec], workdir: str, records: str,
               size: int) -> list[list[RunSpec]]:
    """The units of work, in the order of their first cell: the cells not yet recorded,
    grouped by compiled program into populations of at most ``size`` members
    (:func:`nbjax.population.members.group`). A cell with a run of its own stays alone, so
    that it resumes (or is only recorded) where it is."""
    pending = [s for s in specs if not store.has_record(records, s.name)]
    if size <= 1:
        return [[s] for s in pending]
    from nbjax.population import members

    alone = [s for s in pending if _has_own_run(s, workdir)]
    grouped = [s for s in pending if not _has_own_run(s, workdir)]
    units = [[grouped[i] for i in group]
             for group in members.group([s.config for s in grouped], size)]
    order = {s.name: i for i, s in enumerate(specs)}
    return sorted(units + [[s] for s in alone], key=lambda unit: order[unit[0].name])


def _train_population(members: list[RunSpec], workdir: str, records: str, study_name: str,
                      bar: progress.Progress, dataset: Any) -> dict[str, str]:
    """Trains (or resumes) the members together, shares the wall time out evenly, records
    each member."""
    from nbjax.population import loop as population_loop

    paths, n = [run_dir(workdir, s) for s in members], len(members)
    bar.start(f"{members[0].name} and {n - 1} more (a population of {n})")
    start = time.perf_counter()
    try:
        population_loop.train_population([s.config for s in members], paths,
                                         population_dir(workdir, members), dataset=dataset)
    finally:
        seconds = time.perf_counter() - start
        for path in paths:
            record_lib.add_wall_time(path, seconds / n)
    for spec, path in zip(members, paths, strict=True):
        store.write_record(records, build_record(spec, path, study_name, population_size=n))
        bar.finish(seconds / n)
    return {s.name: "ran in a population" for s in members}


def run_population(specs: list[RunSpec], workdir: str, records: str, study_name: str,
                   bar: progress.Progress, dataset: Any = None) -> dict[str, str]:
    """Runs and records one population; returns cell -> what happened.

    The population's directory is claimed first, so processes that planned the same
    population do not split it; then each member's run directory, as for a cell alone. A
    member claimed by another process is left to it, one recorded meanwhile is skipped, and
    the rest train together (alone, when one is left).
    """
    where = population_dir(workdir, specs)
    if not claims.claim(where):
        return {s.name: CLAIMED for s in specs}
    taken: list[RunSpec] = []
    status: dict[str, str] = {}
    try:
        for spec in specs:
            if claims.claim(run_dir(workdir, spec)):
                taken.append(spec)
            else:
                status[spec.name] = CLAIMED
        rest = []
        for spec in taken:
            if store.has_record(records, spec.name) or is_finished(run_dir(workdir, spec)):
                status[spec.name] = _run_claimed(spec, workdir, records, study_name, bar)
            else:
                rest.append(spec)
        if len(rest) == 1:
            status[rest[0].name] = _run_claimed(rest[0], workdir, records, study_name, bar)
        elif rest:
            status.update(_train_population(rest, workdir, records, study_name, bar, dataset))
    finally:
        for spec in taken:
            claims.release(run_dir(workdir, spec))
        claims.release(where)
    return status


class _Datasets:
    """Each data config's dataset, loaded once for every population that trains on it."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}

    def get(self, config: ml_collections.ConfigDict) -> Any:
        from nbjax.data import pipeline as data_lib

        key = json.dumps(config.data.to_dict(), sort_keys=True)
        if key not in self._loaded:
            self._loaded[key] = data_lib.load_dataset(config.data)
        return self._loaded[key]


def population_size(study: ml_collections.ConfigDict, specs: Sequence[RunSpec], records: str,
                    requested: int | None = None, datasets: _Datasets | None = None) -> int:
    """``requested``, else the study's ``population_size``; 0 means
    :func:`nbjax.study.estimate.auto_population_size` for the cells left (1 on a CPU)."""
    import jax

    from nbjax.study import estimate

    size = int(study.get("population_size", 0) if requested is None else requested)
    if size < 0:
        raise ValueError(f"population_size {size} is not valid: use 1 or more, or 0 (auto)")
    pending = [s for s in specs if not store.has_record(records, s.name)]
    if size > 0 or jax.default_backend() == "cpu" or not pending:
        return max(size, 1)
    datasets = datasets or _Datasets()
    return estimate.auto_population_size([s.config for s in pending],
                                         datasets.get(pending[0].config))


def run_study(study: ml_collections.ConfigDict, workdir: str, records: str | None = None,
              dry_run: bool = False, log: Callable[[str], Any] = print,
              population_size_override: int | None = None) -> dict[str, str]:
    """Runs (or, with ``dry_run``, lists) every cell of the study; returns cell -> outcome.

    ``population_size_override`` replaces the study's ``population_size``.
    """
    specs = expand(study)
    records = records or records_dir(study)
    datasets = _Datasets()
    size = population_size(study, specs, records, population_size_override, datasets)
    if dry_run:
        return dry_run_plan(specs, workdir, records, log, size, study.get("timing"))
    store.write_manifest(records, study.name, [s.fields() for s in specs])
    write_workdir_manifest(study, workdir, records, specs)
    bar = progress.Progress([s.name for s in specs], records, log)
    if size == 1:
        status = {s.name: run_cell(s, workdir, records, study.name, bar) for s in specs}
    else:
        status = {s.name: RECORDED for s in specs}
        for unit in plan_units(specs, workdir, records, size):
            if len(unit) == 1:
                status[unit[0].name] = run_cell(unit[0], workdir, records, study.name, bar)
            else:
                status.update(run_population(unit, workdir, records, study.name, bar,
                                             datasets.get(unit[0].config)))
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


def _plan_lines(specs: list[RunSpec], units: list[list[RunSpec]], seconds: list[float],
                states: dict[str, str]) -> list[str]:
    """One line per cell (its state, and its estimate when it runs alone); each population's
    line, with its estimate, comes before its members' lines."""
    alone = {u[0].name: s for u, s in zip(units, seconds, strict=True) if len(u) == 1}
    populations = [(u, s) for u, s in zip(units, seconds, strict=True) if len(u) > 1]
    firsts = {u[0].name: k for k, (u, _) in enumerate(populations)}
    members = {spec.name for u, _ in populations for spec in u}
    lines = []
    for spec in specs:
        if spec.name in firsts:
            unit, unit_s = populations[firsts[spec.name]]
            head = f"population {firsts[spec.name] + 1}/{len(populations)}: {len(unit)} members"
            lines.append(f"{head:<54} ~{unit_s / 60:6.1f} min")
            lines += [f"  {m.name:<42} {states[m.name]}" for m in unit]
        if spec.name not in members:
            guess = f"~{alone[spec.name] / 60:6.1f} min" if spec.name in alone else ""
            lines.append(f"{spec.name:<44} {states[spec.name]:<9} {guess}".rstrip())
    return lines


def dry_run_plan(specs: list[RunSpec], workdir: str, records: str,
                 log: Callable[[str], Any], size: int = 1,
                 timing: ml_collections.ConfigDict | None = None) -> dict[str, str]:
    """Logs every cell with its state and estimated time (with ``size`` > 1, the
    populations with their members); trains nothing. ``timing``: the study's step-time
    figures, if it has them (else step times are measured here)."""
    from nbjax.study import estimate

    states = {s.name: cell_state(s, workdir, records) for s in specs}
    units = [unit for unit in plan_units(specs, workdir, records, size)
             if any(states[s.name] in ("partial", "todo") for s in unit)]
    for unit in units:  # a population that has a checkpoint resumes from it
        if len(unit) > 1 and os.path.isdir(os.path.join(population_dir(workdir, unit),
                                                        "checkpoints")):
            states.update({s.name: "partial" for s in unit})
    seconds, basis = estimate.unit_seconds(units, timing) if units else ([], "nothing to run")
    for line in _plan_lines(specs, units, seconds, states):
        log(line)
    populations = sum(len(u) > 1 for u in units)
    how = (f" in {populations} populations (at most {size} members) and "
           f"{len(units) - populations} runs alone" if size > 1 else "")
    total = sum(seconds)
    log(f"{len(specs)} cells, {sum(len(u) for u in units)} to do{how}, ~{total / 3600:.2f} h "
        f"({total / 60:.0f} min; {basis}); records: {records}")
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
