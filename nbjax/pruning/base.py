"""The interface every pruning method implements, and the registry that picks one by name.

A method owns two pure functions that run inside the compiled train step:

* ``init(params, rng) -> (masks, pruning_state)``: the masks (boolean, only the prunable
  kernels, nested like the params) and the method's state at step 0.
* ``update(ctx) -> result``: called after every optimizer update with a :class:`PruneContext`
  (its inputs); it decides (under ``lax.cond`` on the step, so nothing recompiles) whether to
  recompute the masks, and returns a :class:`PruneResult`: the new params, masks, optimizer
  and pruning state, whether the masks were updated, and its metrics.

``persistent`` methods keep dense weights: the forward pass uses W ⊙ M with a straight-through
gradient and pruned weights are not zeroed. The others zero pruned weights after every update.

Steps from fractions (one rule, :func:`frac_to_step`): a fraction f of a run of T steps is
step ``floor(f * T + 0.5)`` (round half up, like
:func:`nbjax.pruning.masks.num_to_keep`), clipped to
the last step ``T - 1`` where a mask update must still happen (the gradual schedule's end).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nbjax.pruning import masks as masks_lib

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PruneContext:
    """What a method's ``update`` reads at the end of a train step (a pytree, so an
    ``update`` can be jitted on its own)."""

    step: jax.Array  # the step just taken (0-based), int32 scalar
    params: PyTree  # after the step's optimizer update
    masks: PyTree  # the masks the step ran with
    opt_state: PyTree
    pruning_state: PyTree
    grads: PyTree  # dense gradients of the step (RigL's regrowth score)
    rng: jax.Array
    hparams: dict[str, jax.Array]  # the run's per-member scalars (nbjax.train.hparams)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PruneResult:
    """What a method's ``update`` returns: the state after its mask update (a pytree).

    ``mask_updated`` says whether this step recomputed the masks (the burden tracker measures
    the signal an update removed on exactly those steps); it is logged as
    ``pruning/mask_updated`` among ``metrics``.
    """

    params: PyTree
    masks: PyTree
    opt_state: PyTree
    pruning_state: PyTree
    mask_updated: jax.Array  # bool scalar
    metrics: dict[str, jax.Array]

    @classmethod
    def unchanged(cls, ctx: PruneContext) -> PruneResult:
        """The result of an update that changes nothing and logs nothing."""
        return cls(params=ctx.params, masks=ctx.masks, opt_state=ctx.opt_state,
                   pruning_state=ctx.pruning_state, mask_updated=jnp.zeros((), bool),
                   metrics={})


@dataclasses.dataclass(frozen=True)
class Pruner:
    """A pruning method built for one run: its two functions and the facts the rest of the
    system asks about it.

    ``persistent``: pruned weights keep their values and learn. ``starts_dense``: the network
    is dense until the first mask update. ``first_update``: the step of the first mask update
    (None when the mask never changes during the run); ``update_every``: the interval between
    updates. ``final_sparsity_step``: the first step whose network is at the final sparsity
    (None when the run is at its sparsity from step 0).
    """

    name: str
    persistent: bool
    init: Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]]
    update: Callable[[PruneContext], PruneResult]
    update_every: int | None = None
    first_update: int | None = None
    starts_dense: bool = False
    final_sparsity_step: int | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its factory and what is known of it before a run is built.

    ``persistent_variant``: ``mitigation.persistent=True`` has a meaning for it.
    ``always_persistent``: the method is persistent whatever ``mitigation.persistent`` says
    (so its persistent variant is itself). ``prunes``: False for the dense reference.
    ``random_fixed_mask``: the mask is drawn without looking at the weights and never changes
    (so the burden's selection index is about 1). ``check(config)`` raises ``ValueError`` for
    a config the method cannot run (called by :func:`nbjax.config.validate`).
    """

    name: str
    factory: Callable[[ml_collections.ConfigDict, int], Pruner]
    persistent_variant: bool = True
    always_persistent: bool = False
    prunes: bool = True
    random_fixed_mask: bool = False
    check: Callable[[ml_collections.ConfigDict], None] | None = None


_REGISTRY: dict[str, Method] = {}


def register(name: str, **facts: Any) -> Callable:
    """Decorator: registers ``factory(config, total_steps) -> Pruner`` under ``name``, with
    the :class:`Method` facts given as keywords."""

    def wrap(factory: Callable[[ml_collections.ConfigDict, int], Pruner]) -> Callable:
        _REGISTRY[name] = Method(name, factory, **facts)
        return factory

    return wrap


def registered() -> list[str]:
    """The names of every registered method, sorted."""
    return sorted(_REGISTRY)


def method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the allowed ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"config.pruning.method={name!r} is not valid; allowed: "
                         f"{registered()}")
    return _REGISTRY[name]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` when the method of ``config`` cannot run it as configured."""
    info = method(config.pruning.method)
    if config.mitigation.persistent and not info.persistent_variant:
        raise ValueError(
            f"config.mitigation.persistent=True is not valid with config.pruning.method="
            f"{info.name!r}: its mask is never recomputed, so it has no persistent variant "
            f"(use one of {[m for m in registered() if _REGISTRY[m].persistent_variant]})")
    if info.check is not None:
        info.check(config)


def make_pruner(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """The method ``config.pruning.method`` for a run of ``total_steps`` steps.

    ``config.mitigation.persistent`` selects the persistent variant of the method (see
    ``docs/pruning.md``); a method without one raises ``ValueError``.
    """
    check_config(config)
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return method(config.pruning.method).factory(config, int(total_steps))


def prunable(params: PyTree, config: ml_collections.ConfigDict) -> list[str]:
    """The paths of the kernels this run prunes (``pruning.include`` / ``pruning.exclude``)."""
    return masks_lib.prunable_paths(params, config.pruning.include, config.pruning.exclude)


# --------------------------------------------------------------------------------------------
# Steps from fractions of training
# --------------------------------------------------------------------------------------------


def frac_to_step(frac: float, total_steps: int) -> int:
    """Step ``floor(frac * total_steps + 0.5)``, clipped to ``[0, total_steps - 1]``."""
    return min(max(math.floor(frac * total_steps + 0.5), 0), max(total_steps - 1, 0))


def schedule_steps(config: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int]:
    """``(t0, t1)``: first and last mask update of the gradual schedule (gmp, pdwp).

    ``t0 = frac_to_step(pruning.start_frac)``, ``t1 = frac_to_step(pruning.end_frac)``; so
    ``end_frac = 1`` makes the last step of the run the final update. Raises ``ValueError``
    when the run is too short for ``t0 < t1``.
    """
    p = config.pruning
    t0, t1 = frac_to_step(p.start_frac, total_steps), frac_to_step(p.end_frac, total_steps)
    if not t0 < t1:
        raise ValueError(
            f"pruning.start_frac={p.start_frac} and pruning.end_frac={p.end_frac} of "
            f"{total_steps} steps give start step {t0} >= end step {t1}: train longer or "
            "widen the schedule")
    return t0, t1


def persistent_end_step(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Last step on which a persistent gradual method (pdwp) may still recompute its mask.

    ``frac_to_step(pruning.persistent_end_frac)``, at least ``t1``.
    """
    return max(frac_to_step(config.pruning.persistent_end_frac, total_steps),
               schedule_steps(config, total_steps)[1])


def drop_end_step(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Step at which the DST drop fraction reaches 0: ``floor(drop_end_frac * T + 0.5)``, >= 1.

    Not clipped to ``T - 1``: updates happen on steps strictly before it.
    """
    return max(math.floor(config.pruning.drop_end_frac * total_steps + 0.5), 1)
