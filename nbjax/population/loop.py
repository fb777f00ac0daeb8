"""The population loop: trains the members of a population together, each into its own run dir.

A population's directory holds what only the population has: its one checkpoint of the whole
member-stacked state (``checkpoints/``) and ``population.json``, which names the members and
their work directories. Each member's work directory is an ordinary run directory, as
:func:`nbjax.train.loop.train_and_evaluate` writes it: ``config.json`` with the member's own
values, ``metrics.jsonl`` with the member's metrics, ``flops.json``, TensorBoard events, the
final checkpoint of the member's own state and ``final_metrics.json`` (written last), so the
tools that read runs (report, study records, visualize, eval, export) read a member unchanged.

Everything is a function of the step, as in the single loop: member i takes the batches of
:class:`nbjax.train.order.BatchOrder` with its own seed, so a population stopped at a
checkpoint and started again ends bit for bit as one that never stopped. The locks, stop
signals, checkpoint cadence and non-finite checks are the single loop's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from nbjax import config as config_lib
from nbjax import errors
from nbjax.data import pipeline as data_lib
from nbjax.parallel import mesh as sharding_lib
from nbjax.population import build as build_lib
from nbjax.population import members as members_lib
from nbjax.tome import cost as flops_lib
from nbjax.train import checkpoint as checkpoint_lib
from nbjax.train import loop as loop_lib
from nbjax.train import metrics_log
from nbjax.train import order as order_lib
from nbjax.train import tensorboard as tensorboard_lib
from nbjax.train import workdir as workdir_lib

POPULATION_FILE = "population.json"  # in the population's directory: its members, in order


@dataclass
class _Member:
    """One member's run directory and the writers the loop keeps open on it."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    log: metrics_log.MetricsLog
    board: tensorboard_lib.TensorBoardWriter


def train_population(configs: Sequence[ml_collections.ConfigDict],
                     workdirs: Sequence[str | os.PathLike], directory: str | os.PathLike,
                     dataset: data_lib.Dataset | None = None,
                     mesh: Any = None) -> list[dict[str, Any]]:
    """Trains the population of ``configs`` (member i into ``workdirs[i]``), resuming from
    ``directory``; returns each member's final metrics, as its run alone would.

    The population's directory and every member's directory are locked for the run; a
    member's config is checked against its stored one as a single run's is. A population
    whose members have all finished returns their final metrics and writes nothing.
    """
    configs, workdirs = list(configs), [epath.Path(w) for w in workdirs]
    directory = epath.Path(directory)
    _check_members(configs, workdirs, directory)
    with contextlib.ExitStack() as stack:
        stack.enter_context(workdir_lib.hold(directory))
        record = _population_record(configs, workdirs, directory)
        _check_population_file(directory, record)  # before any member directory is made
        for workdir in workdirs:
            stack.enter_context(workdir_lib.hold(workdir))
        changes = [workdir_lib.check_resume(w, c) for c, w in zip(configs, workdirs, strict=True)]
        finals = [loop_lib.final_metrics(w) for w in workdirs]
        if all(final is not None for final in finals):
            return finals
        population = build_lib.build(configs, dataset, mesh)
        ckpt = checkpoint_lib.Checkpointer(directory / "checkpoints",
                                           keep=configs[0].train.keep_checkpoints)
        stack.callback(ckpt.close)
        state, start = loop_lib.restore(population, ckpt)
        if jax.process_index() == 0:
            metrics_log.write_atomic(directory / POPULATION_FILE, json.dumps(record, indent=2))
        members = _start_members(population, workdirs, start, changes, stack)
        state, step = _train_steps(population, ckpt, state, start, members)
        return _finish(population, ckpt, state, step, members)


def _check_members(configs: list[ml_collections.ConfigDict], workdirs: list[epath.Path],
                   directory: epath.Path) -> None:
    """Valid configs that may share a program, and one distinct directory per member."""
    if len(configs) != len(workdirs):
        raise errors.ConfigError(f"{len(configs)} member configs but {len(workdirs)} work "
                                 "directories", "give one work directory per member")
    for config in configs:
        config_lib.validate(config)
    members_lib.check(configs)
    paths = [os.fspath(path) for path in (directory, *workdirs)]
    if len(set(paths)) != len(paths):
        raise errors.ConfigError("the population directory and the members' work directories "
                                 f"are not all distinct ({', '.join(paths)})",
                                 "give each member its own work directory")


def _relative(workdir: epath.Path, directory: epath.Path) -> str:
    """``workdir`` relative to ``directory`` (so the two can move together), or a URL."""
    if "://" in os.fspath(workdir) or "://" in os.fspath(directory):
        return os.fspath(workdir)
    return os.path.relpath(os.fspath(workdir), os.fspath(directory))


def _population_record(configs: list[ml_collections.ConfigDict], workdirs: list[epath.Path],
                       directory: epath.Path) -> dict[str, Any]:
    """What population.json holds: each member's work directory and per-member values."""
    keys = members_lib.member_keys(configs[0])
    return {"members": [
        {"workdir": _relative(workdir, directory),
         **{key: config_lib.get(config, key) for key in keys}}
        for config, workdir in zip(configs, workdirs, strict=True)]}


def _check_population_file(directory: epath.Path, record: dict[str, Any]) -> None:
    """Raises ConfigError if ``directory`` holds a population of other members."""
    path = directory / POPULATION_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())["members"]
    except (ValueError, KeyError, TypeError) as err:
        raise errors.WorkdirError(f"{path} is unreadable ({err})",
                                  "restore it, or use another population directory") from err
    if stored == record["members"]:
        return
    pairs = zip(stored, record["members"], strict=False)
    differ = next((f"member {i}: {a} there, {b} now" for i, (a, b) in enumerate(pairs) if a != b),
                  f"{len(stored)} members there, {len(record['members'])} now")
    raise errors.ConfigError(f"{directory} holds a population of other members ({differ})",
                             f"train these members in another population directory, or "
                             f"resume with the members {path} names")


def _start_members(population: build_lib.Population, workdirs: list[epath.Path], start: int,
                   changes: list[dict[str, Any]], stack: contextlib.ExitStack) -> list[_Member]:
    """Writes each member's config.json and flops.json, opens its metrics log and writer."""
    is_main = jax.process_index() == 0
    flops = None
    if is_main:  # one program: the same tokens and FLOPs for every member, computed once
        flops = flops_lib.startup_report(population.configs[0], population.dataset.num_classes,
                                         population.dataset.image_shape)
    members = []
    for config, workdir, change in zip(population.configs, workdirs, changes, strict=True):
        workdir_lib.record_start(workdir, config, start, change, False)
        if flops is not None:
            metrics_log.write_atomic(workdir / "flops.json",
                                     json.dumps(flops.to_dict(), indent=2))
        log = metrics_log.MetricsLog(workdir / "metrics.jsonl", start, enabled=is_main)
        board = stack.enter_context(
            tensorboard_lib.make_writer(config, workdir, start, enabled=is_main))
        members.append(_Member(config=config, workdir=workdir, log=log, board=board))
    return members


class _MemberArrays:
    """Member ``index``'s params and masks, sliced only when asked for (TensorBoard's
    histograms read them only at log steps that follow a mask update)."""

    def __init__(self, state: Any, index: int) -> None:
        self._state, self._index = state, index

    @property
    def params(self) -> Any:
        return jax.tree.map(lambda x: x[self._index], self._state.params)

    @property
    def masks(self) -> Any:
        return jax.tree.map(lambda x: x[self._index], self._state.masks)


class _PendingMembers:
    """The per-step metrics[k, N] of the calls since the host last looked, still on the
    device; :meth:`fetch` checks every member's steps as a single run's."""

    def __init__(self, workdirs: list[epath.Path], resume_note: Any) -> None:
        self._workdirs, self._resume_note = workdirs, resume_note
        self._calls: list[tuple[int, dict[str, Any]]] = []

    def add(self, first_step: int, metrics: dict[str, Any]) -> None:
        self._calls.append((first_step, metrics))

    def fetch(self) -> list[dict[str, np.ndarray]] | None:
        """One transfer; NonFiniteError naming the member if any of its watched metrics is
        not finite; else each member's metrics of the last step."""
        if not self._calls:
            return None
        watched = [{k: m[k] for k in metrics_log.WATCHED if k in m} for _, m in self._calls]
        watched, last = jax.device_get((watched, self._calls[-1][1]))
        starts = [first for first, _ in self._calls]
        self._calls.clear()
        for i, workdir in enumerate(self._workdirs):
            member = metrics_log.PendingMetrics(self._resume_note)
            for first, values in zip(starts, watched, strict=True):
                member.add(first, {k: np.asarray(v)[:, i] for k, v in values.items()})
            try:
                member.fetch()
            except errors.NonFiniteError as err:
                raise errors.NonFiniteError(f"population member {workdir}: {err.what}",
                                            err.fix) from err
        return [{k: np.asarray(v)[-1, i] for k, v in last.items()}
                for i in range(len(self._workdirs))]


class _Progress:
    """The loop's host side: pending device metrics, the progress bar, the members' logs."""

    def __init__(self, population: build_lib.Population, ckpt: checkpoint_lib.Checkpointer,
                 start: int, members: list[_Member]) -> None:
        self.population, self.members = population, members
        self.pending = _PendingMembers([m.workdir for m in members], ckpt.resume_note)
        train_cfg = population.configs[0].train
        self.bar = tqdm(total=population.total_steps, initial=start, unit="step",
                        dynamic_ncols=True,
                        disable=not (train_cfg.progress and jax.process_index() == 0))
        self.last_step, self.last_time = start, time.perf_counter()

    def log_step(self, state: Any, before: int, step: int) -> None:
        """Fetches (and checks) the pending metrics, evaluates if due, writes each member's
        record; a member's images/s is its own batch over the wall time, as if alone."""
        records = self.pending.fetch()
        train_cfg = self.population.configs[0].train
        now = time.perf_counter()
        rate = (step - self.last_step) * train_cfg.batch_size / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        tests = (evaluate(self.population, state)
                 if order_lib.crossed(before, step, train_cfg.eval_every) else None)
        for i, (member, record) in enumerate(zip(self.members, records, strict=True)):
            record["train/images_per_sec"] = rate
            if tests is not None:
                record.update(tests[i])
            member.log.write(step, record)
            member.board.log(step, record, _MemberArrays(state, i))
        self.bar.set_postfix(loss=f"{np.mean([r['train/loss'] for r in records]):.4f}",
                             acc=f"{np.mean([r['train/accuracy'] for r in records]):.3f}",
                             img_s=f"{rate * len(records):.0f}")


def train_indices(population: build_lib.Population, orders: list[order_lib.BatchOrder],
                  step: int, num_steps: int) -> jax.Array:
    """The [num_steps, N, batch] example indices of the next call: member i's block of its
    own batch order, split over the mesh's member and data axes (each process transfers only
    what its devices hold)."""
    block = np.stack([order.block(step, num_steps) for order in orders], axis=1)
    sharding = NamedSharding(population.mesh,
                             P(None, sharding_lib.MEMBER_AXIS, sharding_lib.DATA_AXIS))
    return sharding_lib.put_batch(block, sharding)


def _train_steps(population: build_lib.Population, ckpt: checkpoint_lib.Checkpointer,
                 state: Any, start: int, members: list[_Member]) -> tuple[Any, int]:
    """Runs the population's compiled calls from ``start`` to the end, each member on its own
    batch order, through the single run's :func:`nbjax.train.loop.run_calls`."""
    orders = [order_lib.BatchOrder(len(population.dataset.train_labels),
                                   config.train.batch_size, config.seed)
              for config in population.configs]
    return loop_lib.run_calls(
        population, ckpt, state, start, _Progress(population, ckpt, start, members),
        lambda step, num_steps: train_indices(population, orders, step, num_steps))


def evaluate(population: build_lib.Population, state: Any) -> list[dict[str, float]]:
    """Each member's test loss and accuracy over every test example exactly once, summed on
    the host as :func:`nbjax.train.loop.evaluate` sums a single run's."""
    sharding = sharding_lib.batch_sharding(population.mesh)
    sums = []
    for idx, valid in loop_lib.eval_batches(len(population.dataset.test_labels),
                                            population.configs[0].train.eval_batch_size):
        sums.append(population.eval_step(
            state.params, state.masks, population.test_images, population.test_labels,
            sharding_lib.put_batch(idx, sharding), sharding_lib.put_batch(valid, sharding)))
    sums = jax.device_get(sums)
    out = []
    for i in range(population.size):
        total = {k: float(sum(np.float64(s[k][i]) for s in sums)) for k in sums[0]}
        out.append({"test/accuracy": total["correct"] / total["count"],
                    "test/loss": total["loss"] / total["count"]})
    return out


def _finish(population: build_lib.Population, ckpt: checkpoint_lib.Checkpointer, state: Any,
            step: int, members: list[_Member]) -> list[dict[str, Any]]:
    """Final evaluation, the population's final checkpoint, each member's own final
    checkpoint in its run directory, then each final_metrics.json (which marks the end)."""
    finals = evaluate(population, state)
    for i, (member, final) in enumerate(zip(members, finals, strict=True)):
        final["train/steps"] = step
        member.log.write(step, {**final, "final": True})
        member.board.log(step, final)
        run = types.SimpleNamespace(config=member.config, dataset=population.dataset)
        tensorboard_lib.log_merge_picture(member.board, run, _MemberArrays(state, i), step)
    if ckpt.latest_step() != step:
        ckpt.save(step, state, force=True)
    ckpt.wait()
    for i, member in enumerate(members):
        own = checkpoint_lib.Checkpointer(member.workdir / "checkpoints",
                                          keep=member.config.train.keep_checkpoints)
        try:
            if own.latest_step() != step:
                own.save(step, build_lib.member_state(state, i), force=True)
        finally:
            own.close()
    if jax.process_index() == 0:
        for member, final in zip(members, finals, strict=True):
            metrics_log.write_atomic(member.workdir / loop_lib.FINAL_METRICS,
                                     json.dumps(final, indent=2))
    return finals
