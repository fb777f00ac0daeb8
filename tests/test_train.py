"""The train step and loop: learning, masks that hold, bit-for-bit resume, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import one_device_mesh, run_steps, smoke_config, smoke_dataset, xla_flags

from nbjax.model.build import build_model
from nbjax.train import checkpoint, loop
from nbjax.train.optimizer import learning_rate_schedule, make_optimizer
from nbjax.train.state import TrainState

LR, END = 1e-3, 0.1  # peak learning rate and end factor of the schedule tests


def test_loss_falls_on_learnable_task():
    _, _, history = run_steps(smoke_config(), num_calls=10)
    first = history[0]["train/loss"][0]
    last = np.mean(history[-1]["train/loss"])
    assert last < 0.5 * first, (first, last)


def test_masked_weight_receives_no_update():
    config = smoke_config()
    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    mask = np.ones(run.state.params["block_0"]["fc1"]["kernel"].shape, bool)
    mask[::3, 1::2] = False
    masks = jax.tree.map(lambda m: m, run.state.masks)
    masks["block_0"]["fc1"]["kernel"] = jax.numpy.asarray(mask)
    params = jax.tree.map(lambda p: p, run.state.params)
    kernel = np.asarray(params["block_0"]["fc1"]["kernel"]) * mask
    params["block_0"]["fc1"]["kernel"] = jax.numpy.asarray(kernel)
    state = run.state.replace(masks=masks, params=params)
    _, state, _ = run_steps(config, num_calls=3, state=state)
    after = np.asarray(state.params["block_0"]["fc1"]["kernel"])
    assert np.all(after[~mask] == 0)
    assert np.all(after[mask] != kernel[mask])


def test_scan_of_k_steps_equals_k_single_steps():
    config = smoke_config()
    _, state_k, hist_k = run_steps(config, num_calls=2)
    single = smoke_config(**{"train.steps_per_call": 1})
    _, state_1, hist_1 = run_steps(single, num_calls=2 * config.train.steps_per_call)
    for a, b in zip(jax.tree.leaves(state_k.params), jax.tree.leaves(state_1.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses_1 = np.concatenate([h["train/loss"] for h in hist_1])
    np.testing.assert_allclose(np.concatenate([h["train/loss"] for h in hist_k]), losses_1,
                               rtol=1e-5)


def restored_state(config, workdir):
    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(checkpoint.abstract_like(run.state))
    ckpt.close()
    return state


def read_log(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    config = smoke_config()
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    final_full = loop.train_and_evaluate(config, full_dir, dataset=smoke_dataset())

    real_build = loop.build
    calls = {"n": 0}

    def interrupting_build(*args, **kwargs):
        run = real_build(*args, **kwargs)
        chunk = run.train_call

        def maybe_interrupt(*a):
            calls["n"] += 1
            if calls["n"] == 6:  # 5 calls of 4 steps done: step 20, between checkpoints
                raise KeyboardInterrupt
            return chunk(*a)

        run.train_call = maybe_interrupt
        return run

    monkeypatch.setattr(loop, "build", interrupting_build)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, cut_dir, dataset=smoke_dataset())
    monkeypatch.setattr(loop, "build", real_build)
    assert checkpoint.Checkpointer(os.path.join(cut_dir, "checkpoints")).latest_step() == 20
    final_cut = loop.train_and_evaluate(config, cut_dir, dataset=smoke_dataset())

    assert final_cut == final_full
    a, b = restored_state(config, full_dir), restored_state(config, cut_dir)
    assert int(a.step) == int(b.step) == config.train.num_steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    def timeless(log):
        return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in log]

    assert timeless(read_log(cut_dir)) == timeless(read_log(full_dir))


def test_finished_run_is_not_retrained(tmp_path):
    config = smoke_config(**{"train.num_steps": 8})
    first = loop.train_and_evaluate(config, str(tmp_path), dataset=smoke_dataset())
    lines = len(read_log(str(tmp_path)))
    again = loop.train_and_evaluate(config, str(tmp_path), dataset=smoke_dataset())
    assert again == first
    assert len(read_log(str(tmp_path))) == lines


def test_eval_counts_every_example_once():
    config = smoke_config(**{"train.eval_batch_size": 64})  # 200 test examples: 3 full + 8
    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    metrics = loop.evaluate(run, run.state)
    # Hand-computed accuracy of the same params over the whole test set at once.
    from nbjax.data import pipeline as data

    images = data.normalize(run.dataset.test_images, run.dataset.mean, run.dataset.std)
    model_logits = build_model(config, run.dataset.num_classes).apply(
        {"params": run.state.params, "masks": run.state.masks}, images)
    expected = float(np.mean(np.argmax(model_logits, -1) == run.dataset.test_labels))
    assert metrics["test/accuracy"] == pytest.approx(expected, abs=1e-6)


def test_nan_loss_stops_with_clear_error(tmp_path):
    config = smoke_config(**{"train.learning_rate": 1e30, "train.grad_clip_norm": 0.0,
                             "train.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match="learning_rate"):
        loop.train_and_evaluate(config, str(tmp_path), dataset=smoke_dataset())


def test_optimizer_state_is_part_of_train_state():
    config = smoke_config()
    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    assert isinstance(run.state, TrainState)
    assert int(run.state.step) == 0


def test_interrupted_save_leaves_latest_good_checkpoint(tmp_path):
    config = smoke_config(**{"train.num_steps": 8})
    run = loop.build(config, smoke_dataset(), mesh=one_device_mesh())
    directory = tmp_path / "checkpoints"
    ckpt = checkpoint.Checkpointer(str(directory))
    ckpt.save(4, run.state, force=True)
    ckpt.close()
    # What a save killed half-way leaves behind: Orbax's temporary directory, never renamed.
    partial = directory / "8.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 10)
    ckpt = checkpoint.Checkpointer(str(directory))
    assert ckpt.latest_step() == 4
    restored = ckpt.restore(checkpoint.abstract_like(run.state))
    ckpt.close()
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(run.state), strict=True):
        np.testing.assert_array_equal(x, y)


def test_killed_process_resumes_to_the_same_result(tmp_path):
    """SIGKILL (no chance to save) mid-run; the rerun resumes from the periodic checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-m", "nbjax.main", "--config", os.path.join(root, "configs",
                                                                           "smoke.py"),
            "--config.train.num_steps=64", "--config.train.progress=False"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    full = subprocess.run([*args, "--workdir", str(tmp_path / "full")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    cut_dir = tmp_path / "cut"
    proc = subprocess.Popen([*args, "--workdir", str(cut_dir)], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [p.name for p in (cut_dir / "checkpoints").glob("[0-9]*")
                     if "tmp" not in p.name] if (cut_dir / "checkpoints").exists() else []
            if steps:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (cut_dir / "final_metrics.json").exists(), "the run ended before the kill"
    resumed = subprocess.run([*args, "--workdir", str(cut_dir)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(tmp_path / "full" / "final_metrics.json") as f:
        expected = json.load(f)
    with open(cut_dir / "final_metrics.json") as f:
        assert json.load(f) == expected


def schedule_config(**overrides):
    return smoke_config(**{"train.learning_rate": LR, "train.end_lr_factor": END,
                           "train.warmup_steps": 5, **overrides})


def test_learning_rate_schedule_hand_values():
    # 45 steps: linear warm-up 0 -> LR over steps 0..5, then a cosine over the 40 steps
    # 5..45 from LR down to END * LR; its midpoint (step 25) is halfway between the two.
    schedule = learning_rate_schedule(schedule_config(), 45)
    expected = {0: 0.0, 2: 2 / 5 * LR, 5: LR, 25: (LR + END * LR) / 2, 45: END * LR,
                60: END * LR}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-12), step
    # A quarter into the cosine: END*LR + (LR - END*LR) * (1 + cos(pi/4)) / 2.
    quarter = END * LR + (LR - END * LR) * (1 + np.cos(np.pi / 4)) / 2
    assert float(schedule(15)) == pytest.approx(quarter, rel=1e-6)


def test_warmup_is_cut_to_leave_a_decay_step():
    schedule = learning_rate_schedule(schedule_config(), 3)  # warm-up 5 > 3 - 1 steps
    assert [float(schedule(t)) for t in (0, 1, 2)] == pytest.approx([0.0, LR / 2, LR])
    assert float(schedule(3)) == pytest.approx(END * LR)


def test_optimizer_steps_with_the_schedule():
    """Adam on a constant gradient moves each weight by lr(t) per step (m/sqrt(v) = 1, up to
    float32 rounding of the bias corrections); a bias has no weight decay, so the steps of the
    optimizer are the schedule's values (neighbouring steps differ by far more than 1e-4)."""
    config, total = schedule_config(), 45
    tx, schedule = make_optimizer(config, total), learning_rate_schedule(config, total)
    params = {"bias": jnp.zeros(3)}
    grads = {"bias": jnp.full(3, 0.25)}
    state = tx.init(params)
    for step in range(total):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(updates["bias"], -float(schedule(step)), rtol=1e-4,
                                   atol=1e-12, err_msg=str(step))
