"""Records: what a cell's record holds, read from a hand-written run directory, and the store."""

import json
import os
import re

import pytest

from nbjax import config as config_lib
from nbjax.study import records, store

CELL = {"cell": "gmp_s0.9_none_seed0", "method": "gmp", "sparsity": 0.9, "mitigation": "none",
        "arm": "none", "seed": 0, "variant": {}}


def _config(method="gmp", steps=24):
    config = config_lib.base_config()
    config.pruning.method = method
    config.train.num_steps = steps
    return config


def _line(step, **extra):
    return {"step": step, "train/loss": 1.0 / step, "train/accuracy": 0.5,
            "burden/index": 1.0 + step / 100, "burden/load/block_0": 2.0,
            "pruning/sparsity": min(step / 20, 0.9), "pruning/sparsity/block_0/fc1/kernel": 0.9,
            "pruning/num_updates": step, "train/images_per_sec": 1e3, **extra}


def write_run(path, method="gmp", lines=None, final_acc=0.75):
    """A finished run directory as nbjax.train.loop writes it (24 steps, logged every 2)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_lib.to_json(_config(method)))
    lines = lines if lines is not None else [_line(s) for s in range(2, 25, 2)]
    final = {"test/accuracy": final_acc, "test/loss": 0.5, "train/steps": 24}
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.write(json.dumps({"step": 24, **final, "final": True}) + "\n")
    with open(os.path.join(path, "final_metrics.json"), "w") as f:
        json.dump(final, f)
    return path


def test_end_of_pruning_is_the_first_line_at_the_final_sparsity(tmp_path):
    # 24 steps: t0 = floor(0.1·24 + 0.5) = 2, t1 = floor(0.7·24 + 0.5) = 17, so the network is
    # at its final sparsity from step index 18. A line with "step": S holds step index S - 1:
    # line 18 holds index 17 (too early), line 20 holds index 19, the first at or after 18.
    assert records.final_sparsity_step(_config().to_dict(), 24) == 18
    record = records.from_run_dir(write_run(str(tmp_path / "gmp")), CELL)
    assert record["end_of_pruning"]["step"] == 20
    assert record["end_of_pruning"]["final_sparsity_step"] == 18
    assert record["end_of_pruning"]["burden/index"] == pytest.approx(1.20)
    assert record["end_of_training"]["step"] == 24
    # A method at its sparsity from step 0 (static): the last line.
    assert records.final_sparsity_step(_config("static").to_dict(), 24) is None
    static = records.from_run_dir(write_run(str(tmp_path / "static"), "static"), CELL)
    assert static["end_of_pruning"]["step"] == 24


def test_record_fields(tmp_path):
    lines = [_line(s) for s in range(2, 25, 2)]
    lines[3]["burden/compensation_index"] = float("nan")  # not finite -> null in the record
    lines[4]["test/accuracy"] = 0.7  # an evaluation during training, at step 10
    lines.insert(6, _line(12, **{"train/loss": 9.0}))  # step 12 again: the later line counts
    record = records.from_run_dir(write_run(str(tmp_path / "run"), lines=lines), CELL)
    assert record["schema"] == records.SCHEMA_VERSION
    assert {k: record[k] for k in CELL} == CELL
    assert record["config"] == json.loads(config_lib.to_json(_config()))
    assert record["final"] == {"test/accuracy": 0.75, "test/loss": 0.5, "train/steps": 24}
    assert set(record["end_of_training"]) == {
        "step", "burden/index", "burden/load/block_0", "pruning/sparsity",
        "pruning/sparsity/block_0/fc1/kernel"}  # burden/* and pruning/sparsity* only
    train = record["trajectories"]["train"]
    assert train["step"] == list(range(2, 25, 2))  # one line per step, the last one kept
    assert train["train/loss"][5] == 9.0
    assert train["burden/compensation_index"] == [None] * 12
    assert "burden/selection_index" not in train
    assert record["trajectories"]["test"] == {"step": [10, 24], "test/accuracy": [0.7, 0.75]}
    assert record["wall_time_s"] is None and record["machine"] is None


def test_subsample_keeps_about_50_evenly_spaced_points_with_both_ends():
    lines = [{"step": s, "train/loss": float(s)} for s in range(1, 201)]
    columns = records.subsample(lines, ("train/loss", "burden/index"))
    steps = columns["step"]
    assert len(steps) == 50 and steps[0] == 1 and steps[-1] == 200
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    assert gaps <= {4, 5}  # 199 / 49 = 4.06
    assert columns["train/loss"] == [float(s) for s in steps]
    assert "burden/index" not in columns


def test_wall_time_adds_up_over_sessions(tmp_path):
    assert records.read_wall_time(str(tmp_path)) is None
    records.add_wall_time(str(tmp_path), 1.5)
    assert records.add_wall_time(str(tmp_path), 2.0) == 3.5
    assert records.read_wall_time(str(tmp_path)) == 3.5


def test_store_roundtrip_and_manifest(tmp_path):
    cells = str(tmp_path / "study" / "cells")
    path = store.write_record(cells, {"schema": records.SCHEMA_VERSION, **CELL, "x": 1.0})
    assert os.path.basename(path) == "gmp_s0.9_none_seed0.json"
    assert os.listdir(cells) == ["gmp_s0.9_none_seed0.json"]  # no temporary file left
    assert store.has_record(cells, CELL["cell"])
    store.write_manifest(cells, "study", [CELL])
    store.write_manifest(cells, "other", [CELL, {**CELL, "cell": "b"}])  # union, first name
    manifest = store.read_manifest(cells)
    assert manifest["name"] == "study"
    assert [c["cell"] for c in manifest["cells"]] == [CELL["cell"], "b"]
    assert [r["cell"] for r in store.load_records(cells)] == [CELL["cell"]]
    assert store.cells_dir(str(tmp_path / "study")) == cells
    assert store.is_store(str(tmp_path / "study")) and store.is_store(cells)
    run = write_run(str(tmp_path / "run"))
    assert not store.is_store(run)
    with open(os.path.join(cells, "old.json"), "w") as f:
        json.dump({"schema": 0, "cell": "old"}, f)
    with pytest.raises(ValueError, match="schema"):
        store.load_records(cells)


def test_provenance_fields():
    info = store.machine()
    assert set(info) == {"hostname", "platform", "cpu_count", "jax_backend", "device_count",
                         "jax_version"}
    assert info["device_count"] >= 1
    code = store.code_commit()
    if code is not None:  # the tests run from a git checkout of nbjax
        assert re.fullmatch(r"[0-9a-f]{40}", code["commit"])
        assert isinstance(code["dirty"], bool)
