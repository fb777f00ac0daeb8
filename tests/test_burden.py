"""Burden metrics: each one on a hand-computed case, then inside the train step and the loop.

The unit tests call the metric functions of :mod:`nbjax.burden.metrics` (the very functions
the tracker's update calls) on tiny layers. The step tests run the smoke config, with the dense
method and with a one-shot magnitude pruner defined here, so the reference-step and
pruned-signal logic is checked independently of the pruning methods' own schedules.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_device_mesh, run_steps, smoke_config, smoke_dataset

from nbjax import report
from nbjax.burden import metrics as burden
from nbjax.burden import tracker as burden_tracker
from nbjax.model import vit as model_lib
from nbjax.model.build import build_model
from nbjax.pruning import Pruner, common, make_pruner
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import PruneResult, prunable
from nbjax.train import checkpoint, loop
from nbjax.train import hparams as hparams_lib
from nbjax.train import order as order_lib
from nbjax.train import step as train
from nbjax.train.optimizer import make_optimizer
from nbjax.train.state import init_state

# --------------------------------------------------------------------------------------------
# Each metric on a hand-computed case
# --------------------------------------------------------------------------------------------

W = jnp.array([[1.0, -2.0], [3.0, 0.5]])  # [in=2, out=2]
E = jnp.array([1.0, 2.0])  # e_j = E|x_j|
M = jnp.array([[True, False], [True, True]])


def test_load_hand_value():
    # kept: e_0|W_00| + e_1|W_10| + e_1|W_11| = 1 + 6 + 1 = 8 over 3 kept -> 8/3;
    # dense reference: (1 + 2 + 6 + 1) / 4 = 2.5; load = (8/3) / 2.5 = 16/15.
    ref = burden.reference_load(E, W)
    assert float(ref) == 2.5
    numerator = burden.load_numerator(E, W, M)
    assert float(numerator) == pytest.approx(8 / 3)
    assert float(burden.load(numerator, ref)) == pytest.approx(16 / 15)


def test_load_is_exactly_one_at_reference_and_above_one_after_magnitude_pruning():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)
    e = burden.input_abs_mean(x, 1)
    np.testing.assert_allclose(e, np.abs(np.asarray(x)).mean(axis=(0, 1)), rtol=1e-6)
    ref = burden.reference_load(e, w)
    assert float(burden.load(burden.load_numerator(e, w, None), ref)) == 1.0
    # As the tracker computes it: the numerator and the reference share one kept sum.
    ones = jnp.ones(w.shape, bool)
    kept_sum = burden.kept_abs_sums(e, w, ones)
    ref_ones = burden.reference_load(e, w, ones, kept_sum=kept_sum)
    numerator = burden.load_numerator(e, w, ones, kept_sum)
    assert float(burden.load(numerator, ref_ones)) == 1.0  # bit for bit
    # Magnitude pruning to 50 % keeps the largest |W|: the mean signal per survivor rises.
    mask = common.topk_layerwise({"w": jnp.abs(w)}, {"w": w.size // 2})["w"]
    pruned = jnp.where(mask, w, 0.0)
    value = float(burden.load(burden.load_numerator(e, pruned, mask), ref))
    keep = np.asarray(mask)
    contrib = np.asarray(e)[:, None] * np.abs(np.asarray(w))
    assert value == pytest.approx(contrib[keep].mean() / contrib.mean(), rel=1e-6)
    assert value > 1.0


def test_sparse_start_reference_is_the_dense_layer():
    # A method that starts sparse zeroes its pruned weights; the reference adds them back
    # through their per-input-feature |W| sums, so it equals the dense layer's.
    colsum = jnp.sum(jnp.where(M, 0.0, jnp.abs(W)), axis=1)
    ref = burden.reference_load(E, jnp.where(M, W, 0.0), M, pruned_abs_colsum=colsum)
    assert float(ref) == pytest.approx(2.5)
    # And a persistent method keeps the dense W: the pruned entries count directly.
    assert float(burden.reference_load(E, W, M)) == pytest.approx(2.5)


def test_overload_and_dormant_fractions_on_a_constructed_vector():
    a = jnp.array([0.0, 0.05, 1.0, 1.0, 1.0, 1.0, 1.0, 4.95])  # mean 1.25
    # a / mean = 0, 0.04, 0.8 (x5), 3.96 -> dormant (<= 0.1): 2 of 8; overload (>= 2): 1 of 8.
    assert float(burden.dormant_frac(a, 0.1)) == 0.25
    assert float(burden.overload_frac(a, 2.0)) == 0.125
    assert float(burden.overload_frac(a, 4.0)) == 0.0
    flat = jnp.ones((4, 3))  # equal activity: nobody dormant or overloaded
    assert float(burden.dormant_frac(flat, 0.1)) == 0.0
    assert float(burden.overload_frac(flat, 2.0)) == 0.0


def test_kept_weight_and_grad_rms_hand_values():
    w = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    m = jnp.array([[True, True], [False, False]])
    # kept: 3, 4 -> rms sqrt(12.5); reference rms 2.5 -> ratio sqrt(2).
    assert float(burden.kept_rms(w, m)) == pytest.approx(np.sqrt(12.5))
    ratio = burden.kept_weight_rms(burden.kept_rms(w, m), jnp.float32(2.5))
    assert float(ratio) == pytest.approx(np.sqrt(2))
    assert float(burden.kept_weight_rms(jnp.float32(0.0), jnp.float32(0.0))) == 0.0
    g = jnp.array([[1.0, -1.0], [100.0, 100.0]])  # the pruned gradients do not count
    assert float(burden.kept_grad_rms(g, m)) == pytest.approx(1.0)
    assert float(burden.kept_grad_rms(g, None)) == pytest.approx(np.sqrt(20002 / 4))
    assert float(burden.kept_rms(w, jnp.zeros((2, 2), bool))) == 0.0


# The decomposition's hand case: the reference e⁰, W⁰, g⁰, then a later step's e, W, g and mask.
E_REF, W_REF = jnp.array([1.0, 2.0]), jnp.array([[1.0, -2.0], [3.0, 4.0]])
G_REF = jnp.array([[5.0, -1.0], [7.0, 3.0]])
E_NOW, W_NOW = jnp.array([1.0, 3.0]), jnp.array([[0.0, -3.0], [0.0, 5.0]])
G_NOW = jnp.array([[9.0, 2.0], [9.0, -4.0]])
M_NOW = jnp.array([[False, True], [False, True]])


def test_selection_and_compensation_hand_values():
    # reference: (1 + 2 + 6 + 8) / 4 = 4.25; the survivors at the reference: (2 + 8) / 2 = 5;
    # now: (3 + 15) / 2 = 9. selection 5 / 4.25, compensation 9 / 5, their product the load.
    ref = burden.reference_load(E_REF, W_REF)
    sel = burden.selection_numerator(E_REF, jnp.abs(W_REF), M_NOW)
    numerator = burden.load_numerator(E_NOW, W_NOW, M_NOW)
    assert (float(ref), float(sel), float(numerator)) == (4.25, 5.0, 9.0)
    assert float(burden.selection(sel, ref)) == pytest.approx(5 / 4.25)
    assert float(burden.compensation(numerator, sel)) == pytest.approx(1.8)
    product = burden.selection(sel, ref) * burden.compensation(numerator, sel)
    assert float(product) == pytest.approx(float(burden.load(numerator, ref)), rel=1e-6)
    nothing = jnp.zeros((2, 2), bool)  # nothing kept: 0, not 0/0
    assert float(burden.compensation(burden.load_numerator(E_NOW, W_NOW, nothing),
                                     burden.selection_numerator(E_REF, W_REF, nothing))) == 0.0
    # rms of the kept W now, sqrt((9 + 25) / 2), over that of the same entries' |W⁰|,
    # sqrt((4 + 16) / 2); of the kept g now, sqrt((4 + 16) / 2), over |g⁰|'s, sqrt((1 + 9) / 2).
    rms = burden.compensation_rms(burden.kept_rms(W_NOW, M_NOW), burden.kept_rms(W_REF, M_NOW))
    assert float(rms) == pytest.approx(np.sqrt(1.7))
    grad = burden.compensation_grad(burden.kept_rms(G_NOW, M_NOW),
                                    burden.kept_rms(G_REF, M_NOW))
    assert float(grad) == pytest.approx(np.sqrt(2.0))


class OneKernelBlock(nn.Module):
    """A model whose one block is one [2, 2] kernel: the block metrics are the kernel's."""

    collect_stats: bool = True
    measure_pruned: bool = False

    @nn.compact
    def __call__(self, x):
        return model_lib.MaskedLinear((2,), use_bias=False, mask_mode="straight_through",
                                      collect_stats=self.collect_stats,
                                      measure_pruned=self.measure_pruned, name="block_0")(x)


def hand_input(step, w, mask, grad, e):
    def tree(x):
        return {"block_0": {"kernel": x}}

    return burden_tracker.BurdenInput(
        step=jnp.int32(step), params=tree(w), masks=tree(mask), grads=tree(grad),
        stats={"block_0": {burden.STAT: (e,)}}, images=jnp.ones((1, 2)),
        updated_params=tree(w), new_masks=tree(mask), mask_updated=jnp.bool_(False))


@pytest.mark.parametrize("start_mask", [[[True, True], [True, True]],
                                        [[True, False], [True, True]]], ids=["dense", "sparse"])
def test_tracker_splits_load_into_selection_and_compensation(start_mask):
    # A sparse start zeroes W⁰_01 (|W⁰_01| = 2); its dense initial magnitude stays the
    # reference of that entry, so the numbers after the mask change are the dense start's.
    start_mask = jnp.array(start_mask)
    pruner = Pruner("hand", persistent=False, init=None, update=None)
    tracker = burden_tracker.make_tracker(smoke_config(), OneKernelBlock(), pruner, (2,))
    update = jax.jit(tracker.update)
    state = tracker.init({"block_0": {"kernel": W_REF}}, {"block_0": {"kernel": start_mask}})
    state, first = update(state, hand_input(0, jnp.where(start_mask, W_REF, 0.0), start_mask,
                                            G_REF, E_REF))
    for name in ("compensation", "compensation_rms", "compensation_grad"):
        assert first[f"burden/{name}/block_0"] == 1.0, name  # the reference step, exactly
    assert first["burden/selection/block_0"] == first["burden/load/block_0"]
    state, now = update(state, hand_input(1, W_NOW, M_NOW, G_NOW, E_NOW))
    np.testing.assert_array_equal(state["ref_abs_w"]["block_0"]["kernel"], jnp.abs(W_REF))
    expected = {"load": 9 / 4.25, "selection": 5 / 4.25, "compensation": 1.8,
                "compensation_rms": np.sqrt(1.7), "compensation_grad": np.sqrt(2.0)}
    for name, value in expected.items():
        assert float(now[f"burden/{name}/block_0"]) == pytest.approx(value, rel=1e-6), name
    assert now["burden/selection_index"] == now["burden/selection/block_0"]
    assert now["burden/compensation_index"] == now["burden/compensation/block_0"]


def test_burden_index_is_the_mean_of_block_loads():
    assert float(burden.burden_index([1.0, 1.5, 2.0, 1.5])) == pytest.approx(1.5)


@pytest.mark.parametrize("in_axes", [1, 2])
def test_pruned_signal_through_the_model_probe(in_axes):
    rng = np.random.default_rng(1)
    in_shape = (6,) if in_axes == 1 else (2, 3)
    x = jnp.asarray(rng.normal(size=(3, 5, *in_shape)), jnp.float32)
    layer = model_lib.MaskedLinear((4,), in_axes=in_axes, measure_pruned=True,
                                   mask_mode="straight_through")
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params = {"kernel": params["kernel"], "bias": params["bias"] + 1.0}  # bias is excluded
    kernel = params["kernel"]

    def measured(mask):
        _, aux = layer.apply({"params": params, "masks": {"kernel": mask}}, x, mutable=["stats"])
        return float(burden.pruned_signal(aux["stats"]["pruned_sq"][0],
                                          aux["stats"]["dense_sq"][0]))

    assert measured(jnp.ones(kernel.shape, bool)) == 0.0
    assert measured(jnp.zeros(kernel.shape, bool)) == 1.0
    mask = jnp.asarray(rng.random(kernel.shape) < 0.5)
    xf = np.asarray(x).reshape(-1, int(np.prod(in_shape)))
    wf = np.asarray(kernel).reshape(-1, 4)
    removed = xf @ (wf * ~np.asarray(mask).reshape(wf.shape))
    expected = np.sum(removed**2) / np.sum((xf @ wf) ** 2)
    assert measured(mask) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Inside the train step
# --------------------------------------------------------------------------------------------


def run_loop_steps(config, num_calls):
    _, state, history = run_steps(config, num_calls)
    return state, {key: np.concatenate([h[key] for h in history]) for key in history[0]}


@pytest.fixture(scope="module")
def dense_runs():
    on = run_loop_steps(smoke_config(), num_calls=3)
    off = run_loop_steps(smoke_config(**{"burden.enabled": False}), num_calls=3)
    return on, off


def test_metrics_do_not_change_the_trajectory(dense_runs):
    (state_on, hist_on), (state_off, hist_off) = dense_runs
    for a, b in zip(jax.tree.leaves(state_on.params), jax.tree.leaves(state_off.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(hist_on["train/loss"], hist_off["train/loss"])


def test_disabled_removes_everything(dense_runs):
    (_, hist_on), (state_off, hist_off) = dense_runs
    assert not any(k.startswith("burden/") for k in hist_off)
    assert state_off.burden == {}
    assert not build_model(smoke_config(**{"burden.enabled": False}), 4).collect_stats
    names = {k for k in hist_on if k.startswith("burden/")}
    for block in ("block_0", "block_1"):
        for metric in ("load", "overload_frac", "dormant_frac", "attn_overload_frac",
                       "attn_dormant_frac", "pruned_signal", "kept_weight_rms",
                       "kept_grad_rms", "selection", "compensation", "compensation_rms",
                       "compensation_grad"):
            assert f"burden/{metric}/{block}" in names
    assert {"burden/index", "burden/selection_index", "burden/compensation_index",
            "burden/reference_step", "burden/pruned_signal_step"} <= names


def test_dense_run_constants(dense_runs):
    (_, hist), _ = dense_runs
    for group in ("block_0", "block_1", "patch_embed"):
        assert hist[f"burden/load/{group}"][0] == 1.0  # the reference step, bit for bit
        assert hist[f"burden/kept_weight_rms/{group}"][0] == 1.0
        assert np.all(hist[f"burden/pruned_signal/{group}"] == 0.0)  # nothing is ever pruned
        assert np.all(np.isfinite(hist[f"burden/load/{group}"]))
        assert np.all(hist[f"burden/kept_grad_rms/{group}"] > 0)
        # Nothing was selected: the survivors are all of the reference layer, so the load is
        # all compensation, and the kept rms relative to the reference's is compensation_rms.
        np.testing.assert_allclose(hist[f"burden/selection/{group}"], 1.0, rtol=1e-6, atol=0)
        np.testing.assert_allclose(hist[f"burden/compensation/{group}"],
                                   hist[f"burden/load/{group}"], rtol=1e-6)
        np.testing.assert_allclose(hist[f"burden/compensation_rms/{group}"],
                                   hist[f"burden/kept_weight_rms/{group}"], rtol=1e-6)
        for name in ("compensation", "compensation_rms", "compensation_grad"):
            assert hist[f"burden/{name}/{group}"][0] == 1.0
    assert hist["burden/index"][0] == 1.0
    assert hist["burden/selection_index"][0] == hist["burden/compensation_index"][0] == 1.0
    assert np.all(hist["burden/reference_step"] == 0)
    assert np.all(hist["burden/pruned_signal_step"] == -1)  # 'none' never updates a mask


def test_static_random_mask_is_no_selection():
    # A random half of the dense layer carries, on average, what the whole layer carried:
    # selection stays near 1 and, with neither the mask nor the reference changing, constant.
    config = smoke_config(**{"pruning.method": "static", "pruning.sparsity": 0.5})
    _, hist = run_loop_steps(config, num_calls=1)
    selection = hist["burden/selection_index"]
    assert abs(selection[0] - 1.0) < 0.03, selection
    np.testing.assert_allclose(selection, selection[0], rtol=1e-6)
    for block in ("block_0", "block_1"):
        assert hist[f"burden/compensation/{block}"][0] == 1.0
        assert hist[f"burden/selection/{block}"][0] == hist[f"burden/load/{block}"][0]


def one_shot_magnitude_pruner(config, at_step, persistent):
    """Prunes every kernel to 50 % by |W| at the end of step ``at_step``, once."""

    def init(params, rng):
        del rng
        return masks_lib.ones_masks(params, prunable(params, config)), {}

    def update(ctx):
        def prune(args):
            params, masks = args
            flat = masks_lib.select(params, sorted(masks_lib.flatten(masks)))
            new = masks_lib.nest(common.topk_layerwise(
                {p: jnp.abs(w) for p, w in flat.items()},
                {p: masks_lib.num_to_keep(w.size, 0.5) for p, w in flat.items()}))
            return (params if persistent else masks_lib.apply_masks(params, new)), new

        at = ctx.step == at_step
        params, masks = jax.lax.cond(at, prune, lambda a: a, (ctx.params, ctx.masks))
        return dataclasses.replace(PruneResult.unchanged(ctx), params=params, masks=masks,
                                   mask_updated=at)

    return Pruner("one_shot", persistent, init, update)


def run_with_pruner(config, pruner, reference, num_calls):
    ds = smoke_dataset()
    steps = config.train.num_steps
    model = build_model(config, ds.num_classes)
    tx = make_optimizer(config, steps)
    tracker = dataclasses.replace(
        burden_tracker.make_tracker(config, model, pruner, ds.image_shape),
        reference_step=reference)
    state = init_state(model, tx, pruner, ds.image_shape, config.seed,
                       hparams_lib.from_config(config), burden_init=tracker.init)
    step = train.make_train_step(config, model, pruner, ds.num_classes, ds.mean, ds.std,
                                 total_steps=steps, tracker=tracker)
    chunk = jax.jit(train.make_train_call(step))
    order = order_lib.BatchOrder(len(ds.train_labels), config.train.batch_size, config.seed)
    k, history = config.train.steps_per_call, []
    for c in range(num_calls):
        state, metrics = chunk(state, ds.train_images, ds.train_labels, order.block(c * k, k))
        history.append(jax.device_get(metrics))
    return state, {key: np.concatenate([h[key] for h in history]) for key in history[0]}


@pytest.mark.parametrize("persistent", [False, True])
def test_reference_step_and_pruned_signal_around_a_magnitude_prune(persistent):
    ref, every = 6, 4  # the prune happens at the end of step 6; burden.every = 4
    config = smoke_config(**{"burden.every": every})
    _, hist = run_with_pruner(config, one_shot_magnitude_pruner(config, ref, persistent),
                              ref, num_calls=4)
    steps = np.arange(len(hist["train/loss"]))
    np.testing.assert_array_equal(hist["burden/reference_step"], np.where(steps < ref, 0, ref))
    for block in ("block_0", "block_1"):
        load = hist[f"burden/load/{block}"]
        assert load[0] == 1.0 and load[ref] == 1.0  # dense network at both captures
        assert load[ref + 1] > 1.05, load  # the first step of the pruned network
        selection = hist[f"burden/selection/{block}"]
        assert selection[ref] == 1.0 and selection[ref + 1] > 1.05  # the largest were kept
        rms = hist[f"burden/kept_weight_rms/{block}"]
        assert rms[ref] == 1.0 and rms[ref + 1] > 1.05
        signal = hist[f"burden/pruned_signal/{block}"]
        assert np.all(signal[:ref] == 0.0)  # nothing pruned yet
        assert 0.0 < signal[ref] < 1.0
        if not persistent:  # measured at the update, then held
            assert np.all(signal[ref:] == signal[ref])
        else:  # measured again every `every` steps, against the dense weights that persist
            assert np.all(signal[ref:] > 0.0)
    assert hist["burden/index"][ref] == 1.0 and hist["burden/index"][ref + 1] > 1.05
    measured_at = hist["burden/pruned_signal_step"]
    if persistent:
        expected = np.where(steps < ref, steps // every * every,
                            np.maximum(ref, steps // every * every))
    else:
        expected = np.where(steps < ref, -1, ref)
    np.testing.assert_array_equal(measured_at, expected)


def test_reference_step_of_each_method():
    for method, expected in (("none", 0), ("gmp", 10), ("pdwp", 10), ("set", 0), ("rigl", 0),
                             ("static", 0)):
        cfg = smoke_config(**{"pruning.method": method, "pruning.start_frac": 0.25})
        assert burden.reference_step(make_pruner(cfg, 40)) == expected, method


# --------------------------------------------------------------------------------------------
# In the loop: the log, resume, the report
# --------------------------------------------------------------------------------------------


def read_log(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """A gmp smoke run twice: straight through, and stopped at step 20 then resumed.

    The gmp schedule of the smoke config starts at step 4 (the reference step) and updates the
    mask every 4 steps to step 28, so the resumed half must go on with the reference captured
    before the interruption, and with the held pruned signal of the last update.
    """
    config = smoke_config(**{"pruning.method": "gmp"})
    base = tmp_path_factory.mktemp("burden_runs")
    full_dir, cut_dir = str(base / "full"), str(base / "cut")
    loop.train_and_evaluate(config, full_dir, dataset=smoke_dataset())
    real_build = loop.build
    calls = {"n": 0}

    def interrupting_build(*args, **kwargs):  # Ctrl-C after 5 calls of 4 steps: step 20
        run = real_build(*args, **kwargs)
        chunk = run.train_call

        def maybe_interrupt(*a):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return chunk(*a)

        run.train_call = maybe_interrupt
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build", interrupting_build)
        with pytest.raises(KeyboardInterrupt):
            loop.train_and_evaluate(config, cut_dir, dataset=smoke_dataset())
    assert checkpoint.Checkpointer(os.path.join(cut_dir, "checkpoints")).latest_step() == 20
    loop.train_and_evaluate(config, cut_dir, dataset=smoke_dataset())
    return config, full_dir, cut_dir


def burden_records(workdir):
    return [{k: v for k, v in r.items() if k.startswith("burden/") or k == "step"}
            for r in read_log(workdir) if not r.get("final")]


def test_metrics_survive_checkpoint_resume(resumed_runs):
    config, full_dir, cut_dir = resumed_runs
    full, cut = burden_records(full_dir), burden_records(cut_dir)
    assert [r["step"] for r in full] == [8, 16, 24, 32, 40]
    assert full == cut  # including the steps after the resume (reference restored)
    assert all(np.isfinite(v) for r in full for v in r.values())
    assert all(r["burden/reference_step"] == 4 for r in full)
    # A record at step s holds the metrics of the step with index s - 1 (the last of its window).
    assert [r["burden/pruned_signal_step"] for r in full] == [4, 12, 20, 28, 28]
    assert full[-1]["burden/index"] > 1.1  # 90 % sparse: the survivors carry more
    target = checkpoint.abstract_like(
        loop.build(config, smoke_dataset(), mesh=one_device_mesh()).state)

    def restored(workdir):
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
        state = ckpt.restore(target)
        ckpt.close()
        return state.burden

    a, b = restored(full_dir), restored(cut_dir)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(a["reference_step"]) == 4
    assert all(np.isfinite(v) for v in jax.tree.leaves(a["ref_load"]))


def test_selection_times_compensation_is_the_load(resumed_runs):
    # Exact per kernel; a block's values are means over its six kernels, so the identity is
    # checked on the patch embedding, a group of one kernel.
    _, full_dir, _ = resumed_runs
    records = [r for r in read_log(full_dir) if not r.get("final")]
    for record in records:
        selection, compensation, load = (record[f"burden/{name}/patch_embed"]
                                         for name in ("selection", "compensation", "load"))
        assert selection * compensation == pytest.approx(load, rel=1e-5)
        if record["pruning/sparsity"] == 0.0:  # gmp's first update is at 0 % sparsity
            assert record["burden/selection_index"] == pytest.approx(1.0, rel=1e-6)
        else:  # gmp keeps the largest weights
            assert record["burden/selection_index"] > 1.1
    assert sum(r["pruning/sparsity"] > 0 for r in records) >= 3


def test_report_writes_pngs_and_summary(resumed_runs, tmp_path):
    _, full_dir, cut_dir = resumed_runs
    paths = report.main([full_dir])
    names = {os.path.basename(p) for p in paths}
    expected = {"burden_index.png", "load_per_block.png", "unit_fractions.png",
                "survivors.png", "sparsity_accuracy.png", "burden_vs_sparsity.png", "report.md"}
    assert names == expected
    for name in expected:
        assert os.path.getsize(os.path.join(full_dir, name)) > 0
    with open(os.path.join(full_dir, "report.md")) as f:
        text = f.read()
    assert "| full | gmp | 0.900 |" in text and "burden_index.png" in text
    # Several runs overlaid into one directory.
    out = str(tmp_path / "compare")
    paths = report.main([full_dir, cut_dir, "--out", out, "--labels", "full,resumed"])
    assert {os.path.basename(p) for p in paths} == expected
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "| full | gmp |" in text and "| resumed | gmp |" in text
    with pytest.raises(ValueError, match="--out"):
        report.make_report([full_dir, cut_dir])
