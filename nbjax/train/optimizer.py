"""The optimizer: AdamW on one learning-rate schedule, linear warm-up then cosine decay.

The peak learning rate and the weight decay may be traced values (a population's members
differ in them, nbjax.train.hparams); the step builds the optimizer from its state's values.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

PyTree = Any


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           peak: float | jax.Array | None = None) -> optax.Schedule:
    """The learning rate at each step of a run of ``total_steps`` steps.

    Linear from 0 at step 0 to ``peak`` (default ``train.learning_rate``) at
    ``train.warmup_steps`` (at most ``total_steps - 1``), then a cosine decay to
    ``peak * train.end_lr_factor`` at ``total_steps``. This is optax's
    ``warmup_cosine_decay_schedule`` with its final factor given directly, so that ``peak``
    may be traced. The optimizer steps with it and the step logs it.
    """
    t = config.train
    peak = t.learning_rate if peak is None else peak
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps, warmup + 1)
    return optax.join_schedules([
        optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup),
        optax.cosine_decay_schedule(init_value=peak, decay_steps=decay_steps - warmup,
                                    alpha=t.end_lr_factor),
    ], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   hparams: dict[str, jax.Array] | None = None
                   ) -> optax.GradientTransformation:
    """AdamW on :func:`learning_rate_schedule`, weight decay on kernels only, and global-norm
    clipping first when ``train.grad_clip_norm > 0``.

    ``hparams`` (the state's, nbjax.train.hparams) gives the peak learning rate and weight
    decay; without it they are the config's. Either way the optimizer state has one structure.
    """
    t = config.train
    peak = hparams["learning_rate"] if hparams is not None else t.learning_rate
    weight_decay = hparams["weight_decay"] if hparams is not None else t.weight_decay

    def decay_mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    parts = []
    if t.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(config, total_steps, peak), b1=t.b1,
                             b2=t.b2, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)
