"""A small, functional Vision Transformer whose kernels can be masked and whose tokens can merge.

The model is plain Flax linen. Two things make it nbjax's own:

* Masks are not baked into the params. Every prunable kernel reads an optional boolean mask from
  the variable collection ``'masks'`` (same path as the kernel, absent when the kernel is never
  pruned), so the train state can keep the dense weights and the masks side by side. How the
  mask enters the forward pass is ``mask_mode``: ``'multiply'`` (W ⊙ M: a pruned weight gets no
  gradient) or ``'straight_through'`` (W ⊙ M forward, the full gradient reaches the dense W, as
  persistent dynamic pruning needs).
* With ``collect_stats`` every masked layer records the mean absolute value of each of its input
  features over batch and tokens (collection ``'stats'``), the only per-feature signal the burden
  metrics need; nothing of shape [batch, tokens, features] leaves the model.

Token merging (ToMe) happens between attention and MLP of the blocks listed in ``merge_r``.
The model a config describes is built by :mod:`nbjax.model.build`; the attention core's
hand-written backward is :mod:`nbjax.model.attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nbjax.burden.metrics import input_abs_mean
from nbjax.model.attention import attention_core
from nbjax.tome import merge as tome

MASK_MODES = ("multiply", "straight_through")
# The sown statistics that are a maximum over the batch; every other one is a mean over it
# (what a data-parallel step needs to know to combine the shards' values).
MAX_STATS = ("max_token_size",)


def _masked(kernel: jax.Array, mask: jax.Array | None, mode: str) -> jax.Array:
    if mask is None:
        return kernel
    masked = jnp.where(mask, kernel, jnp.zeros_like(kernel))
    if mode == "straight_through":
        # Forward value W ⊙ M, gradient of the identity: pruned weights keep learning.
        return kernel + jax.lax.stop_gradient(masked - kernel)
    return masked


class MaskedLinear(nn.Module):
    """A linear map over the last ``in_axes`` axes of x to ``features``, with an optional mask.

    Covers Dense ([in, out]), the attention projections ([D, H, Dh] and [H, Dh, D]) and the
    patch embedding ([p, p, C, D]) with one code path, so masking and statistics are uniform.

    ``measure_pruned`` (the burden probe pass, :func:`nbjax.burden.metrics.pruned_signal`) also sows
    ``pruned_sq`` = ||x (W ⊙ (1 - M))||² and ``dense_sq`` = ||x W||² (bias excluded, summed
    over batch, tokens and outputs) for the dense kernel W: one more matmul per layer.
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = True
    mask_mode: str = "multiply"
    collect_stats: bool = False
    measure_pruned: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, in_abs_mean: jax.Array | None = None) -> jax.Array:
        """``x W (+ b)``; ``in_abs_mean``: ``x``'s statistic if the caller already has it."""
        in_shape = x.shape[-self.in_axes :]
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=tuple(range(self.in_axes)),
                                             out_axis=tuple(range(self.in_axes,
                                                                  self.in_axes
                                                                  + len(self.features)))),
            (*in_shape, *self.features),
        )
        mask = self.get_variable("masks", "kernel") if self.has_variable("masks", "kernel") \
            else None
        if self.collect_stats:
            if in_abs_mean is None:
                in_abs_mean = input_abs_mean(x, self.in_axes)
            self.sow("stats", "in_abs_mean", in_abs_mean)
        dense_kernel = kernel
        kernel = _masked(kernel, mask, self.mask_mode).astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=self.in_axes)
        if self.measure_pruned:
            kept = y.astype(jnp.float32)
            removed = jnp.zeros_like(kept) if mask is None else jnp.tensordot(
                x.astype(self.dtype), jnp.where(mask, jnp.zeros_like(dense_kernel),
                                                dense_kernel).astype(self.dtype),
                axes=self.in_axes).astype(jnp.float32)
            self.sow("stats", "pruned_sq", jnp.sum(jnp.square(removed)))
            self.sow("stats", "dense_sq", jnp.sum(jnp.square(kept + removed)))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, self.features)
            y = y + bias.astype(self.dtype)
        return y




class Attention(nn.Module):
    """Multi-head self-attention; ``size`` (tokens merged into each) adds log(size) to logits."""

    num_heads: int
    mask_mode: str = "multiply"
    collect_stats: bool = False
    measure_pruned: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        proj = dict(mask_mode=self.mask_mode, collect_stats=self.collect_stats,
                    measure_pruned=self.measure_pruned, dtype=self.dtype)
        # q, k and v read the same x: its statistic is computed once for the three.
        e = input_abs_mean(x, 1) if self.collect_stats else None
        q = MaskedLinear((self.num_heads, head_dim), name="query", **proj)(x, e)
        k = MaskedLinear((self.num_heads, head_dim), name="key", **proj)(x, e)
        v = MaskedLinear((self.num_heads, head_dim), name="value", **proj)(x, e)
        bias = None if size is None else tome.proportional_attention_bias(size)
        scale = jnp.asarray(1.0 / jnp.sqrt(head_dim), self.dtype)
        heads = attention_core(q * scale, k, v, bias)
        out = MaskedLinear((dim,), in_axes=2, name="out", **proj)(heads)
        return out, jnp.mean(k, axis=2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; merges ``merge_r`` tokens after attention when > 0.

    With ``token_stats`` it sows into ``'stats'`` the number of tokens it hands on (after its
    merge) and the mean and max token size (input tokens per token, 1 before any merge):
    ``num_tokens``, ``mean_token_size``, ``max_token_size`` (logged by
    :func:`nbjax.model.token_stats.token_metrics`).
    """

    num_heads: int
    mlp_dim: int
    merge_r: int = 0
    mask_mode: str = "multiply"
    collect_stats: bool = False
    token_stats: bool = False
    measure_pruned: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size, source):
        proj = dict(mask_mode=self.mask_mode, collect_stats=self.collect_stats,
                    measure_pruned=self.measure_pruned, dtype=self.dtype)
        attn_out, metric = Attention(self.num_heads, name="attn", **proj)(
            nn.LayerNorm(name="ln1", dtype=self.dtype)(x), size)
        x = x + attn_out
        if self.merge_r > 0:
            if size is None:
                size = jnp.ones(x.shape[:2], jnp.float32)
            x, size, source = tome.merge_tokens(x, metric, size, self.merge_r, source)
        h = nn.LayerNorm(name="ln2", dtype=self.dtype)(x)
        h = MaskedLinear((self.mlp_dim,), name="fc1", **proj)(h)
        h = nn.gelu(h)
        h = MaskedLinear((x.shape[-1],), name="fc2", **proj)(h)
        x = x + h
        if self.token_stats:
            self.sow("stats", "num_tokens", jnp.asarray(x.shape[1], jnp.float32))
            one = jnp.ones((), jnp.float32)
            self.sow("stats", "mean_token_size",
                     one if size is None else jnp.mean(size.astype(jnp.float32)))
            self.sow("stats", "max_token_size",
                     one if size is None else jnp.max(size.astype(jnp.float32)))
        return x, size, source


class ViT(nn.Module):
    """Vision Transformer: patch embedding, class token, learned position embedding, blocks, head.

    ``merge_r[l]`` tokens are merged in block l (all zeros: no merging). The head reads the class
    token (``pool='cls'``) or the size-weighted mean of all tokens (``pool='mean'``).
    ``token_stats`` (on when the model merges, see :func:`nbjax.model.build.build_model`)
    makes every block sow its token count and sizes (see :class:`Block`), independently of
    ``collect_stats``.
    """

    num_classes: int
    patch_size: int = 7
    hidden_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 256
    pool: str = "cls"
    merge_r: Sequence[int] = ()
    mask_mode: str = "multiply"
    collect_stats: bool = False
    token_stats: bool = False
    measure_pruned: bool = False  # the burden probe pass (see MaskedLinear)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, return_source: bool = False):
        batch, height, width, channels = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by patch {p}")
        patches = images.reshape(batch, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p, p, channels)
        x = MaskedLinear((self.hidden_dim,), in_axes=3, name="patch_embed",
                         mask_mode=self.mask_mode, collect_stats=self.collect_stats,
                         measure_pruned=self.measure_pruned, dtype=self.dtype)(patches)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.hidden_dim)).astype(x.dtype),
                             x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, *x.shape[1:]))
        x = x + pos.astype(x.dtype)
        merge_r = tuple(self.merge_r) or (0,) * self.depth
        if len(merge_r) != self.depth:
            raise ValueError(f"merge_r has {len(merge_r)} entries for {self.depth} blocks")
        size = None
        source = jnp.broadcast_to(jnp.eye(x.shape[1]), (batch, x.shape[1], x.shape[1])) \
            if return_source else None
        for i in range(self.depth):
            x, size, source = Block(self.num_heads, self.mlp_dim, merge_r[i],
                                    mask_mode=self.mask_mode, collect_stats=self.collect_stats,
                                    token_stats=self.token_stats,
                                    measure_pruned=self.measure_pruned, dtype=self.dtype,
                                    name=f"block_{i}")(x, size, source)
        x = nn.LayerNorm(name="ln_final", dtype=self.dtype)(x)
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = jnp.ones(x.shape[:2], x.dtype) if size is None else size.astype(x.dtype)
            pooled = jnp.sum(x * weights[..., None], axis=1) / jnp.sum(weights, 1, keepdims=True)
        logits = nn.Dense(self.num_classes, name="head", dtype=self.dtype)(pooled)
        logits = logits.astype(jnp.float32)
        if return_source:
            return logits, source
        return logits


# The config readers and the token-metric formatter live in their own modules now; their old
# names here resolve until every caller imports them from there.
