"""Data parallelism over the 8 CPU devices of the test session (tests/conftest.py).

One train step on 8 devices must equal the same step on 1 device (the loss is a mean over the
global batch, so only the order of floating-point reductions differs); masks must be the same
on every device; FSDP must equal replicated; a checkpoint written on 8 devices must restore on
1 and continue as it would have on 8; the loop must make no implicit host<->device transfer;
and eval must count every test example exactly once when the last batch is padded.
"""

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config, smoke_dataset
from jax.sharding import PartitionSpec as P

from nbjax.model.build import build_model
from nbjax.model.vit import MAX_STATS
from nbjax.parallel import collectives
from nbjax.parallel import mesh as sharding
from nbjax.pruning import make_pruner
from nbjax.train import checkpoint, loop
from nbjax.train import order as order_lib
from nbjax.train.state import TrainState

METHODS = ("none", "gmp", "pdwp")
STEPS = 8  # two calls of 4 steps; gmp/pdwp prune to initial_sparsity at their t0 = step 4
TOL = dict(rtol=1e-5, atol=1e-5)


def mesh_of(n: int):
    return sharding.make_mesh(jax.devices()[:n])


def method_config(method: str, **overrides):
    """The smoke config with ``method``, burden metrics on; skips if the method is missing."""
    config = smoke_config(**{"pruning.method": method, "burden.enabled": True,
                             "pruning.sparsity": 0.5, "pruning.initial_sparsity": 0.2,
                             **overrides})
    try:
        make_pruner(config, config.train.num_steps)
    except ValueError:
        pytest.skip(f"pruning method {method!r} is not registered yet in nbjax.pruning "
                    "(another issue); the test runs once it is")
    return config


def run_calls(run: loop.Run, state: TrainState, first_step: int, num_steps: int):
    """Runs ``num_steps`` steps from ``first_step`` through the loop's own feeding code."""
    order = order_lib.BatchOrder(len(run.dataset.train_labels), run.config.train.batch_size,
                                 run.config.seed)
    k = run.config.train.steps_per_call
    history = []
    for step in range(first_step, first_step + num_steps, k):
        state, metrics = run.train_call(state, run.train_images, run.train_labels,
                                         loop.train_indices(run, order, step, k))
        history.append(jax.device_get(metrics))
    return state, {key: np.concatenate([h[key] for h in history]) for key in history[0]}


@dataclasses.dataclass
class Trained:
    run: loop.Run
    mid: TrainState  # a copy of the state after STEPS // 2 steps
    final: TrainState  # after STEPS steps
    metrics: dict[str, np.ndarray]  # every step's metrics, [STEPS]


@functools.lru_cache(maxsize=12)
def trained(method: str, devices: int, mode: str = "replicated",
            extra: tuple[tuple[str, object], ...] = ()) -> Trained:
    """STEPS steps of ``method`` on the first ``devices`` devices, compiled once per session.

    ``extra``: more config overrides, as ``(dotted key, value)`` pairs.
    """
    overrides = {"sharding.mode": mode, "sharding.fsdp_min_size": 256} if mode == "fsdp" else {}
    overrides.update(extra)
    run = loop.build(method_config(method, **overrides), smoke_dataset(), mesh=mesh_of(devices))
    mid, first = run_calls(run, run.state, 0, STEPS // 2)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=run.state_shardings)(mid)
    final, second = run_calls(run, mid, STEPS // 2, STEPS // 2)
    metrics = {k: np.concatenate([first[k], second[k]]) for k in first}
    return Trained(run, copy, final, metrics)


# The attention key bias has an exactly zero gradient (softmax is invariant to adding q.b to
# every logit of a row), so all it gets is float noise that Adam scales up to steps of the
# learning rate's size, with a sign that depends on the order of the reductions. It changes
# no output; it is held to the learning-rate budget of the run instead of TOL.
NOISE_ONLY = "['key']['bias']"
NOISE_ATOL = 2e-3 * STEPS


def assert_trees_close(a, b, exact: bool = False):
    """Same structure; bool/int leaves equal; float leaves to TOL (or equal if ``exact``)."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        name = jax.tree_util.keystr(path)
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        if exact or x.dtype == bool or np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif NOISE_ONLY in name:
            np.testing.assert_allclose(x, y, atol=NOISE_ATOL, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, err_msg=name, **TOL)


def assert_metrics_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], err_msg=key, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_eight_devices_equal_one_device(method):
    one, eight = trained(method, 1), trained(method, 8)
    assert eight.run.mesh.devices.size == 8 and one.run.mesh.devices.size == 1
    assert_metrics_close(eight.metrics, one.metrics)
    assert_trees_close(eight.final, one.final)  # params, masks (exactly), optimizer, burden...
    if method != "none":
        kept = np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(eight.final.masks)]))
        assert kept < 1.0, "the run should have pruned by now; lengthen STEPS"
    if eight.final.burden:
        assert any(k.startswith("burden/") for k in eight.metrics), sorted(eight.metrics)


@pytest.mark.parametrize("method", METHODS)
def test_masks_and_state_identical_on_every_device(method):
    final = trained(method, 8).final
    for path, leaf in jax.tree_util.tree_flatten_with_path(final)[0]:
        name = jax.tree_util.keystr(path)
        assert leaf.sharding.is_fully_replicated, name
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 8, name
        for shard in shards[1:]:
            np.testing.assert_array_equal(shard, shards[0], err_msg=name)


COMPILER_REDUCE = (("sharding.grad_reduce", "compiler"),)
MERGING = (("mitigation.token_merging.mode", "every_layer"), ("mitigation.token_merging.r", 2))


def test_flat_gradient_reduce_equals_the_compilers():
    flat, compiler = trained("gmp", 8), trained("gmp", 8, extra=COMPILER_REDUCE)
    assert collectives.grad_reduce_mode(flat.run.config, flat.run.mesh) == "flat"  # CPU default
    assert collectives.grad_reduce_mode(compiler.run.config, compiler.run.mesh) == "compiler"
    assert_metrics_close(flat.metrics, compiler.metrics)
    assert_trees_close(flat.final, compiler.final)


def test_token_merging_on_eight_devices_equals_one_device():
    one, eight = trained("none", 1, extra=MERGING), trained("none", 8, extra=MERGING)
    assert any(k.startswith("tokens/max_size/") for k in eight.metrics)
    assert_metrics_close(eight.metrics, one.metrics)
    assert_trees_close(eight.final, one.final)


def _all_reduce_operands(run: loop.Run) -> list[list[str]]:
    """The operand shapes of every all-reduce in the compiled train call of ``run``."""
    config = run.config
    order = order_lib.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                                 config.seed)
    idx = loop.train_indices(run, order, 0, config.train.steps_per_call)
    hlo = run.train_call.lower(run.state, run.train_images, run.train_labels,
                                idx).compile().as_text()
    return [re.findall(r"\w+\[[\d,]*\]", result)
            for result in re.findall(r"= (.+?) all-reduce(?:-start)?\(", hlo)]


def test_flat_step_sums_its_gradient_in_one_all_reduce_of_one_buffer():
    config = smoke_config(**{"pruning.method": "gmp", "burden.enabled": False})
    run = loop.build(config, smoke_dataset(), mesh=mesh_of(8))
    reduces = _all_reduce_operands(run)
    assert len(reduces) == 1, reduces
    num_params = sum(x.size for x in jax.tree.leaves(run.state.params))
    # The gradient and the loss in one buffer; XLA may add the step's accuracy (a scalar mean
    # over the sharded batch, outside the shard_map) as a second operand. The compiler's own
    # reduction has one operand per param leaf.
    assert f"f32[{num_params + 1}]" in reduces[0] and len(reduces[0]) <= 2, reduces


def test_flat_step_with_burden_sums_the_probe_as_one_buffer_too():
    config = method_config("gmp")
    run = loop.build(config, smoke_dataset(), mesh=mesh_of(8))
    reduces = _all_reduce_operands(run)
    num_kernels = len(jax.tree.leaves(run.state.burden["ref_load"]))
    # The step's gradient, loss and statistics; the probe pass's pruned and dense sums (two
    # per kernel) in one buffer of their own, inside the conditional that runs the probe.
    assert len(reduces) == 2, reduces
    assert [f"f32[{2 * num_kernels}]"] in reduces, reduces
    assert all(len(operands) <= 2 for operands in reduces), reduces


def test_sharded_loss_and_grad_combines_shards_as_the_global_batch():
    """Means (loss, gradient, statistics) average over the shards, maxima take the max."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
    labels = jnp.arange(16, dtype=jnp.float32)
    params = {"w": jnp.asarray([0.5, -1.0, 2.0])}

    def loss_fn(params, masks, images, labels):
        logits = images @ params["w"]
        stats = {"fc": {"in_abs_mean": (jnp.mean(jnp.abs(images), axis=0),)},
                 "block_0": {"max_token_size": (jnp.max(images),),
                             "mean_token_size": (jnp.mean(images),)}}
        return jnp.mean((logits - labels) ** 2), (logits, stats)

    loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    want = loss_and_grad(params, {}, images, labels)
    mesh = mesh_of(8)
    got = jax.jit(collectives.sharded_loss_and_grad(loss_and_grad, mesh, MAX_STATS))(
        params, {}, jax.device_put(images, sharding.batch_sharding(mesh)),
        jax.device_put(labels, sharding.batch_sharding(mesh)))
    assert float(jnp.max(images)) != float(jnp.max(images[:2]))  # a per-shard max would differ
    assert_trees_close(got, want)


def test_flat_psum_is_the_per_leaf_psum():
    mesh = mesh_of(8)
    tree = {"a": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 2, 3),
            "b": jnp.arange(8, dtype=jnp.int32).reshape(8, 1), "c": jnp.ones((8,), jnp.float32)}
    summed = jax.jit(jax.shard_map(collectives.flat_psum, mesh=mesh,
                                   in_specs=P(sharding.DATA_AXIS), out_specs=P(),
                                   check_vma=False))(tree)
    want = jax.tree.map(lambda x: jnp.sum(x, axis=0, keepdims=True), tree)
    assert_trees_close(summed, want, exact=True)
    assert summed["b"].dtype == jnp.int32


@pytest.mark.parametrize("mode,devices,state_mode,chosen", [
    ("auto", 8, "replicated", "flat"), ("auto", 1, "replicated", "compiler"),
    ("auto", 8, "fsdp", "compiler"), ("compiler", 8, "replicated", "compiler"),
    ("flat", 8, "replicated", "flat"), ("flat", 1, "replicated", "compiler")])
def test_grad_reduce_mode_choice(mode, devices, state_mode, chosen):
    config = smoke_config(**{"sharding.grad_reduce": mode, "sharding.mode": state_mode})
    assert collectives.grad_reduce_mode(config, mesh_of(devices)) == chosen


def test_grad_reduce_mode_refuses_flat_with_fsdp():
    config = smoke_config(**{"sharding.grad_reduce": "flat", "sharding.mode": "fsdp"})
    with pytest.raises(ValueError, match="grad_reduce='flat' needs sharding.mode='replicated'"):
        collectives.grad_reduce_mode(config, mesh_of(8))


def test_flat_step_needs_its_mesh():
    with pytest.raises(ValueError, match="needs the mesh"):
        collectives.check_grad_reduce("flat", None)
    with pytest.raises(ValueError, match="allowed"):
        collectives.check_grad_reduce("auto", mesh_of(8))  # a config value, not a mode


def test_fsdp_equals_replicated_and_shards_large_leaves():
    repl, fsdp = trained("none", 8), trained("none", 8, "fsdp")
    assert_metrics_close(fsdp.metrics, repl.metrics)
    assert_trees_close(fsdp.final, repl.final)
    # fc1's kernel (16 x 32 = 512 entries >= fsdp_min_size 256) is split along its 32 axis, and
    # so are its mask and Adam moments; small leaves stay replicated.
    split = P(None, sharding.DATA_AXIS)
    kernel = fsdp.final.params["block_0"]["fc1"]["kernel"]
    assert kernel.sharding.spec == split
    assert kernel.addressable_shards[0].data.shape == (16, 4)
    assert fsdp.final.masks["block_0"]["fc1"]["kernel"].sharding.spec == split
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(fsdp.final.opt_state)[0]
               if "fc1" in jax.tree_util.keystr(path) and leaf.ndim == 2]
    assert moments and all(m.sharding.spec == split for m in moments)
    assert fsdp.final.params["block_0"]["fc1"]["bias"].sharding.spec == P()
    # the state keeps the run's shardings through the donating, jitted steps ...
    for leaf, want in zip(jax.tree.leaves(fsdp.final), jax.tree.leaves(fsdp.run.state_shardings),
                          strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    # ... and donation worked: the state passed in was consumed, its buffers reused
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(fsdp.run.state))


def test_fsdp_checkpoint_restores_sharded_and_on_one_device(tmp_path):
    fsdp = trained("none", 8, "fsdp")
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(STEPS, fsdp.final, force=True)
    ckpt.wait()
    back_fsdp = ckpt.restore(checkpoint.abstract_like(fsdp.final))
    back_one = ckpt.restore(checkpoint.abstract_like(trained("none", 1).final))
    ckpt.close()
    assert_trees_close(back_fsdp, fsdp.final, exact=True)
    assert_trees_close(back_one, fsdp.final, exact=True)
    assert back_fsdp.params["block_0"]["fc1"]["kernel"].sharding.spec == P(None, sharding.DATA_AXIS)
    assert {d for leaf in jax.tree.leaves(back_one) for d in leaf.sharding.device_set} == {
        jax.devices()[0]}


def _registered(method: str) -> bool:
    try:
        make_pruner(smoke_config(**{"pruning.method": method}), 40)
    except ValueError:
        return False
    return True


def test_checkpoint_from_eight_devices_continues_on_one(tmp_path):
    """Saved on 8 devices after STEPS/2 steps, restored on 1, continued: as if it stayed on 8."""
    method = next((m for m in ("pdwp", "gmp") if _registered(m)), "none")
    eight, one = trained(method, 8), trained(method, 1)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(STEPS // 2, eight.mid, force=True)
    ckpt.wait()
    restored = ckpt.restore(checkpoint.abstract_like(one.final))  # the 1-device layout
    ckpt.close()
    assert {d for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set} == {
        jax.devices()[0]}
    assert_trees_close(restored, eight.mid, exact=True)
    final, metrics = run_calls(one.run, restored, STEPS // 2, STEPS // 2)
    assert int(final.step) == STEPS
    assert_metrics_close(metrics, {k: v[STEPS // 2:] for k, v in eight.metrics.items()})
    assert_trees_close(final, eight.final)


def _allowing_transfers(fn):
    def wrapped(*args, **kwargs):
        with jax.transfer_guard("allow"):
            return fn(*args, **kwargs)

    return wrapped


def test_train_loop_makes_no_implicit_transfers(tmp_path, monkeypatch):
    """Everything ``train_and_evaluate`` does after set-up runs under the "disallow" guard:
    feeding batches, the compiled steps, reading metrics, evaluation, checkpoint save and
    restore. Set-up (``build``, the FLOPs report) runs once per run and may transfer."""
    monkeypatch.setattr(loop, "build", _allowing_transfers(loop.build))
    monkeypatch.setattr(loop.flops_lib, "startup_report",
                        _allowing_transfers(loop.flops_lib.startup_report))
    config = smoke_config(**{"train.num_steps": STEPS, "train.log_every": 4,
                             "train.eval_every": 4, "train.checkpoint_every": 4})
    workdir = str(tmp_path / "run")
    with jax.transfer_guard("disallow"):
        final = loop.train_and_evaluate(config, workdir, dataset=smoke_dataset())
        # a resume (restore from the checkpoint, evaluate, write the results) is guarded too
        os.remove(os.path.join(workdir, "final_metrics.json"))
        again = loop.train_and_evaluate(config, workdir, dataset=smoke_dataset())
    assert again == final
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[:2] == [4, 8]


def test_put_batch_places_each_row_once():
    mesh = mesh_of(8)
    block = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)
    arr = sharding.put_batch(block, sharding.batch_sharding(mesh, batch_axis=1))
    np.testing.assert_array_equal(jax.device_get(arr), block)
    assert arr.sharding.spec == P(None, sharding.DATA_AXIS)
    rows = sorted(int(c) for s in arr.addressable_shards for c in np.asarray(s.data)[0])
    assert rows == list(range(16))


def test_eval_batches_cover_each_example_once():
    batches = loop.eval_batches(200, 48)
    assert len(batches) == 5 and all(len(i) == 48 for i, _ in batches)
    counted = np.concatenate([idx[valid == 1] for idx, valid in batches])
    np.testing.assert_array_equal(counted, np.arange(200))


@pytest.mark.parametrize("devices", [1, 8])
def test_eval_with_padded_last_batch_counts_each_example_once(devices):
    t = trained("none", devices)
    config, dataset = t.run.config, t.run.dataset
    assert len(dataset.test_labels) % config.train.eval_batch_size != 0  # 200 = 3 * 64 + 8
    got = loop.evaluate(t.run, t.final)
    # reference: every test example once, in one plain forward pass on the host's device
    net = build_model(config, dataset.num_classes)
    params, masks = jax.device_get((t.final.params, t.final.masks))
    images = (dataset.test_images.astype(np.float32) / 255.0 - np.asarray(dataset.mean)) / (
        np.asarray(dataset.std))
    logits = np.asarray(net.apply({"params": params, "masks": masks}, images))
    labels = dataset.test_labels
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want_loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    want_acc = float(np.mean(logits.argmax(-1) == labels))
    assert got["test/accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert got["test/loss"] == pytest.approx(want_loss, rel=1e-5)
