"""Shared by the tests: the smoke config and its synthetic dataset, built once per process."""

import functools
import pathlib

from nbjax.config import load_config_file, lock, set_value
from nbjax.data import pipeline as data
from nbjax.train import order as order_lib


def smoke_config(**overrides):
    """configs/smoke.py with dotted-key overrides, e.g. ``**{"pruning.method": "gmp"}``."""
    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "smoke.py"
    config = load_config_file(path)
    config.train.progress = False
    for key, value in overrides.items():
        set_value(config, key, value)
    return lock(config)


@functools.lru_cache(maxsize=4)
def smoke_dataset(num_train: int = 512, num_test: int = 200):
    cfg = smoke_config().data
    with cfg.unlocked():
        cfg.synthetic_num_train, cfg.synthetic_num_test = num_train, num_test
    return data.load_dataset(cfg)


def one_device_mesh():
    """A mesh over the first device only: the single-device reference of the tests."""
    import jax

    from nbjax.parallel.mesh import make_mesh

    return make_mesh(jax.devices()[:1])


def run_steps(config, num_calls, state=None):
    """``num_calls`` compiled train calls on the smoke data, from ``state`` (default: fresh).

    Returns the built run, the final state and the host metrics of every call.
    """
    import jax

    from nbjax.train import loop

    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    state = run.state if state is None else state
    order = order_lib.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                                 config.seed)
    k = config.train.steps_per_call
    history = []
    for c in range(num_calls):
        idx = jax.device_put(order.block(c * k, k))
        state, metrics = run.train_call(state, run.train_images, run.train_labels, idx)
        history.append(jax.device_get(metrics))
    return run, state, history


def image_folder(root, rng, mode="RGB", size=(5, 4), counts=(("train", 4), ("test", 2)),
                 classes=("cat", "ant", "bee")):
    """Writes random PNGs as root/<split>/<class>/<i>.png (``size`` is width, height;
    ``mode`` RGB or L); returns {split: [(pixels, class name)]} in the order written. The
    default classes are not in sorted order: a reader's labels must come from sorted names."""
    from PIL import Image

    channels = {"RGB": 3, "L": 1}[mode]
    written = {}
    for split, n in counts:
        written[split] = []
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (size[1], size[0], channels), dtype="uint8")
                Image.fromarray(px.squeeze(-1) if channels == 1 else px, mode).save(
                    root / split / cls / f"{i}.png")
                written[split].append((px, cls))
    return written


def run_nbjax(*args, config="configs/smoke.py", wait=True, preexec_fn=None, timeout=300,
              module="nbjax.main"):
    """``python -m MODULE --config CONFIG ARGS...`` in a subprocess on 2 CPU devices.

    Returns the CompletedProcess (text output), or with ``wait=False`` the running Popen.
    """
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "NBJAX_VERBOSE"}
    env.update(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", module]
    command += ["--config", str(config)] if config else []
    command += [str(a) for a in args]
    if not wait:
        return subprocess.Popen(command, cwd=root, env=env, text=True, preexec_fn=preexec_fn,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def error_lines(proc):
    """The ``error: ...`` lines of a finished nbjax command; fails on a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory``: equal means untouched."""
    import hashlib

    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ several processes


SKIP_EXIT = 77  # a child process's exit status for "Gloo's CPU collectives are unavailable"


def join_process_group(coordinator, num_processes, process_id):
    """Joins a ``jax.distributed`` group (in a child process); exits with ``SKIP_EXIT`` if
    Gloo's collectives are missing."""
    import sys

    import jax

    from nbjax.parallel import distributed

    try:
        distributed.initialize(coordinator, num_processes, process_id)
        jax.devices()  # creates the CPU client, with its Gloo collectives
    except Exception as err:  # jaxlib names the missing piece only in the message
        if "gloo" not in str(err).lower() and "collective" not in str(err).lower():
            raise
        print(f"Gloo CPU collectives are unavailable: {err}", file=sys.stderr)
        sys.exit(SKIP_EXIT)


def free_port():
    """A free TCP port on localhost (for ``jax.distributed``'s coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(devices):
    """The test session's XLA_FLAGS (tests/conftest.py) with ``devices`` CPU devices, for a
    child process: its programs then compile like the test's own."""
    import os

    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


def child_env(devices):
    """The environment of a child process on ``devices`` CPU devices: nbjax's settings
    dropped (the tests' compilation cache kept), the repository importable, output unbuffered."""
    import os

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NBJAX_") or k == "NBJAX_COMPILATION_CACHE"}
    env.update(XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    return env


def run_process_group(commands, logs, timeout_s, skip_exit=None):
    """Starts every ``(command, env)`` at once, each writing to its log; waits for all under
    one deadline; fails the test with the log of the first one that failed (or skips it, with
    the last log line, for a process that exited with ``skip_exit``); kills what is left."""
    import subprocess
    import time

    import pytest

    root = pathlib.Path(__file__).resolve().parent.parent
    procs = []
    try:
        for (cmd, env), log in zip(commands, logs, strict=True):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"processes still running after {timeout_s} s; logs: {logs}")
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the others would wait for it until JAX's timeout
            time.sleep(0.2)
        for p, log in zip(procs, logs, strict=True):
            if skip_exit is not None and p.poll() == skip_exit:
                pytest.skip(log.read_text().strip().splitlines()[-1])
            if p.poll() not in (None, 0):
                pytest.fail(f"{log.name} exited with {p.poll()}:\n{log.read_text()[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
