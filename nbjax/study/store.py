"""The records store: ``<records_dir>/<cell>.json``, one record per finished cell, and
``<records_dir>/_grid.json``, the cells the study's grids asked for.

Writes are atomic (a temporary file renamed over the target), so a store shared by several
processes, or committed and continued on another machine, never holds half a record.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

from nbjax.study.records import SCHEMA_VERSION

MANIFEST = "_grid.json"
CELLS = "cells"


def _write_atomic(path: str, text: str) -> None:
    """Writes a temporary file beside ``path`` (unique per process) and renames it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record_path(records_dir: str, cell: str) -> str:
    """Where the record of ``cell`` lives."""
    return os.path.join(records_dir, f"{cell}.json")


def has_record(records_dir: str, cell: str) -> bool:
    """Whether ``cell`` is recorded."""
    return os.path.exists(record_path(records_dir, cell))


def write_record(records_dir: str, record: dict[str, Any]) -> str:
    """Writes ``record`` (compact JSON, sorted keys) as ``<cell>.json``; returns the path."""
    os.makedirs(records_dir, exist_ok=True)
    path = record_path(records_dir, record["cell"])
    _write_atomic(path, json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
    return path


def load_records(records_dir: str) -> list[dict[str, Any]]:
    """Every record in the store, by cell name (files of another schema raise)."""
    out = []
    if not os.path.isdir(records_dir):
        return out
    for name in sorted(os.listdir(records_dir)):
        if name.startswith("_") or not name.endswith(".json"):
            continue
        with open(os.path.join(records_dir, name)) as f:
            record = json.load(f)
        if record.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{name}: record schema {record.get('schema')!r}, this nbjax "
                             f"reads {SCHEMA_VERSION}")
        out.append(record)
    return out


def cells_dir(path: str) -> str:
    """The records directory for ``path``: ``path/cells`` when it exists, else ``path``."""
    sub = os.path.join(path, CELLS)
    return sub if os.path.isdir(sub) else path


def is_store(path: str) -> bool:
    """Whether ``path`` is a records directory or holds one (``cells/``); a run directory
    (``metrics.jsonl``) is not."""
    if os.path.isdir(os.path.join(path, CELLS)) or os.path.exists(os.path.join(path, MANIFEST)):
        return True
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "metrics.jsonl")):
        return False
    for name in sorted(os.listdir(path)):
        if name.endswith(".json") and not name.startswith("_"):
            with open(os.path.join(path, name)) as f:
                return "schema" in json.load(f)
    return False


def read_manifest(records_dir: str) -> dict[str, Any] | None:
    """The store's ``_grid.json`` (study name and expected cells), or None."""
    path = os.path.join(records_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(records_dir: str, name: str, cells: Sequence[dict[str, Any]]) -> None:
    """Adds ``cells`` (identity fields) to the store's manifest: the union over every grid
    run into this store, in first-seen order (delete ``_grid.json`` to start afresh)."""
    os.makedirs(records_dir, exist_ok=True)
    old = read_manifest(records_dir) or {"name": name, "cells": []}
    known = {c["cell"] for c in old["cells"]}
    merged = old["cells"] + [c for c in cells if c["cell"] not in known]
    _write_atomic(os.path.join(records_dir, MANIFEST),
                  json.dumps({"name": old.get("name", name), "cells": merged}, indent=1) + "\n")


def machine() -> dict[str, Any]:
    """Host name, platform, CPU count, JAX backend, device count and version."""
    import jax

    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "device_count": jax.device_count(), "jax_version": jax.__version__}


def _git(root: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def code_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding the nbjax source; None when the
    source is not the top of a git checkout (an installed package)."""
    import nbjax

    root = os.path.dirname(os.path.dirname(os.path.abspath(nbjax.__file__)))
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(root):
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}
