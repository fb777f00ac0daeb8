"""Tests for nbjax.tome.merge against a plain NumPy reference of ToMe (Bolya et al. 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbjax.tome import merge as tome

# --------------------------------------------------------------------------- reference


def ref_merge(x, metric, size, r, source=None, protect_cls=True):
    """Loop-based NumPy ToMe: returns (x', size', source') in the kept-A-then-B order."""
    B, T, _ = x.shape
    num_a = (T + 1) // 2
    r_max = 0 if T < 2 else num_a - (1 if protect_cls else 0)
    r = max(0, min(r, r_max))
    if r == 0:
        return x.copy(), size.copy(), None if source is None else source.copy()
    xs, ss, srcs = [], [], []
    for n in range(B):
        m = metric[n].astype(np.float32)
        m = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-6)
        a_ids = list(range(0, T, 2))
        b_ids = list(range(1, T, 2))
        best = np.empty(len(a_ids), np.float32)
        match = np.empty(len(a_ids), np.int64)
        for i, ai in enumerate(a_ids):
            if protect_cls and i == 0:
                best[i], match[i] = -np.inf, 0
                continue
            sc = np.array([m[ai] @ m[bj] for bj in b_ids], np.float32)
            best[i], match[i] = sc.max(), int(np.argmax(sc))
        order = np.argsort(-best, kind="stable")
        merged = set(order[:r].tolist())
        kept = [i for i in range(len(a_ids)) if i not in merged]
        # Groups: each output token = list of original token indices.
        groups = [[a_ids[i]] for i in kept]
        b_groups = [[bj] for bj in b_ids]
        for i in order[:r]:
            b_groups[match[i]].append(a_ids[i])
        groups += b_groups
        xo = np.zeros((len(groups), x.shape[2]))
        so = np.zeros(len(groups))
        for g, members in enumerate(groups):
            w = size[n, members].astype(np.float64)
            so[g] = w.sum()
            xo[g] = (w[:, None] * x[n, members].astype(np.float64)).sum(0) / w.sum()
        xs.append(xo)
        ss.append(so)
        if source is not None:
            srcs.append(np.stack([source[n, members].sum(0) for members in groups]))
    src_out = None if source is None else np.stack(srcs)
    return np.stack(xs), np.stack(ss), src_out


def _inputs(B, T, D=8, C=6, seed=0, random_size=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    metric = rng.normal(size=(B, T, C)).astype(np.float32)
    if random_size:
        size = rng.integers(1, 4, size=(B, T)).astype(np.float32)
    else:
        size = np.ones((B, T), np.float32)
    source = np.broadcast_to(np.eye(T, dtype=np.float32), (B, T, T)).copy()
    return x, metric, size, source


CASES = [
    (2, 50, 25, True),  # clipped to 24
    (3, 50, 10, True),
    (2, 49, 12, True),  # odd T
    (2, 49, 30, True),  # odd T, clipped
    (4, 17, 5, True),
    (2, 16, 8, False),  # no class token: every A token may merge
    (2, 15, 8, False),  # odd T, no class token, clip to ceil(15/2) = 8
    (1, 3, 1, True),
    (2, 10, 0, True),
]


@pytest.mark.parametrize("B,T,r,protect", CASES)
@pytest.mark.parametrize("random_size", [False, True])
def test_matches_numpy_reference(B, T, r, protect, random_size):
    x, metric, size, source = _inputs(B, T, seed=B * 100 + T + r, random_size=random_size)
    jx, js, jsrc = tome.merge_tokens(
        jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), r, jnp.asarray(source), protect
    )
    rx, rs, rsrc = ref_merge(x, metric, size, r, source, protect)
    assert jx.shape == rx.shape and js.shape == rs.shape and jsrc.shape == rsrc.shape
    np.testing.assert_allclose(np.asarray(jx), rx, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(js), rs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jsrc), rsrc, atol=1e-5)


def test_ties_deterministic():
    """All tokens identical: every score ties; the stable order picks A tokens 1..r into B 0."""
    B, T, r = 2, 11, 3
    x, _, size, source = _inputs(B, T)
    metric = np.ones((B, T, 4), np.float32)
    jx, js, jsrc = tome.merge_tokens(
        jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), r, jnp.asarray(source)
    )
    rx, rs, rsrc = ref_merge(x, metric, size, r, source)
    np.testing.assert_allclose(np.asarray(jx), rx, atol=1e-5)
    np.testing.assert_allclose(np.asarray(js), rs)
    np.testing.assert_allclose(np.asarray(jsrc), rsrc)
    plan = tome.bipartite_soft_matching(jnp.asarray(metric), r)
    np.testing.assert_array_equal(np.asarray(plan.src_idx), [[1, 2, 3]] * B)
    np.testing.assert_array_equal(np.asarray(plan.dst_idx), [[0, 0, 0]] * B)


# --------------------------------------------------------------------------- invariants


def test_r_zero_is_identity():
    x, metric, size, source = _inputs(2, 12, random_size=True)
    jx, js, jsrc = tome.merge_tokens(
        jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), 0, jnp.asarray(source)
    )
    np.testing.assert_array_equal(np.asarray(jx), x)
    np.testing.assert_array_equal(np.asarray(js), size)
    np.testing.assert_array_equal(np.asarray(jsrc), source)
    # A clip to 0 (T = 2 with a class token) is the identity too.
    jx2, _, _ = tome.merge_tokens(jnp.asarray(x[:, :2]), jnp.asarray(metric[:, :2]), None, 5)
    np.testing.assert_array_equal(np.asarray(jx2), x[:, :2])


@pytest.mark.parametrize("T,r", [(50, 24), (50, 7), (49, 24), (9, 4)])
def test_class_token_and_conservation(T, r):
    B = 4
    x, metric, size, source = _inputs(B, T, seed=T + r)
    # Make the class token's key the most similar to everything: it must still not merge.
    metric[:, 0] = metric[:, 1:].mean(1)
    jx, js, jsrc = tome.merge_tokens(
        jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), r, jnp.asarray(source)
    )
    jx, js, jsrc = map(np.asarray, (jx, js, jsrc))
    assert jx.shape == (B, T - r, x.shape[2])
    # Class token: unchanged at index 0, size 1, source one-hot on token 0.
    np.testing.assert_array_equal(jx[:, 0], x[:, 0])
    np.testing.assert_array_equal(js[:, 0], 1.0)
    expect = np.zeros(T, np.float32)
    expect[0] = 1.0
    np.testing.assert_array_equal(jsrc[:, 0], np.broadcast_to(expect, (B, T)))
    # Sizes add up; source rows sum to sizes and every input token is covered exactly once.
    np.testing.assert_allclose(js.sum(1), T)
    np.testing.assert_allclose(jsrc.sum(-1), js)
    np.testing.assert_allclose(jsrc.sum(1), 1.0)
    # Size-weighted mean of merged tokens equals the mean of the original tokens.
    wmean = (js[..., None] * jx).sum(1) / js.sum(1)[:, None]
    np.testing.assert_allclose(wmean, x.mean(1), atol=1e-5)
    # Merged tokens equal the mean of their source tokens.
    np.testing.assert_allclose(jx, np.einsum("btn,bnd->btd", jsrc, x) / js[..., None], atol=1e-5)


def test_repeated_merges_compose():
    """Two merges in a row (every-layer mode) keep sizes, source and means consistent."""
    B, T = 3, 50
    x, metric, size, source = _inputs(B, T, seed=7)
    jx, js, jsrc = jnp.asarray(x), jnp.asarray(size), jnp.asarray(source)
    rng = np.random.default_rng(1)
    for r, expect_t in zip(tome.every_layer_schedule(T, 3, 16), [34, 18, 10], strict=True):
        m = jnp.asarray(rng.normal(size=(B, jx.shape[1], 6)).astype(np.float32))
        jx, js, jsrc = tome.merge_tokens(jx, m, js, r, jsrc)
        assert jx.shape[1] == expect_t
    np.testing.assert_allclose(np.asarray(js).sum(1), T)
    np.testing.assert_allclose(np.asarray(jsrc).sum(-1), np.asarray(js))
    wmean = (np.asarray(js)[..., None] * np.asarray(jx)).sum(1) / T
    np.testing.assert_allclose(wmean, x.mean(1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jx)[:, 0], x[:, 0])


def test_bf16_tokens():
    x, metric, size, _ = _inputs(2, 50, seed=3)
    jx, js, _ = tome.merge_tokens(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(metric, jnp.bfloat16), jnp.asarray(size), 20
    )
    assert jx.dtype == jnp.bfloat16 and js.dtype == jnp.float32
    assert jx.shape == (2, 30, 8)
    np.testing.assert_allclose(np.asarray(js).sum(1), 50)


# --------------------------------------------------------------------------- jit, grad


def test_jit_traces_once():
    traces = []

    def f(x, metric, size):
        traces.append(1)
        return tome.merge_tokens(x, metric, size, 10)

    jf = jax.jit(f)
    for seed in (0, 1):
        x, metric, size, _ = _inputs(4, 50, seed=seed)
        out = jf(jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size))
        rx, rs, _ = ref_merge(x, metric, size, 10)
        np.testing.assert_allclose(np.asarray(out[0]), rx, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out[1]), rs, atol=1e-5)
    assert len(traces) == 1

    # r passed as a static argument: one trace per distinct r.
    traces.clear()
    jg = jax.jit(
        lambda x, m, s, r: (traces.append(1), tome.merge_tokens(x, m, s, r))[1],
        static_argnums=3,
    )
    x, metric, size, _ = _inputs(4, 50)
    for _ in range(2):
        jg(jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size), 12)
    assert len(traces) == 1


def test_gradient_flows():
    x, metric, size, _ = _inputs(2, 50, seed=5)

    def loss(x):
        out, _, _ = tome.merge_tokens(x, jnp.asarray(metric), jnp.asarray(size), 20)
        return jnp.sum(out**2) + jnp.sum(out)

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert np.all(np.isfinite(g))
    assert np.abs(g).sum() > 0
    # Every input token contributes to exactly one output token, so every row gets gradient.
    assert np.all(np.abs(g).sum(-1) > 0)

    # With the metric derived from x (as in a model: keys of x), the gradient is still finite.
    def loss2(x):
        out, _, _ = tome.merge_tokens(x, x[..., :6], None, 20)
        return jnp.sum(out)

    g2 = np.asarray(jax.grad(loss2)(jnp.asarray(x)))
    assert np.all(np.isfinite(g2)) and np.abs(g2).sum() > 0
    # sum(out) w.r.t. x with unit sizes: merged tokens are means, so dL/dx_i = 1 / size(group).
    _, js, jsrc = tome.merge_tokens(
        jnp.asarray(x), jnp.asarray(x[..., :6]), None, 20, jnp.eye(50)[None].repeat(2, 0)
    )
    per_token = np.einsum("btn,bt->bn", np.asarray(jsrc), 1.0 / np.asarray(js))
    np.testing.assert_allclose(g2, np.broadcast_to(per_token[..., None], g2.shape), atol=1e-6)


def test_proportional_attention_bias():
    size = jnp.asarray([[1.0, 2.0, 4.0], [1.0, 1.0, 3.0]])
    bias = tome.proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    np.testing.assert_allclose(np.asarray(bias)[:, 0, 0], np.log(np.asarray(size)), atol=1e-7)
    logits = jnp.zeros((2, 4, 3, 3)) + bias  # [B, heads, Tq, Tk]
    p = jax.nn.softmax(logits, axis=-1)
    # Uniform logits: attention proportional to size.
    np.testing.assert_allclose(np.asarray(p)[0, 0, 0], np.array([1, 2, 4]) / 7.0, atol=1e-6)


# --------------------------------------------------------------------------- bookkeeping


def test_max_merge():
    assert tome.max_merge(50) == 24  # cls + 49 patches: A = 25 incl. cls
    assert tome.max_merge(49) == 24
    assert tome.max_merge(3) == 1
    assert tome.max_merge(2) == 0
    assert tome.max_merge(1) == 0
    assert tome.max_merge(50, protect_cls=False) == 25
    assert tome.max_merge(49, protect_cls=False) == 25
    assert tome.max_merge(1, protect_cls=False) == 0


def test_tokens_per_block():
    assert tome.tokens_per_block(50, [16, 16, 16, 16]) == [34, 18, 10, 6]
    assert tome.tokens_per_block(50, [24, 0, 0, 0]) == [26, 26, 26, 26]
    assert tome.tokens_per_block(50, [30, 0, 0, 0]) == [26, 26, 26, 26]  # clipped
    assert tome.tokens_per_block(65, [8, 8, 8, 8]) == [57, 49, 41, 33]
    assert tome.tokens_per_block(50, [25], protect_cls=False) == [25]
    assert tome.tokens_per_block(50, []) == []


def test_single_pass_r():
    assert tome.single_pass_r(50, keep_ratio=0.5) == 24  # asks 25, clipped to 24
    assert tome.single_pass_r(50, keep_ratio=0.7) == 15  # keep 35
    assert tome.single_pass_r(50, keep_ratio=0.75) == 12  # keep ceil(37.5) = 38
    assert tome.single_pass_r(50, keep_ratio=1.0) == 0
    assert tome.single_pass_r(50, r=10) == 10
    assert tome.single_pass_r(50, r=40) == 24
    assert tome.single_pass_r(50) == 0
    assert tome.single_pass_r(65, keep_ratio=0.5) == 32  # keep 33 = max merge
    with pytest.raises(ValueError):
        tome.single_pass_r(50, keep_ratio=0.5, r=3)
    with pytest.raises(ValueError):
        tome.single_pass_r(50, keep_ratio=0.0)


def test_every_layer_schedule():
    assert tome.every_layer_schedule(50, 4, 16) == [16, 16, 8, 4]
    assert tome.tokens_per_block(50, tome.every_layer_schedule(50, 4, 16)) == [34, 18, 10, 6]
    assert tome.every_layer_schedule(50, 4, 4) == [4, 4, 4, 4]
    assert tome.every_layer_schedule(50, 6, 30) == [24, 12, 6, 3, 2, 1]
    assert tome.every_layer_schedule(50, 3, 0) == [0, 0, 0]


def test_block_flops():
    # T=50, D=64, H=256: qkv 3*50*4096 + attn 2*2500*64 + proj 50*4096 + mlp 2*50*64*256 MACs.
    macs = 3 * 50 * 4096 + 2 * 2500 * 64 + 50 * 4096 + 2 * 50 * 64 * 256
    assert tome.block_flops(50, 64, 4.0) == 2 * macs
    assert tome.block_flops(26, 64) < tome.block_flops(50, 64)


def test_batch_sharded_merge_stays_local():
    """With the batch sharded over devices, merging needs no cross-device communication."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x, metric, size, source = _inputs(2 * n, 50, seed=11)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))
    args = [put(jnp.asarray(a)) for a in (x, metric, size, source)]

    def step(x, metric, size, source):
        out, s, src = tome.merge_tokens(x, metric, size, 20, source)
        return out, s, src, jax.grad(lambda x: tome.merge_tokens(x, metric, size, 20)[0].sum())(x)

    f = jax.jit(step)
    hlo = f.lower(*args).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    out = f(*args)
    rx, rs, rsrc = ref_merge(x, metric, size, 20, source)
    np.testing.assert_allclose(np.asarray(out[0]), rx, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), rs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[2]), rsrc, atol=1e-5)
