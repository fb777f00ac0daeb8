"""The model a config describes: the ViT of ``config.model`` with the token-merging schedule
of ``config.mitigation.token_merging`` (the network itself is :mod:`nbjax.model.vit`)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from nbjax.model.vit import ViT
from nbjax.tome import merge as tome


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ViT:
    """The ViT described by ``config.model`` and ``config.mitigation.token_merging``."""
    m = config.model
    merge_r = tome_schedule(config, num_input_tokens(config))
    return ViT(
        num_classes=num_classes, patch_size=m.patch_size, hidden_dim=m.hidden_dim,
        depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, pool=m.pool,
        merge_r=tuple(merge_r),
        # Straight-through always: the step masks the gradient itself for non-persistent
        # methods, and this way it also has the dense gradient (RigL's regrowth score).
        mask_mode="straight_through",
        collect_stats=bool(config.burden.enabled),
        token_stats=any(r > 0 for r in merge_r),
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
    )


def num_input_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens entering block 0 under ``config.model``: the patches plus the class token."""
    m = config.model
    return (m.image_size // m.patch_size) ** 2 + 1


def tome_schedule(config: ml_collections.ConfigDict, num_tokens: int) -> list[int]:
    """Tokens merged in each block under ``config.mitigation.token_merging``."""
    tm = config.mitigation.token_merging
    depth = config.model.depth
    if tm.mode == "off":
        return [0] * depth
    if tm.mode == "single_pass":
        r = tome.single_pass_r(num_tokens, tm.keep_ratio if tm.r <= 0 else None,
                               tm.r if tm.r > 0 else None)
        return [r] + [0] * (depth - 1)
    return tome.every_layer_schedule(num_tokens, depth, tm.r)
