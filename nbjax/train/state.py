"""The train state: everything a run needs to continue, as one pytree, and its step-0 value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nbjax.pruning import Pruner
from nbjax.pruning import masks as masks_lib
from nbjax.train.hparams import Hparams

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: jit, sharding and checkpoints see one pytree."""

    step: jax.Array  # int32 scalar: steps taken so far
    params: PyTree  # dense weights (pruned entries are zero unless the method is persistent)
    masks: PyTree  # bool, only the prunable kernels, nested like params
    opt_state: PyTree
    pruning: PyTree  # the pruning method's state
    burden: PyTree  # the burden tracker's state (reference values), {} when disabled
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs no extra state
    hparams: Hparams  # the per-member scalar settings (nbjax.train.hparams), float32


def init_state(model: nn.Module, tx: optax.GradientTransformation, pruner: Pruner,
               image_shape: tuple[int, ...], seed: int | jax.Array, hparams: Hparams,
               burden_init: Callable[[PyTree, PyTree], PyTree] | None = None) -> TrainState:
    """A fresh state: params, masks from the pruner, zeroed pruned weights, optimizer state.

    ``seed`` may be traced (a population initialises its members under ``vmap``).

    ``burden_init(dense_params, masks)`` sees the params *before* the pruned weights are
    zeroed (the burden reference of a method that starts sparse is the dense layer).
    """
    rng = jax.random.PRNGKey(seed)
    init_rng, mask_rng, step_rng = jax.random.split(rng, 3)
    params = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    masks, pruning_state = pruner.init(params, mask_rng)
    dense_params = params
    if not pruner.persistent:
        params = masks_lib.apply_masks(params, masks)
    burden = burden_init(dense_params, masks) if burden_init is not None else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, masks=masks,
                      opt_state=tx.init(params), pruning=pruning_state, burden=burden,
                      rng=step_rng, hparams=dict(hparams))
