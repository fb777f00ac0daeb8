"""What nbjax guarantees when a run is stopped, fails or is misused (docs/reliability.md).

Every test drives ``python -m nbjax.main`` on configs/smoke.py in a subprocess, as a user
would, and checks the exit status, the one line it prints, and that nothing already written
was lost or changed. Two runs are shared by the module: a reference run that is never
stopped, and a run stopped by SIGTERM part-way, whose work directory the tests copy.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import error_lines, free_port, run_nbjax, snapshot

from nbjax import visualize

ROOT = Path(__file__).resolve().parents[1]
STEPS = 160
SETTINGS = ["--config.train.progress=False", f"--config.train.num_steps={STEPS}",
            "--config.train.log_every=8", "--config.train.checkpoint_every=8"]


def _nbjax(workdir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return run_nbjax("--workdir", str(workdir), *SETTINGS, *extra, **kwargs)


def _timeless(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train/images_per_sec"}
            for line in lines]


def _final_fingerprint(workdir: Path) -> list[int]:
    """The fingerprint saved with the last checkpoint: equal ones mean bit-identical states."""
    meta = json.loads((workdir / "checkpoints" / str(STEPS) / "_CHECKPOINT_METADATA").read_text())
    return meta["custom_metadata"]["nbjax_fingerprint"]


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run never stopped; its directory held a stale lock of a dead process beforehand."""
    workdir = tmp_path_factory.mktemp("reference")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                               "started": "earlier", "command": "gone"}))
    done = _nbjax(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def _stop_part_way(workdir: Path, signum: int) -> tuple[int, str]:
    """Sends ``signum`` once the run's step-16 log line is written (two checkpoints exist);
    returns the exit status and stderr."""
    proc = run_nbjax("--workdir", str(workdir), *SETTINGS, wait=False)
    log, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by SIGTERM part-way."""
    workdir = tmp_path_factory.mktemp("stopped")
    return workdir, *_stop_part_way(workdir, signal.SIGTERM)


def test_stale_lock_is_taken_over_and_released(reference):
    workdir, done = reference
    assert "taking over the lock of PID" in done.stderr
    assert not (workdir / ".lock").exists()


def test_sigterm_saves_the_current_step_and_the_rerun_is_bit_for_bit(reference, stopped,
                                                                      tmp_path):
    workdir, returncode, stderr = stopped
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
    step = int(line.split("at step ")[1].split(";")[0])
    assert 16 <= step < STEPS and step in _checkpoint_steps(workdir)
    assert not (workdir / "final_metrics.json").exists()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir, resumed_dir)
    with open(resumed_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "train/lo')  # a line cut short by a kill or a full disk
    resumed = _nbjax(resumed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "metrics.jsonl: dropped its last line" in resumed.stderr
    ref_dir = reference[0]
    assert json.loads((resumed_dir / "final_metrics.json").read_text()) == \
        json.loads((ref_dir / "final_metrics.json").read_text())
    assert _timeless(resumed_dir) == _timeless(ref_dir)
    assert _final_fingerprint(resumed_dir) == _final_fingerprint(ref_dir)


def test_ctrl_c_saves_and_says_so_in_one_line(tmp_path):
    returncode, stderr = _stop_part_way(tmp_path, signal.SIGINT)
    assert returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGINT")]
    assert int(line.split("at step ")[1].split(";")[0]) in _checkpoint_steps(tmp_path)


def test_a_busy_workdir_refuses_naming_the_holder(tmp_path):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2031-01-02 03:04",
              "command": "python -m nbjax.main (the other run)"}
    (tmp_path / ".lock").write_text(json.dumps(holder))
    before = snapshot(tmp_path)
    refused = _nbjax(tmp_path)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    for part in (str(os.getpid()), socket.gethostname(), "2031-01-02 03:04", ".lock"):
        assert part in line
    assert snapshot(tmp_path) == before


def test_resume_with_another_config_refuses_and_changes_nothing(reference):
    workdir = reference[0]
    before = snapshot(workdir)
    refused = _nbjax(workdir, "--config.model.depth=3", "--config.seed=5",
                     "--config.train.log_every=4")
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert "model.depth: 2 there, 3 now" in line and "seed: 0 there, 5 now" in line
    assert "log_every" not in line.split(" — ")[0]  # a safe key is not a conflict
    assert "--allow_config_change" in line
    assert snapshot(workdir) == before


def test_finished_run_reinvoked_returns_its_metrics_and_rewrites_nothing(reference):
    workdir = reference[0]
    before = snapshot(workdir)
    final = json.loads((workdir / "final_metrics.json").read_text())
    for extra in (["--config.train.log_every=4"], ["--config.seed=5", "--allow_config_change"]):
        again = _nbjax(workdir, *extra)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(again.stdout[again.stdout.index("{"):]) == final
        assert snapshot(workdir) == before


def _garble(step_dir: Path) -> None:
    """Overwrites every array data file of a checkpoint with bytes of the same length."""
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\xa5" * path.stat().st_size)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, stopped, tmp_path):
    shutil.copytree(stopped[0], tmp_path / "run")
    workdir = tmp_path / "run"
    older, newest = _checkpoint_steps(workdir)[-2:]
    _garble(workdir / "checkpoints" / str(newest))
    resumed = _nbjax(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: checkpoint step {newest} in" in resumed.stderr
    assert "error:" not in resumed.stderr
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == \
        [str(newest)]  # set aside, not deleted
    ref_dir = reference[0]
    assert json.loads((workdir / "final_metrics.json").read_text()) == \
        json.loads((ref_dir / "final_metrics.json").read_text())
    assert _final_fingerprint(workdir) == _final_fingerprint(ref_dir)
    assert older < newest


def test_no_good_checkpoint_is_one_line_and_deletes_nothing(stopped, tmp_path):
    shutil.copytree(stopped[0], tmp_path / "run")
    workdir = tmp_path / "run"
    older, newest = _checkpoint_steps(workdir)[-2:]
    _garble(workdir / "checkpoints" / str(newest))
    meta_path = workdir / "checkpoints" / str(older) / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_path.read_text())
    meta["custom_metadata"]["nbjax_fingerprint"][0] ^= 1  # readable, but not what was saved
    meta_path.write_text(json.dumps(meta))
    before = snapshot(workdir)
    failed = _nbjax(workdir)
    assert failed.returncode == 1
    [line] = error_lines(failed)
    assert "none of the checkpoints" in line and f"{older}, {newest}" in line
    assert "nothing was deleted" in line
    assert snapshot(workdir) == before


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # a checkpoint needs more


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(reference, stopped,
                                                                     tmp_path):
    shutil.copytree(stopped[0], tmp_path / "run")
    workdir = tmp_path / "run"
    steps = _checkpoint_steps(workdir)
    kept = {step: snapshot(workdir / "checkpoints" / str(step)) for step in steps}
    full = _nbjax(workdir, preexec_fn=_limit_file_size)
    assert full.returncode == 1, full.stderr[-3000:]
    [line] = error_lines(full)
    assert "could not write the checkpoint of step" in line
    assert f"resumes from the checkpoint of step {steps[-1]}" in line
    assert {step: snapshot(workdir / "checkpoints" / str(step)) for step in steps} == kept
    # Space again, and keys that only change cadence: the run still ends bit-identical.
    resumed = _nbjax(workdir, "--config.train.steps_per_call=8", "--config.train.log_every=16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _final_fingerprint(workdir) == _final_fingerprint(reference[0])
    [change] = [json.loads(line) for line in
                (workdir / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"train.log_every": [8, 16], "train.steps_per_call": [4, 8]}
    assert change["step"] == steps[-1] and change["allow_config_change"] is False
    restored = visualize.load_run_config(workdir)  # config.json, then the recorded changes
    assert (restored.train.steps_per_call, restored.train.log_every) == (8, 16)


def test_divergence_between_log_steps_names_its_step_and_keeps_only_good_checkpoints(tmp_path):
    # Linear warm-up to a huge learning rate: finite until about step 11 on this config.
    failed = run_nbjax("--workdir", str(tmp_path), "--config.train.progress=False",
                       "--config.train.num_steps=32", "--config.train.checkpoint_every=8",
                       "--config.train.log_every=16", "--config.train.learning_rate=1e3",
                       "--config.train.warmup_steps=100", "--config.train.grad_clip_norm=0.0")
    assert failed.returncode == 1
    [line] = error_lines(failed)
    step = int(line.split("not finite at step ")[1].split(" ")[0])
    assert 8 < step < 16  # found between the checkpoint at 8 and the log at 16
    assert "resumes from the checkpoint of step 8" in line
    assert _checkpoint_steps(tmp_path) == [8]
    assert not (tmp_path / "metrics.jsonl").exists() or \
        all(r["step"] <= 8 for r in _timeless(tmp_path))


def _two_processes(workdir: Path) -> list[subprocess.Popen]:
    port = free_port()
    return [run_nbjax("--workdir", str(workdir), *SETTINGS, "--coordinator_address",
                      f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                      wait=False) for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    try:
        return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption service: SIGTERM reaches process 1 only, both save one step."""
    procs = _two_processes(tmp_path)
    log, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    outcomes = _finish(procs)
    lines = [[ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM")]
             for _, err in outcomes]
    assert [code for code, _ in outcomes] == [128 + signal.SIGTERM] * 2, outcomes[0][1][-2000:]
    assert len(lines[0]) == 1 and lines[0] == lines[1]  # the same step on both
    step = int(lines[0][0].split("at step ")[1].split(";")[0])
    assert step < STEPS and _checkpoint_steps(tmp_path)[-1] == step
    resumed = _finish(_two_processes(tmp_path))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-2000:]
    assert json.loads((tmp_path / "final_metrics.json").read_text())["train/steps"] == STEPS
