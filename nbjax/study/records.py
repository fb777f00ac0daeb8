"""A cell's record: what the study keeps of a finished run, read from its run directory.

A record is one compact JSON object (``docs/study.md`` lists its fields): the cell's
identity, the resolved config, the final metrics, the burden summaries at the end of pruning
and at the end of training, key trajectories subsampled to about :data:`TRAJECTORY_POINTS`
points, and the wall time. The report is rebuilt from records alone, so run directories
(checkpoints and full logs) need not be kept.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
TRAJECTORY_POINTS = 50
SUMMARY_PREFIXES = ("burden/", "pruning/sparsity")
TRAIN_KEYS = ("train/loss", "train/accuracy", "pruning/sparsity", "burden/index",
              "burden/selection_index", "burden/compensation_index")
WALL_TIME_FILE = "wall_time.json"


def finite(value: Any) -> Any:
    """The value with non-finite floats as None (records are standard JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_log(run_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, test lines) of ``metrics.jsonl``, by step, one line per step.

    Train lines hold ``train/loss``; test lines hold ``test/accuracy`` (the final line too).
    """
    train: dict[int, dict[str, Any]] = {}
    test: dict[int, dict[str, Any]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if "train/loss" in record:
                    train[int(record["step"])] = record
                if "test/accuracy" in record:
                    test[int(record["step"])] = record
    return [train[s] for s in sorted(train)], [test[s] for s in sorted(test)]


def final_sparsity_step(config: dict[str, Any], total_steps: int) -> int | None:
    """The pruner's first step at the final sparsity (None: at it from step 0)."""
    import ml_collections

    from nbjax import pruning

    return pruning.make_pruner(ml_collections.ConfigDict(config),
                               int(total_steps)).final_sparsity_step


def end_of_pruning(train: list[dict[str, Any]], first_final: int | None) -> dict[str, Any]:
    """The first line whose step index (``step`` - 1) is >= ``first_final``; the last line
    when None or when no line reaches it."""
    if not train:
        return {}
    if first_final is not None:
        for line in train:
            if line["step"] - 1 >= first_final:
                return line
    return train[-1]


def summary(line: dict[str, Any]) -> dict[str, Any]:
    """The line's step and every ``burden/...`` and ``pruning/sparsity...`` value."""
    out = {"step": line.get("step")}
    out.update({k: finite(v) for k, v in sorted(line.items())
                if k.startswith(SUMMARY_PREFIXES)})
    return out


def _rounded(value: Any) -> Any:
    """Six significant digits: trajectories are for plots, not for statistics."""
    value = finite(value)
    return float(f"{value:.6g}") if isinstance(value, float) else value


def subsample(lines: list[dict[str, Any]], keys: tuple[str, ...],
              points: int = TRAJECTORY_POINTS) -> dict[str, list[Any]]:
    """Columns ``step`` and each key any line holds, at about ``points`` evenly spaced lines
    (the first and last included)."""
    if len(lines) > points:
        index = np.unique(np.round(np.linspace(0, len(lines) - 1, points)).astype(int))
        lines = [lines[i] for i in index]
    columns: dict[str, list[Any]] = {"step": [line["step"] for line in lines]}
    for key in keys:
        if any(key in line for line in lines):
            columns[key] = [_rounded(line.get(key)) for line in lines]
    return columns


def read_wall_time(run_dir: str) -> float | None:
    """Seconds the study spent training this run, over every session (None if unknown)."""
    path = os.path.join(run_dir, WALL_TIME_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return float(json.load(f)["seconds"])


def add_wall_time(run_dir: str, seconds: float) -> float:
    """Adds one session's seconds to the run's wall time; returns the total."""
    total = (read_wall_time(run_dir) or 0.0) + float(seconds)
    path = os.path.join(run_dir, WALL_TIME_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"seconds": total}, f)
    os.replace(path + ".tmp", path)
    return total


def from_run_dir(run_dir: str, cell: dict[str, Any]) -> dict[str, Any]:
    """The record of the finished run in ``run_dir`` (``cell``: the grid's identity fields);
    ``machine`` and ``code`` are left None for the caller to fill."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        final = {k: finite(v) for k, v in json.load(f).items()}
    train, test = read_log(run_dir)
    first_final = final_sparsity_step(config, final["train/steps"])
    pruned = summary(end_of_pruning(train, first_final))
    pruned["final_sparsity_step"] = first_final
    return {
        "schema": SCHEMA_VERSION, **cell, "config": config, "final": final,
        "end_of_pruning": pruned,
        "end_of_training": summary(train[-1]) if train else {},
        "trajectories": {"train": subsample(train, TRAIN_KEYS),
                         "test": subsample(test, ("test/accuracy",))},
        "wall_time_s": read_wall_time(run_dir), "machine": None, "code": None,
    }
