"""Mask building: path filters, exact counts, ERK budgets, and the one top-k with its tie rule
(``nbjax.pruning.common.topk_layerwise`` / ``topk_global``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbjax.pruning import common
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
    ks = {p: mk.num_to_keep(SIZES[p], targets[p]) for p in PATHS}
    counts = kept(common.topk_layerwise(scores_fn(), ks))
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
    masks = common.topk_global(scores_fn(), mk.num_to_keep(TOTAL, sparsity))
    assert sum(kept(masks).values()) == mk.num_to_keep(TOTAL, sparsity)
    assert sorted(masks) == PATHS


def test_unknown_distribution_and_full_sparsity_raise():
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


def topk_one(scores, k) -> np.ndarray:
    """The top-k mask of a single leaf."""
    return np.asarray(common.topk_layerwise({"w": jnp.asarray(scores)}, {"w": k})["w"])


def stable_reference(scores, k) -> np.ndarray:
    """The documented rule in NumPy: the first k of a stable descending order (lower index
    first among equal scores; -0.0 == +0.0 for NumPy's comparison too)."""
    x = np.asarray(scores, np.float32)
    order = np.argsort(-x.reshape(-1), kind="stable")
    keep = np.zeros(x.size, bool)
    keep[order[:k]] = True
    return keep.reshape(x.shape)


def test_topk_golden_table_with_ties():
    s = jnp.array([[1.0, 3.0, 3.0], [0.0, 3.0, 1.0]])
    expected = {
        0: [[0, 0, 0], [0, 0, 0]],
        1: [[0, 1, 0], [0, 0, 0]],  # three 3.0s: the lowest flat index first
        2: [[0, 1, 1], [0, 0, 0]],
        3: [[0, 1, 1], [0, 1, 0]],
        4: [[1, 1, 1], [0, 1, 0]],  # 1.0 at flat 0 and 5: flat 0 wins
        5: [[1, 1, 1], [0, 1, 1]],
        6: [[1, 1, 1], [1, 1, 1]],
    }
    traced = jax.jit(common.topk_layerwise)
    for k, e in expected.items():
        want = np.array(e, bool)
        np.testing.assert_array_equal(topk_one(s, k), want, err_msg=f"k={k}")
        got = traced({"w": s}, {"w": jnp.int32(k)})["w"]
        np.testing.assert_array_equal(got, want, err_msg=f"traced k={k}")
    np.testing.assert_array_equal(topk_one(s, 9), np.ones((2, 3), bool))  # k clipped to n
    np.testing.assert_array_equal(topk_one(s, -1), np.zeros((2, 3), bool))


def test_topk_signed_zeros_tie_and_nan_ranks_below_minus_inf():
    z = [0.0, -0.0, 0.0, -0.0, 0.0, -0.0]
    assert topk_one(z, 4).tolist() == [1, 1, 1, 1, 0, 0]
    assert topk_one(z, 2).tolist() == [1, 1, 0, 0, 0, 0]
    x = [jnp.nan, 1.0, -jnp.inf, 0.0, -0.0, jnp.inf]
    assert topk_one(x, 3).tolist() == [0, 1, 0, 1, 0, 1]
    assert topk_one(x, 4).tolist() == [0, 1, 0, 1, 1, 1]  # -0.0 ties with 0.0, lower index 3
    assert topk_one(x, 5).tolist() == [0, 1, 1, 1, 1, 1]  # -inf before NaN


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (7, 7, 1, 16)])
def test_topk_equals_stable_sort_and_lax_top_k_under_ties(shape):
    """Quarter-rounded normals (about 30 distinct values, ±0 among them): many ties. The
    segmented sort keeps what a stable descending sort keeps and what ``lax.top_k`` (equal
    values in index order) keeps, for a traced k."""
    x = jnp.round(jax.random.normal(jax.random.PRNGKey(1), shape) * 4) / 4
    assert bool(jnp.any(jnp.signbit(x) & (x == 0)))  # -0.0 is among the ties
    n = x.size
    traced = jax.jit(lambda s, k: common.topk_layerwise({"w": s}, {"w": k})["w"])
    for k in (0, 1, n // 10, n // 2, n // 2 + 1, 9 * n // 10, n):
        got = np.asarray(traced(x, jnp.int32(k)))
        assert int(got.sum()) == k
        np.testing.assert_array_equal(got, stable_reference(x, k), err_msg=f"k={k}")
        # lax.top_k ranks -0.0 below +0.0: compare on +0.0 only
        _, idx = jax.lax.top_k((x + 0.0).reshape(-1), k)
        by_top_k = np.zeros(n, bool)
        by_top_k[np.asarray(idx)] = True
        np.testing.assert_array_equal(got.reshape(-1), by_top_k, err_msg=f"top_k k={k}")


def test_topk_layerwise_segments_do_not_mix():
    """Every leaf of one sorted call equals its own stable top-k (all-equal leaves included)."""
    scores = {p: jnp.round(s * 2) / 2 for p, s in random_scores(3).items()}
    scores["block_1/mlp/fc1/kernel"] = jnp.zeros((D, MLP))
    ks = {p: SIZES[p] // (i + 2) for i, p in enumerate(PATHS)}
    got = jax.jit(common.topk_layerwise)(scores, ks)
    for p in PATHS:
        np.testing.assert_array_equal(got[p], stable_reference(scores[p], ks[p]), err_msg=p)


def test_topk_global_keeps_largest_and_ties_follow_path_order():
    scores = {"b/kernel": jnp.array([[4.0, 2.0]]), "a/kernel": jnp.array([[1.0, 5.0], [3.0, 0.0]])}
    masks = common.topk_global(scores, 3)  # 5, 4, 3
    np.testing.assert_array_equal(masks["a/kernel"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b/kernel"], [[True, False]])
    ties = {"b/kernel": jnp.ones((1, 2)), "a/kernel": jnp.ones((2, 2))}
    masks = common.topk_global(ties, 3)  # 'a' comes first in path order
    np.testing.assert_array_equal(masks["a/kernel"], [[True, True], [True, False]])
    np.testing.assert_array_equal(masks["b/kernel"], [[False, False]])


def test_topk_global_equals_stable_sort_of_leaves_in_path_order():
    scores = {p: jnp.round(s * 2) / 2 for p, s in random_scores(4).items()}
    flat = np.concatenate([np.asarray(scores[p]).reshape(-1) for p in PATHS])
    for k in (1, TOTAL // 3, TOTAL - 1):
        got = jax.jit(common.topk_global)(scores, jnp.int32(k))
        joined = np.concatenate([np.asarray(got[p]).reshape(-1) for p in PATHS])
        np.testing.assert_array_equal(joined, stable_reference(flat, k), err_msg=f"k={k}")


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
