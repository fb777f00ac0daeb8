"""The attention core's hand-written backward equals autodiff of the plain einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbjax.model.attention import attention_core


def reference(q, k, v, bias):
    """The textbook formulation (what nbjax's model computed before the custom backward)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def inputs(dtype=jnp.float32, bias=True):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (3, 7, 2, 4), dtype) for key in keys[:3])
    b = jnp.log(jax.random.uniform(keys[3], (3, 1, 1, 7), minval=1.0, maxval=4.0)) \
        if bias else None
    return q, k, v, b, jax.random.normal(keys[4], (3, 7, 2, 4), dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_gradients_match_autodiff(with_bias):
    q, k, v, b, w = inputs(bias=with_bias)

    def loss(fn, q, k, v, b):
        return jnp.sum(fn(q, k, v, b) * w)

    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    np.testing.assert_allclose(attention_core(q, k, v, b), reference(q, k, v, b),
                               rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(lambda *a: loss(attention_core, *a), argnums))(q, k, v, b)
    want = jax.grad(lambda *a: loss(reference, *a), argnums)(q, k, v, b)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_matches_reference_and_keeps_dtypes():
    q, k, v, b, w = inputs(jnp.bfloat16)
    out = attention_core(q, k, v, b)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(reference(q, k, v, b), np.float32), atol=3e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum((attention_core(q, k, v, b) * w)
                                             .astype(jnp.float32)), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda q, k, v: jnp.sum((reference(q, k, v, b) * w)
                                            .astype(jnp.float32)), (0, 1, 2))(q, k, v)
    for g, r in zip(grads, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=6e-2, rtol=6e-2)
