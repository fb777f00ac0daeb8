"""The interface every pruning method implements, and the registry that picks one by name.

A method owns two pure functions that run inside the compiled train step:

* ``init(params, rng) -> (masks, pruning_state)``: the masks (boolean, only the prunable
  kernels, nested like the params) and the method's state at step 0.
* ``update(ctx) -> ctx``: called after every optimizer update with a :class:`PruneContext`;
  it decides (under ``lax.cond`` on the step, so nothing recompiles) whether to recompute the
  masks, and returns the new context with its metrics.

``persistent`` methods keep dense weights: the forward pass uses W ⊙ M with a straight-through
gradient and pruned weights are not zeroed. The others zero pruned weights after every update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nbjax import masks as masks_lib

PyTree = Any


@dataclasses.dataclass
class PruneContext:
    """What a method may read and change at the end of a train step."""

    step: jax.Array  # the step just taken (0-based), int32 scalar
    params: PyTree
    masks: PyTree
    opt_state: PyTree
    pruning_state: PyTree
    grads: PyTree  # dense gradients of the step (RigL's regrowth score)
    rng: jax.Array
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pruner:
    """A pruning method: its name, whether it is persistent, and its two functions."""

    name: str
    persistent: bool
    init: Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]]
    update: Callable[[PruneContext], PruneContext]


_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict, int], Pruner]] = {}


def register(name: str) -> Callable:
    """Decorator: registers ``factory(config, total_steps) -> Pruner`` under ``name``."""

    def wrap(factory: Callable[[ml_collections.ConfigDict, int], Pruner]) -> Callable:
        _REGISTRY[name] = factory
        return factory

    return wrap


def make_pruner(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """The method ``config.pruning.method`` for a run of ``total_steps`` steps."""
    name = config.pruning.method
    if name not in _REGISTRY:
        raise ValueError(f"config.pruning.method={name!r}; allowed: {sorted(_REGISTRY)}")
    return _REGISTRY[name](config, total_steps)


def prunable(params: PyTree, config: ml_collections.ConfigDict) -> list[str]:
    """The paths of the kernels this run prunes (``pruning.include`` / ``pruning.exclude``)."""
    return masks_lib.prunable_paths(params, config.pruning.include, config.pruning.exclude)


@register("none")
def dense(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """The dense reference: all-ones masks that never change."""
    del total_steps

    def init(params: PyTree, rng: jax.Array) -> tuple[PyTree, PyTree]:
        del rng
        return masks_lib.ones_masks(params, prunable(params, config)), {
            "last_update": jnp.zeros((), jnp.int32)}

    def update(ctx: PruneContext) -> PruneContext:
        return ctx

    return Pruner("none", persistent=False, init=init, update=update)
