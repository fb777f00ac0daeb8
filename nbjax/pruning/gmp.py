"""Gradual magnitude pruning (``gmp``) and its persistent variant (``pdwp``).

``gmp`` (Zhu & Gupta, 2017): start dense; on the update steps of
:func:`nbjax.pruning.schedules.is_update_step` keep the largest |W| at the polynomial target
s_t. The top-k ranks only the kept weights, so pruned weights stay zero and never return.

``pdwp`` (persistent dynamic weight pruning, after DPF, Lin et al. 2020; also ``gmp`` with
``mitigation.persistent=True``): the dense weights persist and keep learning through the
straight-through gradient, and the mask is a top-k of |W| over *all* weights, so a pruned
weight that overtakes a kept one comes back. It prunes to gmp's sparsity staircase but
re-ranks every ``pruning.persistent_update_every`` steps until ``persistent_end_frac``: a
short interval bounds how far Adam moves pruned weights with no loss feedback
(**nbjax choice**, docs/pruning.md).

``scope='layerwise'``: each leaf follows the schedule scaled to its final target from the
distribution, s_l(t) = s_l^f · s_t / s_f, so every leaf ends exactly at its target.
``scope='global'``: one top-k of |W| over every prunable weight at s_t. Counts are traced,
so one compiled step serves every sparsity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from nbjax.pruning import common, schedules
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import (
    PruneContext,
    Pruner,
    persistent_end_step,
    prunable,
    register,
    schedule_steps,
)

# target(step, initial, final): a leaf's sparsity target at the step
Target = Callable[[jax.Array, float, float], jax.Array]


def _staircase(t0: int, t1: int, every: int, exponent: float) -> Target:
    """The polynomial target, stepping only on the t0 + kΔT grid and at t1.

    So gmp and pdwp prune to the very same staircase whatever pdwp's re-ranking interval.
    """

    def target(step: jax.Array, initial: float, final: float) -> jax.Array:
        on_grid = jnp.where(step >= t1, t1, t0 + (step - t0) // every * every)
        return schedules.polynomial_sparsity(on_grid, initial=initial, final=final,
                                             start_step=t0, end_step=t1, exponent=exponent)

    return target


def _magnitude_scores(ctx: PruneContext, old: Mapping[str, jax.Array],
                      persistent: bool) -> dict[str, jax.Array]:
    """|W| per leaf: over every weight (pdwp), or among the kept ones only (gmp)."""
    weights = masks_lib.select(ctx.params, sorted(old))
    magnitude = {q: jnp.abs(w) for q, w in weights.items()}
    if persistent:
        return {q: common.finite(m.astype(jnp.float32)) for q, m in magnitude.items()}
    return {q: common.exclude(magnitude[q], ~old[q]) for q in old}


def _global_rule(old: Mapping[str, jax.Array], scores: Mapping[str, jax.Array],
                 total: jax.Array, persistent: bool) -> tuple[dict, dict, jax.Array]:
    """One top-k over every leaf at the total target (gmp never keeps more than it has)."""
    k = masks_lib.num_to_keep(sum(m.size for m in old.values()), total)
    if not persistent:
        k = jnp.minimum(k, common.count(old))
    new = common.topk_global(scores, k)
    return new, common.realised_targets(new), total


def _layerwise_rule(old: Mapping[str, jax.Array], scores: Mapping[str, jax.Array],
                    step: jax.Array, target: Target, shares: Mapping[str, float] | None,
                    s_i: jax.Array, s_f: jax.Array, persistent: bool) -> tuple[dict, dict]:
    """Per-leaf top-k, leaf l on the schedule from s_i · s_l^f / s_f to s_l^f.

    ``shares`` None: every leaf ends at s_f (uniform). Otherwise ``{path: (s_l^f, s_l^f /
    s_f)}`` from the distribution, as Python floats.
    """
    targets, ks = {}, {}
    for q, m in old.items():
        final, share = (s_f, 1.0) if shares is None else shares[q]
        targets[q] = target(step, s_i * share if share != 1.0 else s_i, final)
        ks[q] = masks_lib.num_to_keep(m.size, targets[q])
        if not persistent:  # never ask a leaf to regrow (float noise); a no-op in exact math
            ks[q] = jnp.minimum(ks[q], jnp.sum(m, dtype=jnp.int32))
    return common.topk_layerwise(scores, ks), targets


def _leaf_shares(old: Mapping[str, jax.Array], s_f: float, config: ml_collections.ConfigDict
                 ) -> dict[str, tuple[float, float]]:
    """``{path: (s_l^f, s_l^f / s_f)}`` of a non-uniform distribution at the config's s_f
    (so a population's members share s_f under it, nbjax.train.hparams)."""
    finals = common.leaf_targets({q: m.shape for q, m in old.items()}, s_f, config)
    return {q: (f, 1.0 if f == s_f else f / s_f) for q, f in finals.items()}


def gradual(config: ml_collections.ConfigDict, total_steps: int, *, name: str,
            persistent: bool) -> Pruner:
    """The gradual magnitude pruner (persistent or not) for a run of ``total_steps``."""
    p = config.pruning
    schedules.validate_sparsity(p.initial_sparsity, "pruning.initial_sparsity")
    s_f = schedules.validate_sparsity(p.sparsity, "pruning.sparsity")
    every = int(p.update_every)
    schedules.validate_every(every)
    rerank_every = int(p.persistent_update_every) if persistent else every
    schedules.validate_every(rerank_every)
    t0, t1 = schedule_steps(config, total_steps)
    last = persistent_end_step(config, total_steps) if persistent else t1
    target = _staircase(t0, t1, every, float(p.exponent))
    scope, uniform = p.scope, p.distribution == "uniform"

    def is_update(step: jax.Array) -> jax.Array:
        return schedules.is_update_step(step, start_step=t0, end_step=t1, every=rerank_every,
                                        last_step=last)

    def init(params, rng):
        del rng
        paths = prunable(params, config)
        masks = masks_lib.ones_masks(params, paths)
        return masks, common.init_state(masks, {q: 0.0 for q in paths}, 0.0)

    def rule(ctx: PruneContext):
        old = masks_lib.flatten(ctx.masks)
        scores = _magnitude_scores(ctx, old, persistent)
        # The member's own sparsities (nbjax.train.hparams), traced.
        total = target(ctx.step, ctx.hparams["initial_sparsity"], ctx.hparams["sparsity"])
        if scope == "global":
            return _global_rule(old, scores, total, persistent)
        shares = None if uniform else _leaf_shares(old, s_f, config)
        new, targets = _layerwise_rule(old, scores, ctx.step, target, shares,
                                       ctx.hparams["initial_sparsity"], ctx.hparams["sparsity"],
                                       persistent)
        return new, targets, total

    update = common.make_update(is_update, rule, persistent=persistent)
    return Pruner(name, persistent=persistent, init=init, update=update,
                  update_every=rerank_every, first_update=t0, starts_dense=True,
                  final_sparsity_step=t1 + 1)


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    p = config.pruning
    if p.initial_sparsity > p.sparsity:
        raise ValueError(f"config.pruning.initial_sparsity={p.initial_sparsity} is not valid: "
                         f"must be <= pruning.sparsity={p.sparsity} ({p.method}'s schedule "
                         "only prunes)")


@register("gmp", check=_check_schedule)
def gmp(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """Gradual magnitude pruning; ``mitigation.persistent=True`` makes it ``pdwp``."""
    return gradual(config, total_steps, name="gmp",
                   persistent=bool(config.mitigation.persistent))


@register("pdwp", always_persistent=True, check=_check_schedule)
def pdwp(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """Persistent dynamic weight pruning: persistent gmp (always persistent)."""
    return gradual(config, total_steps, name="pdwp", persistent=True)
