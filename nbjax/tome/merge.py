"""Token merging (ToMe) in pure JAX.

Bipartite soft matching after Bolya et al. 2023, "Token Merging: Your ViT But Faster"
(ICLR 2023). In a ViT block, between attention and the MLP, the tokens are split alternately
into two sets A (even indices 0, 2, 4, ...) and B (odd indices 1, 3, 5, ...). Each A token is
scored against every B token by the cosine similarity of the attention keys (averaged over
heads); each A token keeps its best B match; the ``r`` A tokens with the highest best-match
score are merged into their B match by a size-weighted average, and the other A tokens are kept.
The token count drops by exactly ``r``, a number fixed at trace time, so every shape is static
under ``jax.jit``.

Bookkeeping that travels with the tokens:

- ``size`` [B, T]: how many input tokens each current token stands for (ones at the start).
  It weights the average when tokens merge, and ``log(size)`` is added to the attention
  logits (proportional attention, :func:`proportional_attention_bias`) so that a merged token
  counts as the tokens it replaced.
- ``source`` [B, T, N]: optional 0/1 map from the current tokens to the N input tokens
  (``eye(N)`` at the start), for visualisation and for checking that nothing is lost.

Token order after a merge (the ToMe order): first the kept A tokens in their original order,
then all B tokens in their original order (each B token now holding the A tokens merged into
it). The class token is A's first token and is protected (never merged), so it stays at index 0.
When the clipped ``r`` is 0 nothing is reordered: every merge function is the identity.

The matching (ranking, argmax) is not differentiable and runs on ``stop_gradient(metric)``;
the merge itself (gather + scatter-add + divide) is differentiable with respect to ``x`` and
``size``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "block_flops",
    "every_layer_schedule",
    "max_merge",
    "merge_source",
    "merge_tokens",
    "merge_wavg",
    "proportional_attention_bias",
    "single_pass_r",
    "tokens_per_block",
]

_EPS = 1e-6


class MergePlan(NamedTuple):
    """The result of one matching: which A tokens are kept and which merge into which B token.

    All indices are per example (leading batch axis) and index into the A set
    (``x[:, 0::2]``) or the B set (``x[:, 1::2]``), not into the full token axis.

    Attributes:
      unm_idx: [B, nA - r] int32, A indices of the kept (unmerged) A tokens, ascending.
      src_idx: [B, r] int32, A indices of the merged A tokens (best score first).
      dst_idx: [B, r] int32, B index each merged A token goes into (same order as src_idx).

    A NamedTuple is a pytree, so a plan can be returned from or passed into jitted code.
    ``r`` is ``src_idx.shape[1]``, a static number.
    """

    unm_idx: jax.Array
    src_idx: jax.Array
    dst_idx: jax.Array

    @property
    def r(self) -> int:
        """The number of tokens this plan removes (static)."""
        return self.src_idx.shape[1]


def max_merge(num_tokens: int, protect_cls: bool = True) -> int:
    """Largest r bipartite matching can remove from ``num_tokens`` tokens.

    Only A tokens (even indices, ``ceil(T / 2)`` of them) can be merged, the class token
    (A's first) excluded when protected, and there must be at least one B token to merge into.
    With the class token protected this is ``(T - 1) // 2`` (ToMe's own clip); without it,
    ``ceil(T / 2)`` for ``T >= 2`` (ToMe clips to ``T // 2``, one less for odd T; we allow every
    A token to merge since B is never empty then).
    """
    if num_tokens < 2:
        return 0
    num_a = (num_tokens + 1) // 2
    return max(num_a - (1 if protect_cls else 0), 0)


def _clip_r(r: int, num_tokens: int, protect_cls: bool) -> int:
    return max(0, min(int(r), max_merge(num_tokens, protect_cls)))


def bipartite_soft_matching(metric: jax.Array, r: int, protect_cls: bool = True) -> MergePlan:
    """Match tokens for merging (ToMe's bipartite soft matching, Bolya et al. 2023).

    Args:
      metric: [B, T, C] similarity features per token; ToMe uses the attention keys averaged
        over heads. Gradients are stopped: the matching is a discrete choice.
      r: number of tokens to remove; a static Python int. Clipped to ``max_merge(T,
        protect_cls)``; ``r <= 0`` gives an empty plan (identity merge).
      protect_cls: the token at index 0 is a class token and is never merged (its scores are
        set to -inf, so it ranks last and the clip keeps it out of the merged set).

    Returns:
      A :class:`MergePlan`. Ties are broken deterministically: the best B match of an A token
      is the first maximum (lowest B index), and A tokens with equal best scores are taken in
      ascending A index (the order of a stable argsort of -score).
    """
    B, T, _ = metric.shape
    r = _clip_r(r, T, protect_cls)
    num_a = (T + 1) // 2
    if r == 0:
        unm = jnp.broadcast_to(jnp.arange(num_a, dtype=jnp.int32), (B, num_a))
        empty = jnp.zeros((B, 0), jnp.int32)
        return MergePlan(unm, empty, empty)

    node_max, node_idx = _best_matches(metric, protect_cls)
    rank = _rank_descending(node_max)
    ia = jnp.arange(num_a, dtype=jnp.int32)
    # Merged: the A tokens ranked 0..r-1, listed in rank order.
    pick = rank[:, :, None] == jnp.arange(r, dtype=jnp.int32)[None, None, :]  # [B, nA, r]
    src_idx = jnp.sum(jnp.where(pick, ia[None, :, None], 0), axis=1, dtype=jnp.int32)
    # Kept: the others, in ascending A index (class token first), compacted by a cumsum.
    kept = rank >= r
    slot = jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1
    place = kept[:, :, None] & (
        slot[:, :, None] == jnp.arange(num_a - r, dtype=jnp.int32)[None, None, :]
    )
    unm_idx = jnp.sum(jnp.where(place, ia[None, :, None], 0), axis=1, dtype=jnp.int32)
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
    return MergePlan(unm_idx, src_idx, dst_idx)


def _best_matches(metric: jax.Array, protect_cls: bool) -> tuple[jax.Array, jax.Array]:
    """Each A token's best cosine similarity to a B token ([B, nA]) and that B token's index
    (the first maximum on ties); the class token and NaN scores rank last (-inf)."""
    m = jax.lax.stop_gradient(metric).astype(jnp.float32)
    m = m * jax.lax.rsqrt(jnp.maximum(jnp.sum(m * m, axis=-1, keepdims=True), _EPS**2))
    a, b = m[:, 0::2], m[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b)  # [B, nA, nB] cosine similarities
    node_max = jnp.max(scores, axis=-1)
    node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    if protect_cls:
        node_max = node_max.at[:, 0].set(-jnp.inf)
    node_max = jnp.where(jnp.isnan(node_max), -jnp.inf, node_max)  # keep the ranks a permutation
    return node_max, node_idx


def _rank_descending(values: jax.Array) -> jax.Array:
    """Each entry's position in a stable argsort of ``-values`` along the last axis.

    Computed by pairwise comparison ([B, n, n], the size of the score matrix) instead of a
    sort: no sort or scatter, so it fuses and vectorises on CPU, GPU and TPU alike (and
    measured faster than argsort on CPU).
    """
    ia = jnp.arange(values.shape[-1], dtype=jnp.int32)
    vi, vj = values[:, :, None], values[:, None, :]
    ahead = (vj > vi) | ((vj == vi) & (ia[None, :] < ia[:, None])[None])
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def _merge_sum_one(
    unm_idx: jax.Array, src_idx: jax.Array, dst_idx: jax.Array, x: jax.Array
) -> jax.Array:
    """One example of :func:`_merge_sum`: x [T, ...] -> [T - r, ...]."""
    a, b = x[0::2], x[1::2]
    return jnp.concatenate([a[unm_idx], b.at[dst_idx].add(a[src_idx])], axis=0)


def _merge_sum(plan: MergePlan, x: jax.Array) -> jax.Array:
    """Merge ``x`` [B, T, ...] by summing each merged A token into its B token.

    Output order: kept A tokens (ascending), then all B tokens. Per example it is one gather
    for the kept tokens, one for the merged ones and one scatter-add into B, vmapped over the
    batch: vmap gives the gather/scatter explicit batch dimensions, so with the batch sharded
    over devices XLA keeps everything local (indexing with an ``arange(B)`` batch index instead
    made the partitioner all-gather the tokens).
    """
    if plan.r == 0:
        return x
    return jax.vmap(_merge_sum_one)(plan.unm_idx, plan.src_idx, plan.dst_idx, x)


def merge_wavg(plan: MergePlan, x: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge tokens by a size-weighted average.

    Each B token becomes ``sum(size_i * x_i) / sum(size_i)`` over itself and the A tokens merged
    into it; sizes add. The weighted sums are taken in float32 (then cast back to ``x.dtype``)
    so bf16 activations do not lose the small contributions.

    Args:
      plan: from :func:`bipartite_soft_matching` on the same T.
      x: [B, T, D] tokens.
      size: [B, T] token sizes (ones before the first merge).

    Returns:
      ``(x', size')`` with shapes [B, T - r, D] and [B, T - r]; order: kept A tokens, then B
      tokens; the class token stays at index 0. Identity when ``plan.r == 0``.
    """
    if plan.r == 0:
        return x, size
    s = size.astype(jnp.float32)
    # Two gather/scatter passes (numerator, denominator); packing size as an extra channel
    # of x into one pass measured slower on CPU (the concatenate costs a copy of x).
    new_size = _merge_sum(plan, s)
    new_x = _merge_sum(plan, x.astype(jnp.float32) * s[..., None]) / new_size[..., None]
    return new_x.astype(x.dtype), new_size.astype(size.dtype)


def merge_source(plan: MergePlan, source: jax.Array) -> jax.Array:
    """Merge the source map [B, T, N] by summing rows (a merged token covers both sets).

    Start from ``eye(N)`` broadcast over the batch. Since merged groups are disjoint, the sum
    stays 0/1 and row sums equal the token sizes. Returns [B, T - r, N] in the merge order.
    """
    return _merge_sum(plan, source)


def merge_tokens(
    x: jax.Array,
    metric: jax.Array,
    size: jax.Array | None,
    r: int,
    source: jax.Array | None = None,
    protect_cls: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Match on ``metric`` and merge ``x``, ``size`` and (if given) ``source`` in one call.

    ``size=None`` means all ones. ``r`` (static) is clipped as in
    :func:`bipartite_soft_matching`. Returns ``(x', size', source')``, ``source'`` None when
    ``source`` is None.
    """
    if size is None:
        size = jnp.ones(x.shape[:2], jnp.float32)
    plan = bipartite_soft_matching(metric, r, protect_cls)
    x, size = merge_wavg(plan, x, size)
    if source is not None:
        source = merge_source(plan, source)
    return x, size, source


def proportional_attention_bias(size: jax.Array) -> jax.Array:
    """``log(size)`` [B, T] reshaped to [B, 1, 1, T] for attention logits [B, heads, Tq, Tk].

    Proportional attention (Bolya et al. 2023, eq. 1): ``softmax(q k^T / sqrt(d) + log s)``,
    so a key standing for s input tokens gets the attention weight of s copies of it. The bias
    is constant over heads and queries and varies over keys. With all sizes 1 it is 0.
    """
    return jnp.log(size.astype(jnp.float32))[:, None, None, :]


def tokens_per_block(
    num_tokens: int, r_per_block: list[int], protect_cls: bool = True
) -> list[int]:
    """Token count each block hands on after its merge, r clipped as the matching clips it.

    ``tokens_per_block(50, [16, 16, 16, 16]) == [34, 18, 10, 6]``.
    """
    out, t = [], int(num_tokens)
    for r in r_per_block:
        t -= _clip_r(r, t, protect_cls)
        out.append(t)
    return out


def single_pass_r(
    num_tokens: int,
    keep_ratio: float | None = None,
    r: int | None = None,
    protect_cls: bool = True,
) -> int:
    """r for the single-pass mode (one merge, in the first block).

    Give either ``r`` or ``keep_ratio`` (the fraction of the ``num_tokens`` tokens, class
    token included, left after the merge; the kept count is rounded up so at least that
    fraction survives). Neither means no merging (0); both is an error. The result is clipped
    to :func:`max_merge`, e.g. 50 tokens at keep_ratio 0.5 ask for r = 25 and get 24.
    """
    if keep_ratio is not None and r is not None:
        raise ValueError("give either keep_ratio or r, not both")
    if keep_ratio is not None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        kept = math.ceil(keep_ratio * num_tokens - 1e-9)
        r = num_tokens - kept
    if r is None:
        return 0
    return _clip_r(r, num_tokens, protect_cls)


def every_layer_schedule(
    num_tokens: int, depth: int, r: int, protect_cls: bool = True
) -> list[int]:
    """ToMe's constant schedule: r per block, each clipped to what that block can merge.

    ``every_layer_schedule(50, 4, 16) == [16, 16, 8, 4]`` (token counts 34, 18, 10, 6).
    """
    sched, t = [], int(num_tokens)
    for _ in range(depth):
        rr = _clip_r(r, t, protect_cls)
        sched.append(rr)
        t -= rr
    return sched


def block_flops(num_tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs (2 per multiply-add) of one pre-LN ViT block on ``num_tokens`` tokens.

    Counts the matmuls only: qkv (3 T D^2), attention scores and weighted values (2 T^2 D),
    output projection (T D^2) and the MLP (2 T D H, H = mlp_ratio D). Use it with
    :func:`tokens_per_block` to report the FLOPs saved by merging (a merge in block l only
    shrinks the MLP of block l and everything after it; ToMe merges between attention and MLP).
    """
    t, d = int(num_tokens), int(dim)
    h = int(round(mlp_ratio * d))
    macs = 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * h
    return 2 * macs
