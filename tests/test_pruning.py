"""Pruning-during-training methods: exact sparsity, schedules, persistence, DST resets, jit.

Two levels. The method level drives ``pruner.update`` over a whole run of a small params tree
(a 4-D conv, 3-D attention kernels, a dense kernel, a bias and a head) in one compiled
``lax.scan``, with random-walk weights and random gradients: cheap, so every method ×
distribution × scope is covered. The train-step level runs the smoke ViT through
``loop.build`` for the properties that need the real step (zeroing, straight-through
gradients, optimizer moments, one compilation).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import smoke_config, smoke_dataset

from nbjax.config import validate
from nbjax.data import pipeline as data
from nbjax.model import build as model_build
from nbjax.parallel.mesh import make_mesh
from nbjax.pruning import PruneContext, common, make_pruner, schedule_steps, schedules
from nbjax.pruning import masks as mk
from nbjax.train import hparams as hparams_lib
from nbjax.train import loop
from nbjax.train import optimizer as optimizer_lib
from nbjax.train import order as order_lib
from nbjax.train import step as train

T = 40  # steps of every simulated run; the smoke schedule gives t0 = 4, t1 = 28, ΔT = 4
COMBOS = [("uniform", "layerwise"), ("erk", "layerwise"), ("uniform", "global")]
# Every method × distribution × scope; the persistent set/rigl variants and the dense
# reference once each (their masks' construction does not depend on persistence); gmp with
# mitigation.persistent=True is pdwp itself (test_persistent_switch).
CASES = [(m, False, d, s) for m in ("gmp", "pdwp", "set", "rigl", "static") for d, s in COMBOS]
CASES += [("set", True, "uniform", "layerwise"), ("rigl", True, "uniform", "layerwise"),
          ("none", False, "uniform", "layerwise")]


def normal_like(key, tree):
    """Standard normals shaped like ``tree``, from one draw (one jax.random call per shape
    would dominate the compile time)."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = jax.random.normal(key, (sum(x.size for x in leaves),))
    out, offset = [], 0
    for x in leaves:
        out.append(flat[offset:offset + x.size].reshape(x.shape))
        offset += x.size
    return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=1)
def toy_params() -> dict:
    """A 4-D conv, 3-D attention kernels (in and out), a dense kernel, a bias and a head."""
    shapes = {"embed/kernel": (2, 2, 3, 16), "block_0/attn/query/kernel": (16, 2, 8),
              "block_0/attn/out/kernel": (2, 8, 16), "block_0/mlp/fc1/kernel": (16, 48),
              "block_0/mlp/fc1/bias": (48,), "head/kernel": (16, 4)}
    zeros = mk.nest({p: jnp.zeros(s) for p, s in shapes.items()})
    return jax.jit(normal_like)(jax.random.PRNGKey(0), zeros)


def cfg(method="gmp", persistent=False, distribution="uniform", scope="layerwise", **kw):
    over = {"pruning.method": method, "mitigation.persistent": persistent,
            "pruning.distribution": distribution, "pruning.scope": scope,
            "burden.enabled": False, **kw}
    return smoke_config(**over)


def sgd_momentum_tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


SIM_TXS = {"adam": lambda: optax.adam(1e-3), "sgd_momentum": sgd_momentum_tx}


def sim(method, persistent=False, distribution="uniform", scope="layerwise", tx="adam"):
    """:func:`simulate` of one configuration, run once per test session (tests share runs).

    gmp/pdwp start at ``initial_sparsity=0.25``, so their schedule has a visible start.
    """
    return _sim(method, persistent, distribution, scope, tx)  # one cache key per config


@functools.cache
def _sim(method, persistent, distribution, scope, tx):
    initial = 0.25 if method in ("gmp", "pdwp") else 0.0
    config = cfg(method, persistent, distribution, scope,
                 **{"pruning.initial_sparsity": initial})
    return (config, *simulate(config, SIM_TXS[tx]()))


def simulate(config, tx, steps=T):
    """Runs ``pruner.update`` after each of ``steps`` random-walk steps, in one jitted scan.

    The optimizer state (of ``tx``) starts with every per-param statistic at 1 and is not
    stepped, so what a mask update resets shows as 0. Returns the pruner, the final (params,
    masks, opt_state, pruning_state), and for every step (stacked) the masks, the optimizer
    state and the metrics.
    """
    pruner = make_pruner(config, steps)

    def body(carry, t):
        params, masks, opt_state, pstate, key = carry
        key, kn, kg, kr = jax.random.split(key, 4)
        params = jax.tree.map(lambda p, n: p + 0.05 * n, params, normal_like(kn, params))
        if not pruner.persistent:
            params = mk.apply_masks(params, masks)
        ctx = pruner.update(PruneContext(step=t, params=params, masks=masks,
                                         opt_state=opt_state, pruning_state=pstate,
                                         grads=normal_like(kg, params), rng=kr,
                                         hparams=hparams_lib.from_config(config)))
        carry = (ctx.params, ctx.masks, ctx.opt_state, ctx.pruning_state, key)
        return carry, (ctx.masks, ctx.opt_state, ctx.metrics)

    @jax.jit
    def run(params):
        masks, pstate = pruner.init(params, jax.random.PRNGKey(1))
        if not pruner.persistent:
            params = mk.apply_masks(params, masks)
        opt_state = optax.tree_map_params(tx, jnp.ones_like, tx.init(params))
        carry = (params, masks, opt_state, pstate, jax.random.PRNGKey(2))
        return jax.lax.scan(body, carry, jnp.arange(steps, dtype=jnp.int32))

    carry, (history, opt_history, metrics) = jax.device_get(run(toy_params()))
    return pruner, carry[:4], history, opt_history, metrics


def counts(masks, stacked=False) -> dict[str, np.ndarray]:
    flat = mk.flatten(masks)
    if stacked:
        return {p: np.asarray(m).reshape(m.shape[0], -1).sum(1) for p, m in flat.items()}
    return {p: int(np.asarray(m).sum()) for p, m in flat.items()}


SHAPES = {p: x.shape for p, x in mk.select(toy_params(), mk.prunable_paths(toy_params())).items()}
SIZES = {p: int(np.prod(s)) for p, s in SHAPES.items()}
N = sum(SIZES.values())


def expected_counts(sparsity, distribution, scope):
    """(per-leaf kept counts or None for global, total kept) the method must realise."""
    if scope == "global":
        return None, mk.num_to_keep(N, sparsity)
    targets = mk.target_sparsities(SHAPES, sorted(SHAPES), sparsity, distribution)
    per_leaf = {p: mk.num_to_keep(SIZES[p], targets[p]) for p in SHAPES}
    return per_leaf, sum(per_leaf.values())


# --------------------------------------------------------------------------------------------
# Method level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,persistent,distribution,scope", CASES)
def test_exact_target_sparsity(method, persistent, distribution, scope):
    config, pruner, (params, masks, _, _), history, _, metrics = sim(
        method, persistent, distribution, scope)
    s = 0.0 if method == "none" else config.pruning.sparsity
    per_leaf, total = expected_counts(s, distribution, scope)
    if distribution == "erk" or scope == "global":
        assert total == mk.num_to_keep(N, s)  # exact total budget
    # Every step from the final update on (from step 0 for the fixed-sparsity methods).
    first = schedule_steps(config, T)[1] if method in ("gmp", "pdwp") else 0
    stacked = counts(history, stacked=True)
    for t in range(first, T):
        if per_leaf is not None:
            assert {p: int(c[t]) for p, c in stacked.items()} == per_leaf, t
        assert sum(int(c[t]) for c in stacked.values()) == total, t
    # The logged sparsities are the realised ones.
    final = counts(masks)
    np.testing.assert_allclose(metrics["pruning/sparsity"][-1], 1 - sum(final.values()) / N,
                               rtol=1e-6)
    for p, c in final.items():
        np.testing.assert_allclose(metrics[f"pruning/sparsity/{p}"][-1], 1 - c / SIZES[p],
                                   rtol=1e-6)
    # Non-persistent: pruned weights are zero; persistent: the dense weights are kept.
    flat_params = mk.flatten(params)
    pruned_values = np.concatenate([np.asarray(flat_params[p])[~np.asarray(m)]
                                    for p, m in mk.flatten(masks).items()])
    if s > 0:
        assert np.all(pruned_values == 0) != pruner.persistent


@pytest.mark.parametrize("distribution,scope", COMBOS)
def test_gmp_schedule_realised_in_mask_counts(distribution, scope):
    config, _, _, history, _, metrics = sim("gmp", False, distribution, scope)
    t0, t1 = schedule_steps(config, T)
    assert (t0, t1) == (4, 28)
    s_i, s_f = 0.25, config.pruning.sparsity
    updates = list(range(t0, t1 + 1, 4))  # ΔT = 4; t1 is on the grid here
    np.testing.assert_array_equal(np.flatnonzero(metrics["pruning/mask_updated"]), updates)
    finals = mk.target_sparsities(SHAPES, sorted(SHAPES), s_f, distribution)
    stacked = counts(history, stacked=True)
    for t in range(T):
        done = [u for u in updates if u <= t]
        if not done:  # dense before the first update
            assert all(int(c[t]) == SIZES[p] for p, c in stacked.items())
            continue
        u = done[-1]
        s_u = schedules.polynomial_sparsity(u, initial=s_i, final=s_f, start_step=t0,
                                            end_step=t1)
        np.testing.assert_allclose(metrics["pruning/target_sparsity"][t], s_u, rtol=1e-6)
        if scope == "global":
            assert sum(int(c[t]) for c in stacked.values()) == mk.num_to_keep(N, s_u), t
            continue
        for p, c in stacked.items():  # each leaf: the schedule scaled to its final target
            start = s_i if finals[p] == s_f else s_i * finals[p] / s_f
            s_l = schedules.polynomial_sparsity(u, initial=start,
                                                final=finals[p], start_step=t0, end_step=t1)
            assert int(c[t]) == mk.num_to_keep(SIZES[p], s_l), (t, p)


@pytest.mark.parametrize("method", ["gmp", "set", "rigl"])
def test_gmp_masks_only_shrink_while_dst_explores(method):
    """gmp masks only shrink; set/rigl regrow (so they must show some re-activation)."""
    *_, history, _, metrics = sim(method)
    flat = {p: np.asarray(m) for p, m in mk.flatten(history).items()}
    shrinking = all(np.all(m[1:] <= m[:-1]) for m in flat.values())
    if method == "gmp":
        assert shrinking
        assert metrics["pruning/reactivated_total"][-1] == 0
    else:
        assert not shrinking
        assert metrics["pruning/reactivated_total"][-1] > 0
        assert metrics["pruning/exploration"][-1] > 1 - smoke_config().pruning.sparsity + 1e-3


def param_trees_with(tx, opt_state, where, fn):
    """``[fn(x, w)]`` over every param-shaped tree x that optax finds in ``opt_state``, with
    ``w`` the matching leaf of ``where`` (a tree shaped like the params)."""
    out = []
    optax.tree_map_params(tx, lambda x, w: out.append(fn(x, w)), opt_state, where,
                          transform_non_params=lambda x: x)
    return out


@pytest.mark.parametrize("method,persistent,tx", [("set", False, "sgd_momentum"),
                                                  ("rigl", False, "adam"),
                                                  ("rigl", True, "adam")])
def test_dst_constant_count_and_regrown_statistics_reset(method, persistent, tx):
    """Constant active count; each update zeroes exactly the regrown entries' statistics in
    every param-shaped tree of the optimizer state (they start at 1 and are never stepped
    here), for Adam and for SGD with momentum; the persistent variant resets nothing."""
    _, pruner, _, history, opt_history, metrics = sim(method, persistent, tx=tx)
    stacked = counts(history, stacked=True)
    assert all(np.all(c == c[0]) for c in stacked.values())
    updates = np.flatnonzero(metrics["pruning/mask_updated"]).tolist()
    assert updates == list(range(4, 30, 4))  # t > 0, t % ΔT == 0, t < drop_end (30)
    flat = {p: np.asarray(m) for p, m in mk.flatten(history).items()}
    ever_regrown = {p: np.zeros(m.shape[1:], bool) for p, m in flat.items()}
    zeros = mk.flatten(jax.tree.map(lambda x: np.zeros(x.shape, bool), toy_params()))
    for t in updates:
        regrown = {p: m[t] & ~m[t - 1] for p, m in flat.items()}
        assert sum(int(r.sum()) for r in regrown.values()) == metrics["pruning/reactivated"][t]
        if not persistent:
            ever_regrown = {p: ever_regrown[p] | regrown[p] for p in flat}
        state_t = jax.tree.map(lambda x, t=t: x[t], opt_history)
        where = mk.nest({**zeros, **ever_regrown})
        ok = param_trees_with(SIM_TXS[tx](), state_t, where, lambda x, w: bool(
            np.array_equal(np.asarray(x), np.where(w, 0.0, 1.0))))
        assert ok and all(ok), t
    assert metrics["pruning/reactivated_total"][-1] > 0
    assert any(r.any() for r in ever_regrown.values()) != persistent


def test_pdwp_reranks_on_its_own_grid_but_prunes_to_gmps_staircase():
    """persistent_update_every=2 with ΔT=4: pdwp updates on t0 + 2k (and after t1), gmp on
    t0 + 4k; at every step both aim at the same target, which changes only on the ΔT grid."""
    over = {"pruning.persistent_update_every": 2, "pruning.initial_sparsity": 0.25}
    runs = {}
    for method in ("gmp", "pdwp"):
        config = cfg(method, **over)
        pruner = make_pruner(config, T)
        update = jax.jit(pruner.update)
        params = toy_params()
        masks, state = pruner.init(params, jax.random.PRNGKey(1))
        opt_state = optax.adam(1e-3).init(params)
        flags, targets = [], []
        for step in range(T):
            ctx = update(PruneContext(step=jnp.int32(step), params=params, masks=masks,
                                      opt_state=opt_state, pruning_state=state, grads=params,
                                      rng=jax.random.PRNGKey(3),
                                      hparams=hparams_lib.from_config(config)))
            masks, state = ctx.masks, ctx.pruning_state
            flags.append(bool(ctx.metrics["pruning/mask_updated"]))
            targets.append(float(ctx.metrics["pruning/target_sparsity"]))
        runs[method] = (flags, targets)
    t0, t1 = schedule_steps(cfg("pdwp", **over), T)
    assert (t0, t1) == (4, 28)
    assert [t for t, f in enumerate(runs["gmp"][0]) if f] == list(range(t0, t1 + 1, 4))
    assert [t for t, f in enumerate(runs["pdwp"][0]) if f] == list(range(t0, T, 2))
    pdwp_targets = runs["pdwp"][1]
    for t in range(t0, t1, 4):  # held between gmp's steps, and equal to gmp's on them
        assert pdwp_targets[t + 2] == pdwp_targets[t]
        assert pdwp_targets[t] == pytest.approx(runs["gmp"][1][t], abs=1e-7)
    assert pdwp_targets[t1] == pytest.approx(runs["gmp"][1][t1], abs=1e-7)
    assert pdwp_targets[t0] == pytest.approx(0.25) and pdwp_targets[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("method,comes_back", [("pdwp", True), ("gmp", False)])
def test_weight_comes_back_when_its_magnitude_overtakes(method, comes_back):
    """pdwp ranks the dense weights, so a pruned weight that grows re-enters; gmp never."""
    config = cfg(method)
    pruner = make_pruner(config, T)
    update = jax.jit(pruner.update)
    params = toy_params()
    masks, state = pruner.init(params, jax.random.PRNGKey(1))
    opt_state = optax.adam(1e-3).init(params)

    def at(step, params, masks, state):
        return update(PruneContext(step=jnp.int32(step), params=params, masks=masks,
                                   opt_state=opt_state, pruning_state=state, grads=params,
                                   rng=jax.random.PRNGKey(3),
                                   hparams=hparams_lib.from_config(config)))

    ctx = at(8, params, masks, state)  # first update with sparsity > 0
    fc1 = np.asarray(ctx.masks["block_0"]["mlp"]["fc1"]["kernel"])
    i, j = np.argwhere(~fc1)[0]
    grown = mk.flatten(ctx.params)
    grown["block_0/mlp/fc1/kernel"] = grown["block_0/mlp/fc1/kernel"].at[i, j].set(100.0)
    ctx2 = at(9, mk.nest(grown), ctx.masks, ctx.pruning_state)  # not an update step
    assert not ctx2.masks["block_0"]["mlp"]["fc1"]["kernel"][i, j]
    assert ctx2.metrics["pruning/mask_updated"] == 0
    ctx3 = at(12, ctx2.params, ctx2.masks, ctx2.pruning_state)
    assert ctx3.metrics["pruning/mask_updated"] == 1
    assert bool(ctx3.masks["block_0"]["mlp"]["fc1"]["kernel"][i, j]) == comes_back
    assert (int(ctx3.metrics["pruning/reactivated"]) >= 1) == comes_back
    assert int(ctx3.pruning_state["reactivated_total"]) == int(ctx3.metrics["pruning/reactivated"])


def test_rigl_update_drops_smallest_and_regrows_largest_gradient_by_hand():
    """One RigL update, checked entry by entry: per leaf n = round(f_t · k) of the kept weights
    with the smallest |W| go, and the n pruned entries with the largest |gradient| come in."""
    config = cfg("rigl")
    pruner = make_pruner(config, T)
    params = toy_params()
    masks, state = pruner.init(params, jax.random.PRNGKey(1))
    old = {p: np.asarray(m) for p, m in mk.flatten(masks).items()}
    # Distinct gradients on the pruned entries, 0 on the kept ones (so no dropped one regrows).
    grads = {p: np.where(old[p], 0.0, 1.0 + np.asarray(u))
             for p, u in common.uniform_scores(jax.random.PRNGKey(9), SHAPES).items()}
    weights = mk.flatten(params)
    step = 4
    ctx = jax.jit(pruner.update)(PruneContext(
        step=jnp.int32(step), params=params, masks=masks, opt_state=optax.adam(1e-3).init(params),
        pruning_state=state, grads=mk.nest({**weights, **grads}), rng=jax.random.PRNGKey(3),
        hparams=hparams_lib.from_config(config)))
    f = schedules.cosine_drop_fraction(step, initial=config.pruning.drop_fraction,
                                       end_step=30)
    regrown_total = 0
    for p, m in old.items():
        k = int(m.sum())
        n = int(np.floor(f * k + 0.5))
        assert n > 0, p
        w = np.abs(np.asarray(weights[p])).reshape(-1)
        kept_idx = np.flatnonzero(m.reshape(-1))
        dropped = kept_idx[np.argsort(w[kept_idx])[:n]]
        pruned_idx = np.flatnonzero(~m.reshape(-1))
        grown = pruned_idx[np.argsort(-grads[p].reshape(-1)[pruned_idx])[:n]]
        want = m.reshape(-1).copy()
        want[dropped], want[grown] = False, True
        np.testing.assert_array_equal(np.asarray(mk.flatten(ctx.masks)[p]).reshape(-1), want,
                                      err_msg=p)
        regrown_total += n
    assert int(ctx.metrics["pruning/reactivated"]) == regrown_total
    assert float(ctx.metrics["pruning/mask_updated"]) == 1.0


@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_budgets_sum_to_global_target(sparsity, power):
    """On the smoke ViT's real kernels (3-D attention, 4-D patch embedding), caps included."""
    config = cfg("rigl", distribution="erk", **{"pruning.sparsity": sparsity,
                                                 "pruning.erk_power_scale": power})
    model = model_build.build_model(config, 4)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 8, 8, 1)))["params"])
    paths = mk.prunable_paths(params, config.pruning.include, config.pruning.exclude)
    shapes = {p: x.shape for p, x in mk.select(params, paths).items()}
    targets = common.leaf_targets(shapes, sparsity, config)
    sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
    total = sum(mk.num_to_keep(sizes[p], targets[p]) for p in paths)
    assert total == mk.num_to_keep(sum(sizes.values()), sparsity)
    assert len(set(targets.values())) > 1  # a real distribution, not uniform


def adamw_tx():
    return optimizer_lib.make_optimizer(smoke_config(), T)


def masked_adam_tx():
    return optax.chain(optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(
        lambda x: x.ndim > 1, p)), optax.add_decayed_weights(1e-4))


@pytest.mark.parametrize("make_tx", [adamw_tx, sgd_momentum_tx, masked_adam_tx])
def test_reset_param_state_matches_optax_tree_map_params(make_tx):
    """The path-matching reset zeroes exactly what optax itself calls per-param state."""
    tx = make_tx()
    params = toy_params()
    state = tx.init(params)
    # Fill every param-shaped statistic with non-zeros (optax's own view of the state).
    masked_node = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    state = jax.jit(lambda state: optax.tree_map_params(
        tx, lambda x: x if masked_node(x) else jnp.full_like(x, 2.0), state,
        is_leaf=masked_node))(state)
    where = {p: u < 0.3 for p, u in common.uniform_scores(jax.random.PRNGKey(5), SHAPES).items()}
    full = mk.flatten(jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params))
    full.update(where)
    got = jax.jit(common.reset_param_state)(state, where)
    want = jax.jit(lambda state, full: optax.tree_map_params(
        tx, lambda x, w: x if masked_node(x) else jnp.where(w, 0.0, x), state, full,
        is_leaf=masked_node))(state, mk.nest(full))
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    zeroed = sum(int(np.sum(np.asarray(a) == 0)) for a in got_leaves)
    assert zeroed > 0


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="persistent"):
        validate(cfg("static", persistent=True))
    with pytest.raises(ValueError, match="persistent"):
        make_pruner(cfg("static", persistent=True), T)
    with pytest.raises(ValueError, match="scope='global'"):
        validate(cfg("gmp", distribution="erk", scope="global"))
    with pytest.raises(ValueError, match="initial_sparsity"):
        validate(cfg("gmp", **{"pruning.initial_sparsity": 0.95}))
    with pytest.raises(ValueError, match="train longer"):
        make_pruner(cfg("gmp"), 1)
    validate(cfg("none", persistent=True))  # dense: persistence is a no-op
    validate(cfg("rigl", persistent=True))


def test_persistent_switch():
    """mitigation.persistent turns gmp into pdwp and set/rigl into their persistent variants."""
    for method in ("gmp", "set", "rigl"):
        assert not make_pruner(cfg(method), T).persistent
        assert make_pruner(cfg(method, persistent=True), T).persistent
    assert make_pruner(cfg("pdwp"), T).persistent
    a, b = sim("gmp", persistent=True), sim("pdwp")
    for x, y in zip(jax.tree.leaves(a[2:]), jax.tree.leaves(b[2:]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_step_derivation():
    config = cfg("gmp", **{"pruning.start_frac": 0.125, "pruning.end_frac": 1.0})
    assert schedule_steps(config, 100) == (13, 99)  # round half up; end clipped to last step
    assert schedule_steps(cfg("gmp"), T) == (4, 28)


# --------------------------------------------------------------------------------------------
# Train-step level (the smoke ViT through loop.build)
# --------------------------------------------------------------------------------------------


def build(config):
    return loop.build(config, smoke_dataset(), mesh=make_mesh(jax.devices()[:1]))


def run_calls(run, state, start_call, num_calls):
    """Runs calls; returns the state and the host copies (state, metrics) after each call."""
    config = run.config
    order = order_lib.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                                 config.seed)
    k = config.train.steps_per_call
    out = []
    for c in range(start_call, start_call + num_calls):
        state, metrics = run.train_call(state, run.train_images, run.train_labels,
                                        jax.device_put(order.block(c * k, k)))
        out.append((jax.device_get(state), jax.device_get(metrics)))
    return state, out


def test_gmp_in_the_train_step():
    """Zeros stay zero, schedule counts, exact final sparsity, same keys, one compilation."""
    config = cfg("gmp")
    run = build(config)
    _, history = run_calls(run, run.state, 0, T // 4)
    t0, t1 = schedule_steps(config, T)
    paths = sorted(mk.flatten(run.state.masks))
    sizes = {p: mk.flatten(run.state.masks)[p].size for p in paths}
    for c, (state, _) in enumerate(history):
        masks = mk.flatten(state.masks)
        assert all(np.all(mk.flatten(state.params)[p][~masks[p]] == 0) for p in paths)
        for later, _ in history[c + 1:]:
            lm, lp = mk.flatten(later.masks), mk.flatten(later.params)
            for p in paths:
                assert not np.any(lm[p] & ~masks[p]), (c, p)  # never regrows
                assert np.all(lp[p][~masks[p]] == 0), (c, p)  # pruned: exactly zero
        # The update of step 4c (if any) is the last one applied after call c.
        u = 4 * c
        if t0 <= u <= t1:
            s_u = schedules.polynomial_sparsity(u, initial=0.0, final=0.9, start_step=t0,
                                                end_step=t1)
            for p in paths:
                assert int(masks[p].sum()) == mk.num_to_keep(sizes[p], s_u), (c, p)
    final = mk.flatten(history[-1][0].masks)
    for p in paths:
        assert int(final[p].sum()) == mk.num_to_keep(sizes[p], 0.9)
    metrics = [m for _, m in history]
    keys = set(metrics[0])
    assert all(set(m) == keys for m in metrics)
    required = {"pruning/sparsity", "pruning/target_sparsity", "pruning/mask_updated",
                "pruning/turnover", "pruning/reactivated", "pruning/exploration",
                *(f"pruning/sparsity/{p}" for p in paths)}
    assert required <= keys
    updated = np.concatenate([m["pruning/mask_updated"] for m in metrics])
    assert updated.tolist() == [float(t in range(4, 29, 4)) for t in range(T)]
    assert run.train_call._cache_size() == 1  # update and non-update steps: one program


def test_pdwp_pruned_weights_keep_learning_and_come_back():
    config = cfg("pdwp")
    run = build(config)
    state, history = run_calls(run, run.state, 0, 4)  # steps 0-15; updates at 4, 8, 12
    before, after = history[-2][0], history[-1][0]  # after steps 11 and 15
    for p in sorted(mk.flatten(before.masks)):
        m0, m1 = mk.flatten(before.masks)[p], mk.flatten(after.masks)[p]
        w0, w1 = mk.flatten(before.params)[p], mk.flatten(after.params)[p]
        both = ~m0 & ~m1
        assert both.any()
        assert np.all(w1[both] != w0[both]), p  # the dense value of a pruned weight learns
        assert np.all(w1[both] != 0)
    # Construct a re-activation: blow up a pruned weight; step 16 is an update step.
    kernel = np.array(after.params["block_0"]["fc1"]["kernel"])
    mask = np.asarray(after.masks["block_0"]["fc1"]["kernel"])
    i, j = np.argwhere(~mask)[0]
    kernel[i, j] = 10 * np.abs(kernel).max()
    params = jax.tree.map(jnp.asarray, after.params)
    params["block_0"]["fc1"]["kernel"] = jnp.asarray(kernel)
    state = state.replace(params=params)
    _, history = run_calls(run, state, 4, 1)
    new_state, metrics = history[0]
    assert metrics["pruning/mask_updated"][0] == 1
    assert new_state.masks["block_0"]["fc1"]["kernel"][i, j]
    assert metrics["pruning/reactivated"][0] >= 1


def check_masked_step_equals_hand_masked(run, tx):
    """One train step (straight-through masks, masked gradient, re-zeroing) equals the
    textbook masked step: the gradient of the loss of W ⊙ M, then the optimizer, then ⊙ M."""
    config = run.config
    state = jax.tree.map(jnp.array, run.state)  # a copy: the chunk donates its input
    model = model_build.build_model(config, run.dataset.num_classes)
    order = order_lib.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                                 config.seed)
    idx = order.block(0, 1)[0]
    aug_rng, _ = jax.random.split(jax.random.fold_in(state.rng, state.step))
    images = data.normalize(run.dataset.train_images[idx], run.dataset.mean, run.dataset.std)
    images = data.augment(images, aug_rng, config.data.augment, config.data.augment_pad,
                          config.data.augment_pad_mode)
    labels = jnp.asarray(run.dataset.train_labels[idx])
    ones = jax.tree.map(jnp.ones_like, state.masks)

    def loss(params):
        masked = mk.apply_masks(params, state.masks)
        logits, _ = model.apply({"params": masked, "masks": ones}, images, mutable=["stats"])
        return train.cross_entropy(logits, labels, run.dataset.num_classes)

    @jax.jit
    def hand_step(params, opt_state):
        grads = mk.apply_masks(jax.grad(loss)(params), state.masks)
        updates, _ = tx.update(grads, opt_state, params)
        return mk.apply_masks(optax.apply_updates(params, updates), state.masks)

    by_hand = hand_step(state.params, state.opt_state)
    _, ((stepped, _),) = run_calls(run, jax.tree.map(jnp.array, run.state), 0, 1)
    for a, b in zip(jax.tree.leaves(by_hand), jax.tree.leaves(stepped.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rigl_in_the_train_step():
    """AdamW, the real step: the masked step equals the hand-masked one; the active count is
    constant; regrown weights are 0 with every optimizer statistic 0 right after the update."""
    config = cfg("rigl", **{"train.steps_per_call": 1})
    tx = optimizer_lib.make_optimizer(config, T)
    run = build(config)
    check_masked_step_equals_hand_masked(run, tx)
    state = run.state
    init_counts = counts(jax.device_get(state.masks))
    regrown_total = 0
    for c in range(13):  # steps 0-12: updates at 4, 8, 12 (one step per call)
        before = jax.device_get(state.masks)
        state, ((host, metrics),) = run_calls(run, state, c, 1)
        assert counts(host.masks) == init_counts, c  # constant number of active weights
        assert metrics["pruning/mask_updated"][0] == float(c in (4, 8, 12))
        regrown = {p: np.asarray(m) & ~np.asarray(mk.flatten(before)[p])
                   for p, m in mk.flatten(host.masks).items()}
        n = sum(int(r.sum()) for r in regrown.values())
        assert n == int(metrics["pruning/reactivated"][0]) or c not in (4, 8, 12)
        regrown_total += n
        if n == 0:
            continue
        params = mk.flatten(host.params)
        for p, r in regrown.items():
            assert np.all(params[p][r] == 0)  # regrown weights start at zero
        full = mk.flatten(jax.tree.map(lambda x: np.zeros(x.shape, bool), host.params))
        full.update(regrown)
        where = mk.nest(full)
        zero_at_regrown = param_trees_with(tx, host.opt_state, where,
                                           lambda x, w: bool(np.all(np.asarray(x)[w] == 0)))
        nonzero_elsewhere = param_trees_with(tx, host.opt_state, where,
                                             lambda x, w: bool(np.any(np.asarray(x) != 0)))
        assert zero_at_regrown and all(zero_at_regrown)
        assert all(nonzero_elsewhere)
    assert regrown_total > 0
