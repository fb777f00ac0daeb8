"""Tests for nbjax.pruning.masks: exact counts, ERK budgets, tie rules, path filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbjax.pruning import masks as mk

D, H, DH, MLP, CLASSES = 16, 2, 8, 32, 10


def _block() -> dict:
    def dense(i, o):
        return {"kernel": jnp.ones((i, o)), "bias": jnp.zeros((o,))}

    def qkv():
        return {"kernel": jnp.ones((D, H, DH)), "bias": jnp.zeros((H, DH))}

    return {
        "ln1": {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))},
        "attn": {
            "query": qkv(),
            "key": qkv(),
            "value": qkv(),
            "out": {"kernel": jnp.ones((H, DH, D)), "bias": jnp.zeros((D,))},
        },
        "ln2": {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))},
        "mlp": {"fc1": dense(D, MLP), "fc2": dense(MLP, D)},
    }


def make_params() -> dict:
    return {
        "patch_embed": {"kernel": jnp.ones((7, 7, 1, D)), "bias": jnp.zeros((D,))},
        "cls": jnp.zeros((1, 1, D)),
        "pos_embed": jnp.zeros((1, 17, D)),
        "block_0": _block(),
        "block_1": _block(),
        "norm": {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))},
        "head": {"kernel": jnp.ones((D, CLASSES)), "bias": jnp.zeros((CLASSES,))},
    }


PARAMS = make_params()
PATHS = mk.prunable_paths(PARAMS)
SIZES = {p: mk.flatten(PARAMS)[p].size for p in PATHS}
TOTAL = sum(SIZES.values())


def random_scores(seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(PATHS))
    flat = mk.flatten(PARAMS)
    return {
        p: jnp.abs(jax.random.normal(k, flat[p].shape)) for p, k in zip(PATHS, keys, strict=True)
    }


def tie_scores() -> dict:
    return {p: jnp.zeros(mk.flatten(PARAMS)[p].shape) for p in PATHS}


def kept(masks) -> dict[str, int]:
    return {p: int(np.sum(m)) for p, m in mk.flatten(masks).items()}


# ---------------------------------------------------------------------------- paths


def test_prunable_paths_default_selects_block_and_patch_kernels():
    expected = ["patch_embed/kernel"] + [
        f"block_{b}/{m}/kernel"
        for b in range(2)
        for m in ("attn/key", "attn/out", "attn/query", "attn/value", "mlp/fc1", "mlp/fc2")
    ]
    assert sorted(expected) == PATHS
    for p in PATHS:
        assert not p.startswith("head/") and p.endswith("kernel")


def test_prunable_paths_filters_and_empty_selection_raises():
    assert mk.prunable_paths(PARAMS, include=r"/mlp/") == sorted(
        f"block_{b}/mlp/{f}/{w}"
        for b in range(2)
        for f in ("fc1", "fc2")
        for w in ("bias", "kernel")
    )
    assert "head/kernel" in mk.prunable_paths(PARAMS, exclude=None)
    with pytest.raises(ValueError, match="no prunable leaf"):
        mk.prunable_paths(PARAMS, include=r"nothing_matches")
    with pytest.raises(ValueError, match="no prunable leaf"):
        mk.prunable_paths(PARAMS, exclude=r"kernel")


def test_flatten_nest_roundtrip_and_idempotent():
    flat = mk.flatten(PARAMS)
    assert "block_0/attn/query/kernel" in flat and "cls" in flat
    assert mk.flatten(flat).keys() == flat.keys()
    assert jax.tree.structure(mk.nest(flat)) == jax.tree.structure(PARAMS)


def test_logical_fan_in_out():
    assert mk.logical_fan_in_out("a/fc1/kernel", (16, 32)) == (16, 32)
    assert mk.logical_fan_in_out("attn/query/kernel", (16, 2, 8)) == (16, 16)
    assert mk.logical_fan_in_out("attn/out/kernel", (2, 8, 32)) == (16, 32)
    assert mk.logical_fan_in_out("patch_embed/kernel", (7, 7, 3, 16)) == (147, 16)
    with pytest.raises(ValueError):
        mk.logical_fan_in_out("bias", (16,))
    w = jnp.arange(2 * 8 * 4).reshape(2, 8, 4)
    np.testing.assert_array_equal(mk.to_matrix("attn/out/kernel", w), np.arange(64).reshape(16, 4))


def test_ones_masks_only_prunable_leaves():
    masks = mk.ones_masks(PARAMS, PATHS)
    flat = mk.flatten(masks)
    assert sorted(flat) == PATHS
    for p, m in flat.items():
        assert m.dtype == jnp.bool_ and m.shape == mk.flatten(PARAMS)[p].shape and bool(m.all())


# ---------------------------------------------------------------------------- counts


def test_num_to_keep_rounding():
    assert mk.num_to_keep(100, 0.9) == 10  # (1 - 0.9) * 100 = 9.999... rounds to 10
    assert mk.num_to_keep(10, 0.25) == 8  # 7.5 rounds half up
    assert mk.num_to_keep(10, 0.0) == 10
    assert mk.num_to_keep(10, 1.0) == 0
    assert mk.num_to_keep(3, 0.5) == 2
    assert int(mk.num_to_keep(100, jnp.float32(0.9))) == 10
    with pytest.raises(ValueError):
        mk.num_to_keep(10, 1.5)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("scores_fn", [random_scores, tie_scores])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_layerwise_exact_counts(distribution, scores_fn, sparsity):
    targets = mk.target_sparsities(PARAMS, PATHS, sparsity, distribution)
    masks = mk.compute_masks(scores_fn(), sparsity, distribution, "layerwise")
    counts = kept(masks)
    assert sorted(counts) == PATHS
    for p in PATHS:
        assert counts[p] == mk.num_to_keep(SIZES[p], targets[p])
    if distribution == "uniform":
        assert all(v == sparsity for v in targets.values())
        assert abs(sum(counts.values()) - mk.num_to_keep(TOTAL, sparsity)) <= len(PATHS) / 2
    else:
        assert sum(counts.values()) == mk.num_to_keep(TOTAL, sparsity)


@pytest.mark.parametrize("scores_fn", [random_scores, tie_scores])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9])
def test_global_exact_total(scores_fn, sparsity):
    masks = mk.compute_masks(scores_fn(), sparsity, "uniform", "global")
    assert sum(kept(masks).values()) == mk.num_to_keep(TOTAL, sparsity)
    assert sorted(mk.flatten(masks)) == PATHS


def test_global_keeps_largest_and_ties_follow_path_order():
    scores = {"a/kernel": jnp.array([[1.0, 5.0], [3.0, 0.0]]), "b/kernel": jnp.array([[4.0, 2.0]])}
    masks = mk.flatten(mk.global_masks(scores, 0.5))  # keep 3 of 6: 5, 4, 3
    np.testing.assert_array_equal(masks["a/kernel"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b/kernel"], [[True, False]])
    ties = {"b/kernel": jnp.ones((1, 2)), "a/kernel": jnp.ones((2, 2))}
    masks = mk.flatten(mk.global_masks(ties, 0.5))  # 'a' comes first in path order
    np.testing.assert_array_equal(masks["a/kernel"], [[True, True], [True, False]])
    np.testing.assert_array_equal(masks["b/kernel"], [[False, False]])


def test_global_with_erk_raises_and_unknown_values_raise():
    with pytest.raises(ValueError, match="global"):
        mk.compute_masks(random_scores(), 0.5, "erk", "global")
    with pytest.raises(ValueError, match="allowed"):
        mk.compute_masks(random_scores(), 0.5, "bogus", "layerwise")
    with pytest.raises(ValueError, match="allowed"):
        mk.compute_masks(random_scores(), 0.5, "uniform", "bogus")
    with pytest.raises(ValueError, match="allowed"):
        mk.target_sparsities(PARAMS, PATHS, 0.5, "bogus")
    with pytest.raises(ValueError):
        mk.target_sparsities(PARAMS, PATHS, 1.0)


# ---------------------------------------------------------------------------- ERK


def test_erk_densities_follow_the_formula():
    t = mk.target_sparsities(PARAMS, PATHS, 0.8, "erk")
    dens = {p: 1.0 - s for p, s in t.items()}
    # raw densities (fan_in + fan_out) / (fan_in * fan_out): qkv/out 32/256, fc 48/512,
    # patch 65/784: the wider the layer, the sparser.
    q, fc1 = dens["block_0/attn/query/kernel"], dens["block_0/mlp/fc1/kernel"]
    patch = dens["patch_embed/kernel"]
    assert q > fc1 > patch
    np.testing.assert_allclose(q / fc1, (32 / 256) / (48 / 512), rtol=0.02)
    np.testing.assert_allclose(fc1 / patch, (48 / 512) / (65 / 784), rtol=0.02)
    for b in range(2):
        for m in ("key", "value", "out"):
            assert abs(dens[f"block_{b}/attn/{m}/kernel"] - q) <= 1 / 256
        assert abs(dens[f"block_{b}/mlp/fc2/kernel"] - fc1) <= 1 / 512


def test_erk_3d_kernel_equals_equivalent_matrix():
    shapes_3d = {
        "attn/query/kernel": (16, 2, 8),
        "attn/out/kernel": (2, 8, 16),
        "fc/kernel": (16, 64),
    }
    shapes_2d = {"attn/query/kernel": (16, 16), "attn/out/kernel": (16, 16), "fc/kernel": (16, 64)}
    paths = sorted(shapes_3d)
    t3 = mk.target_sparsities(shapes_3d, paths, 0.7, "erk")
    t2 = mk.target_sparsities(shapes_2d, paths, 0.7, "erk")
    assert t3 == t2


def test_erk_caps_tiny_layer_dense_and_keeps_budget():
    shapes = {"tiny/kernel": (2, 2), "big/kernel": (64, 64), "mid/kernel": (16, 32)}
    paths = sorted(shapes)
    sizes = {"tiny/kernel": 4, "big/kernel": 4096, "mid/kernel": 512}
    total = sum(sizes.values())
    for sparsity in (0.5, 0.9, 0.95):
        t = mk.target_sparsities(shapes, paths, sparsity, "erk")
        assert t["tiny/kernel"] == 0.0  # raw density 1: would exceed 1, so it is dense
        counts = {p: mk.num_to_keep(sizes[p], t[p]) for p in paths}
        assert sum(counts.values()) == mk.num_to_keep(total, sparsity)
    # 0.9: K = 461; eps = 457 / (4096/32 + 512*3/32) = 457 / 176 over big and mid
    t = mk.target_sparsities(shapes, paths, 0.9, "erk")
    np.testing.assert_allclose(1 - t["mid/kernel"], 457 / 176 * 48 / 512, atol=1 / 512)
    np.testing.assert_allclose(1 - t["big/kernel"], 457 / 176 * 128 / 4096, atol=1 / 4096)
    # 0.5: K = 2306; eps = 2306/180 puts tiny (12.8) and mid (1.2) over 1: both dense, and
    # big takes the rest of the budget exactly
    t = mk.target_sparsities(shapes, paths, 0.5, "erk")
    assert t["mid/kernel"] == 0.0
    assert t["big/kernel"] == 1 - (2306 - 4 - 512) / 4096
    # with no sparsity every layer is dense
    assert all(v == 0.0 for v in mk.target_sparsities(shapes, paths, 0.0, "erk").values())


def test_erk_power_scale_zero_is_uniform():
    t = mk.target_sparsities(PARAMS, PATHS, 0.75, "erk", erk_power_scale=0.0)
    for p in PATHS:
        assert abs(t[p] - 0.75) <= 1 / SIZES[p]


# ---------------------------------------------------------------------------- top-k


def test_topk_mask_golden_with_ties():
    s = jnp.array([[1.0, 3.0, 3.0], [0.0, 3.0, 1.0]])
    expected = {
        0: [[0, 0, 0], [0, 0, 0]],
        1: [[0, 1, 0], [0, 0, 0]],
        2: [[0, 1, 1], [0, 0, 0]],
        3: [[0, 1, 1], [0, 1, 0]],
        4: [[1, 1, 1], [0, 1, 0]],  # tie 1.0 at flat 0 and 5: lower index wins
        5: [[1, 1, 1], [0, 1, 1]],
        6: [[1, 1, 1], [1, 1, 1]],
    }
    dyn = jax.jit(mk.topk_mask_dynamic)
    for k, e in expected.items():
        np.testing.assert_array_equal(mk.topk_mask(s, k), np.array(e, bool), err_msg=f"k={k}")
        np.testing.assert_array_equal(dyn(s, k), np.array(e, bool), err_msg=f"dyn k={k}")
    with pytest.raises(ValueError):
        mk.topk_mask(s, 7)


def test_topk_mask_all_equal_signed_zeros_and_nan():
    z = jnp.array([0.0, -0.0, 0.0, -0.0, 0.0, -0.0])
    np.testing.assert_array_equal(mk.topk_mask(z, 4), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(mk.topk_mask(z, 2), [1, 1, 0, 0, 0, 0])
    x = jnp.array([jnp.nan, 1.0, -5.0])
    np.testing.assert_array_equal(mk.topk_mask(x, 2), [0, 1, 1])


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (7, 7, 1, 16)])
def test_topk_static_dynamic_agree_under_jit(shape):
    x = jnp.round(jax.random.normal(jax.random.PRNGKey(1), shape) * 4) / 4  # many ties
    n = x.size
    static = jax.jit(mk.topk_mask, static_argnums=1)
    dyn = jax.jit(mk.topk_mask_dynamic)
    for k in (0, 1, n // 10, n // 2, n // 2 + 1, 9 * n // 10, n):
        a, b = static(x, k), dyn(x, jnp.int32(k))
        assert int(a.sum()) == k
        np.testing.assert_array_equal(a, b)
        # the kept scores are the k largest
        if 0 < k < n:
            assert float(jnp.min(jnp.where(a, x, jnp.inf))) >= float(
                jnp.max(jnp.where(a, -jnp.inf, x))
            )


def test_traced_sparsity_under_jit():
    scores = random_scores()

    @jax.jit
    def build(s):
        return mk.compute_masks(scores, s, "uniform", "layerwise"), mk.global_masks(scores, s)

    for s in (0.5, 0.9):
        lw, gl = build(jnp.float32(s))
        assert kept(lw) == kept(mk.compute_masks(scores, s, "uniform", "layerwise"))
        assert sum(kept(gl).values()) == mk.num_to_keep(TOTAL, s)
    with pytest.raises(ValueError, match="erk"):
        jax.jit(lambda s: mk.compute_masks(scores, s, "erk", "layerwise"))(0.5)


def test_random_masks_exact_and_deterministic():
    targets = mk.target_sparsities(PARAMS, PATHS, 0.8, "erk")
    m1 = mk.random_masks(jax.random.PRNGKey(3), PARAMS, targets)
    m2 = mk.random_masks(
        jax.random.PRNGKey(3), {p: tuple(mk.flatten(PARAMS)[p].shape) for p in PATHS}, targets
    )
    m3 = mk.random_masks(jax.random.PRNGKey(4), PARAMS, targets)
    assert sum(kept(m1).values()) == mk.num_to_keep(TOTAL, 0.8)
    for p in PATHS:
        assert kept(m1)[p] == mk.num_to_keep(SIZES[p], targets[p])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), m1, m2))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), m1, m3))


# ---------------------------------------------------------------------------- using masks


def test_apply_masks_zeros_exactly_masked_entries():
    params = {
        "l": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "bias": jnp.array([1.0, 2.0, 3.0])},
        "head": {"kernel": jnp.ones((3, 2))},
    }
    masks = {"l": {"kernel": jnp.array([[True, False, True], [False, False, True]])}}
    out = mk.apply_masks(params, masks)
    np.testing.assert_array_equal(out["l"]["kernel"], [[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]])
    np.testing.assert_array_equal(out["l"]["bias"], params["l"]["bias"])
    np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
    assert jax.tree.structure(out) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="no matching param"):
        mk.apply_masks(params, {"x": {"kernel": jnp.ones((2, 3), bool)}})
    with pytest.raises(ValueError, match="shape"):
        mk.apply_masks(params, {"l": {"kernel": jnp.ones((3, 2), bool)}})


def test_sparsity_stats_jit():
    masks = {"a": {"kernel": jnp.array([[True, False], [False, False]])}, "b": jnp.ones((4,), bool)}
    stats = jax.jit(mk.sparsity_stats)(masks)
    assert float(stats["a/kernel"]) == 0.75
    assert float(stats["b"]) == 0.0
    assert float(stats["total"]) == 3 / 8
