"""A run's work directory: one run at a time in it, resumed only with the config it began with.

The lock is ``WORKDIR/.lock``, created exclusively, naming its holder (host, PID, start time,
command); a second run refuses while the holder lives, and a lock left by a dead process on
this host is taken over. A process on another host cannot be asked, so its lock holds until
removed by hand. Object stores (``gs://``) cannot create a file exclusively, so such a work
directory is not locked. A study's claim on a run (``.claim``, :mod:`nbjax.study.claims`) is
another file: the study process holds the claim, then the run inside it takes this lock.

``config.json`` is written once, when the run starts. A re-run compares its config with the
stored one (plus the changes recorded since): a key that changes the trajectory refuses,
listing each such key with both values; the keys of :data:`SAFE_KEYS` only change logging,
evaluation and checkpoint cadence and pass. ``allow_config_change`` overrides the refusal;
every change that passes is recorded in ``config_changes.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from nbjax import config as config_lib
from nbjax.errors import WorkdirError

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
CHANGES_NAME = "config_changes.jsonl"
# Keys that cannot change the trained parameters or the logged training metrics' values.
# steps_per_call: the compiled step body is the same for any call length (checked bit for bit
# on CPU, docs/reliability.md); only which steps are logged and checkpointed moves.
SAFE_KEYS = frozenset({
    "train.log_every", "train.progress", "train.eval_every", "train.eval_batch_size",
    "train.checkpoint_every", "train.keep_checkpoints", "train.steps_per_call",
    "data.cache_dir",
})
_ABSENT = "(absent)"


def is_safe(key: str) -> bool:
    """Whether changing ``key`` on resume leaves the training trajectory as it was."""
    return key in SAFE_KEYS or any(part.startswith("tensorboard") for part in key.split("."))


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), which tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run (a process on another host always may)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = holder.get("process_start")
    return recorded is None or _process_start(pid) in (None, recorded)


class WorkdirLock:
    """``WORKDIR/.lock``: held by one live process at a time (see the module docstring)."""

    def __init__(self, workdir: epath.Path) -> None:
        self.workdir, self.path = workdir, os.fspath(workdir / LOCK_NAME)
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirError naming the live holder."""
        if "://" in str(self.workdir):
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise WorkdirError(f"could not take the lock {self.path}",
                           "another run keeps taking it; wait for it to finish")

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder is None:  # being written this instant, or torn: stale once it is old
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(self.path) < 60:
                    raise WorkdirError(f"{self.workdir} is being locked by another run",
                                       "wait for it to finish, or use another --workdir")
        elif _alive(holder):
            raise WorkdirError(
                f"{self.workdir} is in use by another run: PID {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')} "
                f"({holder.get('command', '?')})",
                f"wait for it to finish or stop it; if it is gone for good, delete {self.path}")
        else:
            print(f"warning: taking over the lock of PID {holder.get('pid')} (no longer "
                  f"running) in {self.workdir}", file=sys.stderr)
        if holder == self._holder():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


@contextlib.contextmanager
def hold(workdir: epath.Path) -> Iterator[None]:
    """Makes ``workdir`` and holds its lock for the run; process 0 locks and every process
    learns whether it could, so all of them stop together if not."""
    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            if workdir.exists() and not workdir.is_dir():
                raise WorkdirError(f"--workdir {workdir} is a file, not a directory",
                                   "give the path of a directory (it is created if missing)")
            workdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except WorkdirError as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
            error = WorkdirError(f"process 0 could not use {workdir}", "see its output")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def _flat_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return config_lib.flat_items(json.loads(config_lib.to_json(config)))


def _recorded_changes(workdir: epath.Path) -> list[dict[str, Any]]:
    path = workdir / CHANGES_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored_config(workdir: epath.Path) -> dict[str, Any] | None:
    """The run's config by dotted key: config.json plus the changes recorded since, or None."""
    path = workdir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        stored = config_lib.flat_items(json.loads(path.read_text()))
        for record in _recorded_changes(workdir):
            stored.update({key: new for key, (_, new) in record["changes"].items()})
    except (ValueError, KeyError, TypeError) as err:
        raise WorkdirError(f"{path} or its {CHANGES_NAME} is unreadable ({err})",
                           "restore it, or train in a new --workdir") from err
    return stored


def config_changes(workdir: epath.Path,
                   config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored, new)}`` for every key whose value differs from the run's config.

    A key missing from the stored config (added to the schema since) counts only when the
    new value is not its default.
    """
    stored = stored_config(workdir)
    if stored is None:
        return {}
    new, defaults = _flat_json(config), _flat_json(config_lib.base_config())
    changes = {}
    for key in sorted(set(stored) | set(new)):
        old, value = stored.get(key, _ABSENT), new.get(key, _ABSENT)
        if old == value or value == _ABSENT or (old == _ABSENT and value == defaults.get(key)):
            continue
        changes[key] = (old, value)
    return changes


def check_resume(workdir: epath.Path, config: ml_collections.ConfigDict,
                 allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
    """The config changes since the run began; raises WorkdirError for a change of a key
    that changes the trajectory, unless ``allow_change``."""
    changes = config_changes(workdir, config)
    unsafe = {key: pair for key, pair in changes.items() if not is_safe(key)}
    if unsafe and not allow_change:
        listed = "; ".join(f"{key}: {old!r} there, {new!r} now"
                           for key, (old, new) in unsafe.items())
        raise WorkdirError(
            f"{workdir} holds a run with another config ({listed})",
            f"run with the config stored in {workdir / CONFIG_NAME}, use a new --workdir, or "
            f"pass --allow_config_change to continue this run with the new values (recorded "
            f"in {CHANGES_NAME})")
    return changes


def record_start(workdir: epath.Path, config: ml_collections.ConfigDict, step: int,
                 changes: dict[str, tuple[Any, Any]], allowed: bool) -> None:
    """Writes config.json if the run is new, and appends ``changes`` (if any) to
    config_changes.jsonl with the step they apply from. Process 0 only."""
    if jax.process_index() != 0:
        return
    path = workdir / CONFIG_NAME
    if not path.exists():
        tmp = workdir / (CONFIG_NAME + ".tmp")
        tmp.write_text(config_lib.to_json(config))
        tmp.replace(path)
    if changes:
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "step": int(step),
                  "allow_config_change": bool(allowed),
                  "changes": {key: [old, new] for key, (old, new) in changes.items()}}
        lines = "".join(json.dumps(r) + "\n" for r in [*_recorded_changes(workdir), record])
        tmp = workdir / (CHANGES_NAME + ".tmp")
        tmp.write_text(lines)
        tmp.replace(workdir / CHANGES_NAME)
