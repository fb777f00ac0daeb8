"""scripts/device_tune.sh: the mixing-α population on a GPU, run here end to end on a tiny
image folder so that the device's minutes are not spent finding its mistakes."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from helpers import image_folder, xla_flags

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config.model.image_size=8", "--config.model.patch_size=4",
        "--config.model.hidden_dim=16", "--config.model.num_heads=2",
        "--config.model.mlp_dim=32", "--config.train.batch_size=16",
        "--config.train.eval_batch_size=12", "--config.train.warmup_steps=2",
        "--config.train.eval_every=3", "--config.train.steps_per_call=3",
        "--config.train.log_every=3"]


def _tune(*args, **env):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(2), **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "device_tune.sh"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _folder(root: Path) -> Path:
    image_folder(root, np.random.default_rng(0), size=(8, 8),
                 counts=(("train", 16), ("test", 4)), classes=("a", "b", "c"))
    return root


def test_tune_trains_one_member_per_alpha_and_collects_their_accuracy(tmp_path):
    out = tmp_path / "out"
    proc = _tune(str(out), *TINY, f"--config.data.cache_dir={tmp_path / 'cache'}",
                 DATA=str(_folder(tmp_path / "data")), WORKDIR=str(tmp_path / "work"),
                 ALPHAS="0 0.8", EPOCHS="2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    members = json.loads((out / "cifar10_tune.json").read_text())["members"]
    assert [m["mix_alpha"] for m in members] == [0.0, 0.8]
    for m in members:
        assert m["final"]["train/steps"] == 6  # 2 epochs of 48 // 16 steps
        assert 0.0 <= m["final"]["test/accuracy"] <= 1.0
        assert [step for step, _ in m["test_accuracy"]] == [3, 6]
    with tarfile.open(out / "cifar10_tune.tar.gz") as tar:
        names = tar.getnames()
    assert {f"./{m['member']}/metrics.jsonl" for m in members} <= set(names)
    assert not any("checkpoints" in n or "/population" in n for n in names)


def test_tune_help_bad_flags_and_shellcheck(tmp_path):
    proc = _tune("--help")
    assert proc.returncode == 0 and "ALPHAS" in proc.stdout and "cifar10_tune.json" in proc.stdout
    assert _tune().returncode == 2  # no OUTDIR
    bad = _tune(str(tmp_path / "o"), "--members=x", DATA=str(tmp_path))
    assert bad.returncode == 2 and "not a --config.KEY=VALUE flag" in bad.stderr
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-x", str(ROOT / "scripts" / "device_tune.sh")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
