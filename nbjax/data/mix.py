"""Mixup and CutMix: each training image blended with another of its batch, and its target in
the same proportion (Zhang et al. 2018, arXiv:1710.09412; Yun et al. 2019, arXiv:1905.04899),
the regularisers that let a small ViT learn CIFAR-10 from scratch.

``data.mix`` picks the kind (it shapes the compiled program). ``data.mix_alpha`` is α of the
mixing weight λ ~ Beta(α, α), a per-member value (:mod:`nbjax.train.hparams`), so one
population can sweep it; α = 0 leaves the batch as it is. One λ per batch, and image i is
paired with image B-1-i (the batch reversed, as timm's ``Mixup`` does), so the pairing needs
no random draw and no gather. CutMix pastes a box of about (1-λ) of the area from the
partner; its targets use the box's exact share after clipping to the image.
'mixup_cutmix' picks one of the two per batch, with equal odds. docs/data.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIXES = ("none", "mixup", "cutmix", "mixup_cutmix")


def mixing_weight(rng: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """λ ~ Beta(α, α) as float32, or exactly 1 (no mixing) where α is 0."""
    alpha = jnp.asarray(alpha, jnp.float32)
    safe = jnp.where(alpha > 0, alpha, 1.0)  # Beta(0, 0) is not a distribution
    return jnp.where(alpha > 0, jax.random.beta(rng, safe, safe), 1.0).astype(jnp.float32)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """A bool [H, W] box, True inside: sides of ``floor(side * sqrt(1 - λ))`` around a uniform
    random centre, clipped to the image (so its area may be less than 1 - λ)."""
    ratio = jnp.sqrt(1.0 - lam)
    k_row, k_col = jax.random.split(rng)

    def span(key: jax.Array, size: int) -> jax.Array:
        half = jnp.floor(size * ratio).astype(jnp.int32) // 2
        centre = jax.random.randint(key, (), 0, size)
        index = jnp.arange(size)
        return (index >= centre - half) & (index < centre + half)

    return span(k_row, height)[:, None] & span(k_col, width)[None, :]


def mix(images: jax.Array, targets: jax.Array, rng: jax.Array, kind: str,
        alpha: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """The batch ``images`` [B, H, W, C] and its ``targets`` [B, K] (one-hot or soft), mixed
    by ``kind`` (one of MIXES) with weight λ ~ Beta(α, α); jit-able, ``alpha`` may be traced."""
    if kind == "none":
        return images, targets
    if kind not in MIXES:
        raise ValueError(f"data.mix must be one of {MIXES}, got {kind!r}")
    k_lam, k_box, k_pick = jax.random.split(rng, 3)
    lam = mixing_weight(k_lam, alpha)
    partner_images, partner_targets = images[::-1], targets[::-1]

    def blend(a: jax.Array, b: jax.Array, weight: jax.Array) -> jax.Array:
        return weight * a + (1.0 - weight) * b

    mixup = blend(images, partner_images, lam), blend(targets, partner_targets, lam)
    if kind == "mixup":
        return mixup
    box = cutmix_box(k_box, images.shape[1], images.shape[2], lam)
    kept = 1.0 - jnp.mean(box.astype(jnp.float32))
    cutmix = (jnp.where(box[None, :, :, None], partner_images, images),
              blend(targets, partner_targets, kept))
    if kind == "cutmix":
        return cutmix
    use_cutmix = jax.random.bernoulli(k_pick)
    return jax.tree.map(lambda c, m: jnp.where(use_cutmix, c, m), cutmix, mixup)
