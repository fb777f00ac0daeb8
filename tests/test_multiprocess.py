"""Several processes: ``jax.distributed`` on localhost with Gloo CPU collectives.

Two ``python -m nbjax.main`` processes with 2 CPU devices each form one 4-device mesh and must
train exactly like one process with 4 devices: the same losses and test metrics, the same
final state (restored here, on 1 device, from the collective Orbax checkpoints), and only
process 0 writes the logs. Every child is bounded by a timeout and killed if the test fails.
Also the flag/environment rules of :mod:`nbjax.parallel.distributed` (no processes needed).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import child_env, free_port, run_process_group, smoke_config, smoke_dataset

from nbjax.parallel import distributed
from nbjax.parallel import mesh as sharding
from nbjax.pruning import make_pruner
from nbjax.train import checkpoint, loop

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # the whole group of processes; a cold child needs about 10-20 s alone
STEPS = 8


def _method() -> str:
    """pdwp (masks, pruning and burden state in the checkpoint) if registered, else dense."""
    try:
        make_pruner(smoke_config(**{"pruning.method": "pdwp"}), STEPS)
    except ValueError:
        return "none"
    return "pdwp"


def _overrides(method: str) -> dict:
    return {"train.num_steps": STEPS, "train.log_every": 4, "train.checkpoint_every": 4,
            "train.progress": False, "pruning.method": method, "pruning.sparsity": 0.5,
            "pruning.initial_sparsity": 0.2}


def _command(workdir: Path, overrides: dict, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "nbjax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args + list(extra)


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restore(workdir: Path, run: loop.Run):
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == STEPS
    state = ckpt.restore(checkpoint.abstract_like(run.state))
    ckpt.close()
    return state


def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    method = _method()
    overrides = _overrides(method)
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    commands = [
        (_command(two, overrides, "--coordinator_address", f"127.0.0.1:{port}",
                  "--num_processes", "2", "--process_id", str(i)), child_env(2))
        for i in range(2)
    ]
    commands.append((_command(one, overrides), child_env(4)))
    logs = [tmp_path / "process0.log", tmp_path / "process1.log", tmp_path / "reference.log"]
    run_process_group(commands, logs, TIMEOUT_S)

    out0, out1 = logs[0].read_text(), logs[1].read_text()
    assert "process 0 of 2 (explicit): 2 local of 4 cpu devices" in out0
    assert "process 1 of 2 (explicit): 2 local of 4 cpu devices" in out1
    assert '"test/accuracy"' in out0 and '"test/accuracy"' not in out1  # only 0 reports

    # the same losses and metrics at every logged step, each step logged once (by process 0)
    got, want = _metrics(two), _metrics(one)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 8]
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for key, value in w.items():
            if key == "train/images_per_sec":
                continue
            if isinstance(value, float):
                np.testing.assert_allclose(g[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                assert g[key] == value, key
    final_two = json.loads((two / "final_metrics.json").read_text())
    final_one = json.loads((one / "final_metrics.json").read_text())
    assert final_two["test/accuracy"] == final_one["test/accuracy"]
    np.testing.assert_allclose(final_two["test/loss"], final_one["test/loss"], rtol=1e-5)
    assert json.loads((two / "config.json").read_text())["pruning"]["method"] == method

    # the collective checkpoints hold the same state; both restore here on 1 device
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [
        "4", "8"]
    run = loop.build(smoke_config(**overrides), smoke_dataset(),
                     mesh=sharding.make_mesh(jax.devices()[:1]))
    state_two, state_one = _restore(two, run), _restore(one, run)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state_two)[0],
                            jax.tree.leaves(state_one), strict=True):
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == bool or np.issubdtype(a.dtype, np.integer):  # masks, steps: exactly
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif "['key']['bias']" in name:  # zero gradient: Adam-scaled noise (test_sharding.py)
            np.testing.assert_allclose(a, b, atol=2e-3 * STEPS, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ flags and environment


def test_explicit_flags_win_over_environment():
    env = {distributed.ENV_COORDINATOR: "envhost:1", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    s = distributed.resolve("flaghost:2", None, 1, environ=env, cloud_tpu=False)
    assert (s.call, s.coordinator_address, s.num_processes, s.process_id) == (
        True, "flaghost:2", 4, 1)
    s = distributed.resolve(environ=env, cloud_tpu=False)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("envhost:1", 4, 3)


def test_single_process_and_off_do_not_initialize():
    assert not distributed.resolve(environ={}, cloud_tpu=False).call
    assert not distributed.resolve(num_processes=1, environ={}, cloud_tpu=False).call
    env = {distributed.ENV_MODE: "off", distributed.ENV_NUM_PROCESSES: "2"}
    assert not distributed.resolve(environ=env, cloud_tpu=True).call


def test_cloud_tpu_and_on_use_jax_auto_detection():
    s = distributed.resolve(environ={}, cloud_tpu=True)
    assert s.call and s.coordinator_address is None and s.num_processes is None
    s = distributed.resolve(mode="on", environ={}, cloud_tpu=False)
    assert s.call and s.coordinator_address is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "missing: --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2), "missing: --process_id"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "must be in [0, 2)"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(num_processes=0), ">= 1"),
    (dict(mode="sometimes"), "allowed"),
])
def test_bad_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        distributed.resolve(environ={}, cloud_tpu=False, **kwargs)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match=distributed.ENV_NUM_PROCESSES):
        distributed.resolve(environ={distributed.ENV_NUM_PROCESSES: "two"}, cloud_tpu=False)


def test_main_rejects_incomplete_settings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nbjax.main", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path), "--num_processes", "2"],
        cwd=ROOT, env=child_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "missing: --coordinator_address, --process_id" in proc.stderr
