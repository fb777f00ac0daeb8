"""The attention core, softmax(q kᵀ + bias) v per head, with its backward written out.

A custom VJP rather than autodiff of the einsums, so that every batched matmul of the
backward has the [batch, heads, rows, cols] layout XLA:CPU's fast matmul path takes (see
docs/performance.md); the math is the standard one and equals autodiff
(tests/test_attention_core.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, T, H, Dh] <-> [B, H, T, Dh]."""
    return x.transpose(0, 2, 1, 3)


def _materialize(x: jax.Array) -> jax.Array:
    """``x``, kept as its own array on CPU (an optimization barrier); a no-op elsewhere.

    XLA:CPU folds a transpose into the dot that consumes it; the dot then has a layout that
    its fast batched-matmul path does not take and falls back to a slow generic loop.
    Materialising the transpose keeps every batched
    matmul of the attention core in the fast path. GPUs and TPUs take any layout.
    """
    return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda y: y)


def _core_forward(q, k, v, bias):
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh)
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = _heads_first(jnp.einsum("bhqk,bhkd->bhqd", weights, vh))
    return out, (qh, kh, vh, weights)


@jax.custom_vjp
def attention_core(q: jax.Array, k: jax.Array, v: jax.Array,
                   bias: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ + bias) v per head: q, k, v [B, T, H, Dh] -> [B, T, H, Dh].

    ``q`` is already scaled by 1/√Dh; ``bias`` (or None) broadcasts against the logits
    [B, H, Tq, Tk] (token merging's log(size), [B, 1, 1, Tk]). The softmax is taken in
    float32 and its weights cast back to the compute dtype.

    Exactly the math of the two einsums and the softmax; the backward is written out (the
    standard one: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP - rowsum(dP ⊙ P)), dQ = dS K,
    dK = dSᵀ Q) so that each of its batched matmuls has the [batch, heads, rows, cols]
    layout XLA:CPU's fast matmul path takes (see :func:`_materialize`); autodiff of the
    einsums left two of them on a slow generic loop.
    """
    return _core_forward(q, k, v, bias)[0]


def _attention_core_fwd(q, k, v, bias):
    out, res = _core_forward(q, k, v, bias)
    return out, (res, bias)


def _attention_core_bwd(saved, d_out):
    (qh, kh, vh, weights), bias = saved
    d_oh = _heads_first(d_out)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_oh, vh)
    dv = jnp.einsum("bhkq,bhqd->bhkd", _materialize(weights.swapaxes(-1, -2)), d_oh)
    p = weights.astype(jnp.float32)
    dp = d_weights.astype(jnp.float32)
    d_logits = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(qh.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits, kh)
    dk = jnp.einsum("bhkq,bhqd->bhkd", _materialize(d_logits.swapaxes(-1, -2)), qh)
    d_bias = None
    if bias is not None:
        shape, dtype = bias.shape, bias.dtype
        d_bias = d_logits.astype(jnp.float32)
        d_bias = jnp.sum(d_bias, axis=tuple(range(d_bias.ndim - len(shape))))  # broadcast rank
        axes = tuple(i for i, n in enumerate(shape) if n == 1 and d_bias.shape[i] != 1)
        d_bias = jnp.sum(d_bias, axis=axes, keepdims=True).astype(dtype)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv), d_bias


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)
