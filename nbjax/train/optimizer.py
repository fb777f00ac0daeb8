"""The optimizer: AdamW on one learning-rate schedule, linear warm-up then cosine decay."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

PyTree = Any


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int
                           ) -> optax.Schedule:
    """The learning rate at each step of a run of ``total_steps`` steps.

    Linear from 0 at step 0 to ``train.learning_rate`` at ``train.warmup_steps`` (at most
    ``total_steps - 1``), then a cosine decay to ``learning_rate * train.end_lr_factor`` at
    ``total_steps``. The optimizer steps with it and the step logs it.
    """
    t = config.train
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=t.learning_rate * t.end_lr_factor)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
    """AdamW on :func:`learning_rate_schedule`, weight decay on kernels only, and global-norm
    clipping first when ``train.grad_clip_norm > 0``."""
    t = config.train

    def decay_mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    parts = []
    if t.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=t.b1, b2=t.b2,
                             weight_decay=t.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
