"""Run claims: several processes or hosts sharing a study directory split its grid.

A process claims a run by creating ``<run>/.claim`` exclusively (its host and pid) and skips
runs claimed by a live process; a claim left by a dead process on the same host is taken over
(the run resumes from its checkpoint), one from another host is respected.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

CLAIM = ".claim"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(path: str) -> dict[str, Any] | None:
    """The live claim on the run at ``path`` ({"host", "pid"}), or None.

    A claim from another host counts as live (its process cannot be asked).
    """
    try:
        with open(os.path.join(path, CLAIM)) as f:
            held = json.load(f)
    except (OSError, ValueError):
        return None
    if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0))):
        return None
    return held


def claim(path: str) -> bool:
    """Takes the run at ``path`` for this process; False if a live process holds it."""
    os.makedirs(path, exist_ok=True)
    claim_path = os.path.join(path, CLAIM)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(claim_path) as f:
                    held = json.load(f)
            except (OSError, ValueError):
                return False
            if held.get("host") == me["host"] and not _pid_alive(int(held.get("pid", 0))):
                os.remove(claim_path)
                continue
            return held == me
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(path: str) -> None:
    """Drops this process's claim on the run at ``path``."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, CLAIM))
