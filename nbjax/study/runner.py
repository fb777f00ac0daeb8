"""The paper's experiment grid: methods × sparsities × mitigations × seeds, plus dense runs.

``python -m nbjax.study --config configs/study_mnist.py --workdir DIR`` runs every cell of
``config.grid`` as an ordinary nbjax run in its own sub-directory ``DIR/runs/<name>``, so:

* an interrupted study resumes: finished runs (``final_metrics.json``) are skipped and
  unfinished ones resume from their checkpoint;
* several processes or hosts sharing DIR split the grid without clashing: a process claims a
  run by creating ``<run>/.claim`` exclusively, and skips runs claimed by a live process;
* ``--dry-run`` lists the runs with an estimate of each one's time on this machine.

A study config has two parts: ``base`` (a full run config) and ``grid`` (what varies). Narrow
the grid from the command line, e.g. ``--config.grid.methods="('gmp',)"``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import socket
import sys
import time
from typing import Any

import ml_collections

MITIGATIONS = ("none", "tome", "persistent", "both")
PERSISTENT_MITIGATIONS = ("persistent", "both")
DENSE = "none"  # the method name of the dense runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid and the config that runs it."""

    name: str
    method: str
    sparsity: float
    mitigation: str
    seed: int
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)


def grid_config(methods=("gmp", "set", "rigl", "static", "pdwp"),
                sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), mitigations=MITIGATIONS,
                seeds=(0,), dense=True, tome_keep_ratio: float = 0.5
                ) -> ml_collections.ConfigDict:
    """The ``grid`` part of a study config, with the paper's full grid as the default."""
    return ml_collections.ConfigDict(dict(
        methods=tuple(methods), sparsities=tuple(sparsities), mitigations=tuple(mitigations),
        seeds=tuple(seeds), dense=dense, tome_keep_ratio=tome_keep_ratio))


def _apply_mitigation(config: ml_collections.ConfigDict, mitigation: str,
                      keep_ratio: float) -> None:
    tm = config.mitigation.token_merging
    if mitigation in ("tome", "both"):
        tm.mode, tm.keep_ratio, tm.r = "single_pass", keep_ratio, 0
    if mitigation in ("persistent", "both"):
        config.mitigation.persistent = True


def expand(study: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every run of the study, in a stable order; cells that would repeat a run are dropped.

    A method that is always persistent (pdwp) has no separate persistent cells, and a method
    without a persistent variant (static) none at all.
    """
    from nbjax import config as config_lib
    from nbjax import pruning

    g = study.grid
    for m in g.mitigations:
        if m not in MITIGATIONS:
            raise ValueError(f"grid.mitigations has {m!r}; allowed: {list(MITIGATIONS)}")
    prunes = [m for m in pruning.registered() if m != DENSE]
    for m in g.methods:
        if m not in prunes:
            raise ValueError(f"grid.methods has {m!r}; allowed: {prunes}")
    cells: list[tuple[str, float, str, int]] = []
    for seed in g.seeds:
        if g.dense:
            cells += [(DENSE, 0.0, mit, seed) for mit in g.mitigations
                      if mit not in PERSISTENT_MITIGATIONS]
        for method in g.methods:
            info = pruning.method(method)
            # A persistent cell repeats the plain one for a method that is always persistent,
            # and does not exist for a method without a persistent variant.
            skip_persistent = info.always_persistent or not info.persistent_variant
            cells += [(method, float(sparsity), mit, seed) for sparsity in g.sparsities
                      for mit in g.mitigations
                      if not (skip_persistent and mit in PERSISTENT_MITIGATIONS)]
    specs = []
    for method, sparsity, mit, seed in cells:
        config = copy.deepcopy(study.base)
        with config.unlocked():
            config.seed = int(seed)
            config.pruning.method = method
            if method != DENSE:
                config.pruning.sparsity = sparsity
            _apply_mitigation(config, mit, g.tome_keep_ratio)
        config_lib.validate(config)
        name = ("dense" if method == DENSE else f"{method}_s{sparsity:g}") + f"_{mit}_seed{seed}"
        specs.append(RunSpec(name, method, sparsity, mit, int(seed), config))
    return specs


def run_dir(workdir: str, spec: RunSpec) -> str:
    return os.path.join(workdir, "runs", spec.name)


def is_finished(path: str) -> bool:
    return os.path.exists(os.path.join(path, "final_metrics.json"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: str) -> bool:
    """Takes the run at ``path`` for this process; False if a live process holds it.

    A claim left by a dead process on this host is taken over (its run resumes from its
    checkpoint); a claim from another host is respected.
    """
    os.makedirs(path, exist_ok=True)
    claim_path = os.path.join(path, ".claim")
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(claim_path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                return False
            if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", 0))):
                os.remove(claim_path)
                continue
            return holder == me
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, ".claim"))


def write_manifest(study: ml_collections.ConfigDict, workdir: str, specs: list[RunSpec]) -> None:
    """``study.json``: the grid and the runs, so the report knows what the study holds."""
    os.makedirs(workdir, exist_ok=True)
    manifest = {
        "grid": study.grid.to_dict(),
        "runs": [dataclasses.asdict(s) | {"config": None, "dir": os.path.join("runs", s.name)}
                 for s in specs],
    }
    for run in manifest["runs"]:
        del run["config"]
    tmp = os.path.join(workdir, "study.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "study.json"))


def estimate_seconds(specs: list[RunSpec], calibration_steps: int = 20) -> dict[str, float]:
    """Seconds each run should take here: its steps at a measured rate, plus compile time.

    Each distinct model variant (token merging on or off) is timed for a few real steps on
    the study's data; pruning adds little per step (masks are multiplied in, updates are
    amortised), so runs of one variant share a rate.
    """
    import jax

    from nbjax.train import loop

    rates: dict[str, tuple[float, float]] = {}
    dataset_cache: dict[str, Any] = {}
    out = {}
    for spec in specs:
        variant = spec.config.mitigation.token_merging.mode
        config = spec.config
        key = json.dumps(config.data.to_dict(), sort_keys=True)
        if key not in dataset_cache:
            from nbjax.data import pipeline as data_lib

            dataset_cache[key] = data_lib.load_dataset(config.data)
        dataset = dataset_cache[key]
        if variant not in rates:
            t0 = time.perf_counter()
            run = loop.build(config, dataset)
            order = loop.BatchOrder(len(dataset.train_labels), config.train.batch_size,
                                    config.seed)
            k = config.train.steps_per_call
            state = run.state
            state, m = run.train_chunk(state, run.train_images, run.train_labels,
                                       loop.train_indices(run, order, 0, k))
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            calls = max(1, calibration_steps // k)
            for c in range(1, calls + 1):
                state, m = run.train_chunk(state, run.train_images, run.train_labels,
                                           loop.train_indices(run, order, c * k, k))
            jax.block_until_ready(m)
            rates[variant] = ((time.perf_counter() - t1) / (calls * k), compile_s)
        per_step, compile_s = rates[variant]
        steps = loop.total_steps(config, len(dataset.train_labels))
        out[spec.name] = compile_s + steps * per_step
    return out


def run_study(study: ml_collections.ConfigDict, workdir: str, dry_run: bool = False,
              log=print) -> dict[str, str]:
    """Runs (or, with ``dry_run``, lists) every run of the study; returns name -> status."""
    from nbjax.train import loop

    specs = expand(study)
    status: dict[str, str] = {}
    if dry_run:
        seconds = estimate_seconds(specs)
        total = 0.0
        for spec in specs:
            path = run_dir(workdir, spec)
            state = "done" if is_finished(path) else (
                "partial" if os.path.isdir(os.path.join(path, "checkpoints")) else "todo")
            status[spec.name] = state
            if state != "done":
                total += seconds[spec.name]
            log(f"{spec.name:<40} {state:<8} ~{seconds[spec.name] / 60:6.1f} min")
        log(f"{len(specs)} runs, {sum(s != 'done' for s in status.values())} to do, "
            f"~{total / 3600:.2f} h on this machine (one process)")
        return status
    write_manifest(study, workdir, specs)
    for i, spec in enumerate(specs):
        path = run_dir(workdir, spec)
        if is_finished(path):
            status[spec.name] = "skipped (finished)"
            continue
        if not claim(path):
            status[spec.name] = "skipped (claimed by another process)"
            continue
        try:
            if is_finished(path):  # finished by another process between the checks
                status[spec.name] = "skipped (finished)"
                continue
            log(f"[{i + 1}/{len(specs)}] {spec.name}")
            loop.train_and_evaluate(spec.config, path)
            status[spec.name] = "ran"
        finally:
            release(path)
    return status


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    from nbjax.parallel import mesh as sharding

    config = config_flags.DEFINE_config_file("config", None, "Study config (.py file).",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Study directory.")
    dry = flags.DEFINE_bool("dry_run", False, "List the runs and estimated times only.")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        logging.set_verbosity(logging.WARNING)
        from nbjax.parallel import runtime

        runtime.enable_compilation_cache()
        try:
            status = run_study(config.value, workdir.value, dry_run=dry.value)
        except ValueError as err:
            sys.exit(f"error: {err}")
        if not dry.value:
            counts: dict[str, int] = {}
            for s in status.values():
                counts[s] = counts.get(s, 0) + 1
            print(json.dumps(counts, indent=2))
            print(f"report: python -m nbjax.report {workdir.value}")

    sharding.use_all_cpu_cores()
    # ``--dry-run`` (the and the README's spelling) is absl's ``--dry_run``.
    argv = [("--dry_run" if a == "--dry-run" else a) for a in (sys.argv if argv is None else argv)]
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
