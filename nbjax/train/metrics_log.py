"""The run's metrics on the host: ``metrics.jsonl``, and the device metrics not yet looked at.

``metrics.jsonl`` holds one JSON object per logged step. On resume the lines past the resume
step are dropped (the resumed run writes them again, identically), and so is a line cut short
by a kill or a full disk, with a warning naming it. The per-step metrics of the compiled calls
stay on the device until the loop syncs anyway (a log step, a checkpoint); then one transfer
brings back the loss and gradient norm of every pending step, checked to be finite, and the
last step's metrics.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from nbjax.errors import NonFiniteError

WATCHED = ("train/loss", "train/grad_norm")  # must be finite at every step


def write_atomic(path: epath.Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _to_python(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsLog:
    """JSON-lines metrics, one object per line with its step; resume drops lines past it."""

    def __init__(self, path: str | os.PathLike, resume_step: int, enabled: bool = True) -> None:
        self.path, self.enabled = epath.Path(path), enabled
        self._lines: list[str] = []
        if enabled and self.path.exists():
            self._lines = self._lines_up_to(resume_step)
            write_atomic(self.path, "".join(self._lines))

    def _lines_up_to(self, resume_step: int) -> list[str]:
        """The complete lines of steps up to ``resume_step``, the final record excluded."""
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                where = "its last line" if number == len(lines) else f"line {number}"
                print(f"warning: {self.path}: dropped {where}, which is not complete JSON "
                      f"(a write cut short): {line[:60]!r}", file=sys.stderr)
                continue
            if record.get("step", 0) <= resume_step and not record.get("final"):
                kept.append(line + "\n")
        return kept

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        line = json.dumps(record) + "\n"
        if "://" not in str(self.path):  # a local file: append
            with self.path.open("a") as f:
                f.write(line)
        else:  # object stores (gs://) cannot append: rewrite the whole (small) file
            self._lines.append(line)
            write_atomic(self.path, "".join(self._lines))


class PendingMetrics:
    """The per-step metrics of the calls since the host last looked, still on the device.

    ``resume_note()`` says where a re-run would resume; it ends the non-finite error.
    """

    def __init__(self, resume_note: Callable[[], str]) -> None:
        self._calls: list[tuple[int, dict[str, Any]]] = []  # (first step, metrics[k])
        self._resume_note = resume_note

    def add(self, first_step: int, metrics: dict[str, Any]) -> None:
        self._calls.append((first_step, metrics))

    def fetch(self) -> dict[str, np.ndarray] | None:
        """One transfer: every pending step's loss and gradient norm, checked to be finite
        (else NonFiniteError naming the first bad step), and the last step's metrics."""
        if not self._calls:
            return None
        watched = [{k: m[k] for k in WATCHED if k in m} for _, m in self._calls]
        watched, last = jax.device_get((watched, self._calls[-1][1]))
        starts = [first for first, _ in self._calls]
        self._calls.clear()
        for first, values in zip(starts, watched, strict=True):
            finite = np.all([np.isfinite(np.asarray(v)) for v in values.values()], axis=0)
            if not np.all(finite):
                index = int(np.argmin(finite))
                self._raise_non_finite(first + index + 1, {k: float(np.asarray(v)[index])
                                                           for k, v in values.items()})
        return {k: np.asarray(v)[-1] for k, v in last.items()}

    def _raise_non_finite(self, step: int, values: dict[str, float]) -> None:
        shown = ", ".join(f"{k.split('/')[-1]} {v}" for k, v in values.items())
        raise NonFiniteError(
            f"train loss or gradient norm is not finite at step {step} ({shown}); nothing "
            f"after the last checkpoint was saved",
            "lower train.learning_rate, keep train.grad_clip_norm > 0 or check the data, then "
            f"re-run with --allow_config_change: {self._resume_note()}")
