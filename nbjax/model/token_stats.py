"""The token statistics the ViT's blocks sow when the model merges tokens, as log metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

# (what a block sows, the log key it becomes; {} is the block's name)
_KEYS = (("num_tokens", "tokens/{}"), ("mean_token_size", "tokens/mean_size/{}"),
         ("max_token_size", "tokens/max_size/{}"))


def token_metrics(stats: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per-block token metrics from the model's ``'stats'`` collection, ready to log.

    ``tokens/block_i`` is the number of tokens block i hands on (after its merge: what its MLP
    and the next block's attention see); ``tokens/mean_size/block_i`` and
    ``tokens/max_size/block_i`` the mean and max number of input tokens (patches, or the
    class token) per token, over batch and tokens. Empty when no block sowed them (a model
    without ``token_stats``, i.e. one that does not merge).
    """
    out: dict[str, jax.Array] = {}
    blocks = sorted((k for k in stats if k.startswith("block_")), key=lambda k: int(k[6:]))
    for block in blocks:
        for key, fmt in _KEYS:
            if key in stats[block]:
                value = stats[block][key]
                out[fmt.format(block)] = value[-1] if isinstance(value, tuple) else value
    return out
