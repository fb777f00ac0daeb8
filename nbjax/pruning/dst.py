"""Dynamic sparse training at a fixed sparsity: ``set`` and ``rigl``.

Both start from a random mask at ``pruning.sparsity`` and, on every step t > 0 with
t % ΔT == 0 and t < t_end (``drop_end_frac`` of training), drop the n_drop smallest |W| among
the kept weights and regrow n_drop among the rest (just-dropped ones included, as in RigL):
at random (``set``, Mocanu et al. 2018) or by largest |dense gradient| (``rigl``, Evci et al.
2020). n_drop = round(f_t · k), k the kept count (per leaf, or in total for
``scope='global'``) and f_t RigL's cosine-decayed drop fraction, so k never changes. Regrown
weights start at 0 with their optimizer statistics reset.

Persistent variant (``mitigation.persistent=True``, **nbjax choice**, docs/pruning.md): the
same rule, but nothing is zeroed or reset; dropped weights keep learning from the
straight-through gradient and regrown ones resume from their dense values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from nbjax.pruning import common, schedules
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import PruneContext, Pruner, drop_end_step, prunable, register

FlatTree = dict[str, jax.Array]  # {path: array}


def _n_drop(fraction: jax.Array, kept: jax.Array) -> jax.Array:
    """round(fraction · kept), half up, in [0, kept]."""
    n = jnp.floor(fraction * kept.astype(jnp.float32) + 0.5).astype(jnp.int32)
    return jnp.clip(n, 0, kept)


def _grow_scores(ctx: PruneContext, old: Mapping[str, jax.Array], paths: Sequence[str],
                 regrow_by_gradient: bool) -> FlatTree:
    """|dense gradient| (RigL) or uniform random scores (SET) for the regrowth."""
    if regrow_by_gradient:
        return {q: jnp.abs(g) for q, g in masks_lib.select(ctx.grads, paths).items()}
    return common.uniform_scores(ctx.rng, {q: old[q].shape for q in paths})


def _drop_and_grow_global(old: Mapping[str, jax.Array], drop_scores: FlatTree,
                          grow_scores: FlatTree, fraction: jax.Array) -> FlatTree:
    """The drop and regrowth as one top-k each over every leaf."""
    kept = common.count(old)
    n = _n_drop(fraction, kept)
    survivors = common.topk_global(drop_scores, kept - n)
    grown = common.topk_global(
        {q: common.exclude(grow_scores[q], survivors[q]) for q in drop_scores}, n)
    return {q: survivors[q] | grown[q] for q in drop_scores}


def _drop_and_grow_layerwise(old: Mapping[str, jax.Array], drop_scores: FlatTree,
                             grow_scores: FlatTree, fraction: jax.Array) -> FlatTree:
    """The drop and regrowth within each leaf, so every leaf keeps its count."""
    paths = sorted(drop_scores)
    kept = {q: jnp.sum(old[q], dtype=jnp.int32) for q in paths}
    n = {q: _n_drop(fraction, kept[q]) for q in paths}
    survivors = common.topk_layerwise(drop_scores, {q: kept[q] - n[q] for q in paths})
    grown = common.topk_layerwise(
        {q: common.exclude(grow_scores[q], survivors[q]) for q in paths}, n)
    return {q: survivors[q] | grown[q] for q in paths}


def dynamic_sparse(config: ml_collections.ConfigDict, total_steps: int, *, name: str,
                   regrow_by_gradient: bool) -> Pruner:
    """The SET (random regrowth) or RigL (gradient regrowth) pruner."""
    p = config.pruning
    s = schedules.validate_sparsity(p.sparsity, "pruning.sparsity")
    schedules.validate_sparsity(p.drop_fraction, "pruning.drop_fraction", allow_one=True)
    every = int(p.update_every)
    schedules.validate_every(every)
    t_end = drop_end_step(config, total_steps)
    persistent = bool(config.mitigation.persistent)
    global_scope = p.scope == "global"
    drop_and_grow = _drop_and_grow_global if global_scope else _drop_and_grow_layerwise

    def is_update(step: jax.Array) -> jax.Array:
        return (step > 0) & (step % every == 0) & (step < t_end)

    def fraction(ctx: PruneContext) -> jax.Array:  # the member's own drop fraction
        return schedules.cosine_drop_fraction(ctx.step, initial=ctx.hparams["drop_fraction"],
                                              end_step=t_end)

    def init(params, rng):
        paths = prunable(params, config)
        masks, targets = common.random_initial_masks(params, paths, config, rng)
        return masks, common.init_state(masks, targets, s)

    def rule(ctx: PruneContext):
        old = masks_lib.flatten(ctx.masks)
        paths = sorted(old)
        weights = masks_lib.select(ctx.params, paths)
        drop_scores = {q: common.exclude(jnp.abs(weights[q]), ~old[q]) for q in paths}
        grow_scores = _grow_scores(ctx, old, paths, regrow_by_gradient)
        new = drop_and_grow(old, drop_scores, grow_scores, fraction(ctx))
        targets = (common.realised_targets(new) if global_scope
                   else masks_lib.flatten(ctx.pruning_state["leaf_targets"]))
        return new, targets, ctx.pruning_state["target_sparsity"]

    def extra(ctx: PruneContext) -> dict[str, jax.Array]:
        return {f"{common.PREFIX}/drop_fraction": jnp.asarray(fraction(ctx), jnp.float32)}

    update = common.make_update(is_update, rule, persistent=persistent, extra_metrics=extra)
    return Pruner(name, persistent=persistent, init=init, update=update, update_every=every,
                  first_update=every if every < t_end else None)


@register("set")
def set_(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """SET: drop smallest magnitude, regrow at random (Mocanu et al., 2018)."""
    return dynamic_sparse(config, total_steps, name="set", regrow_by_gradient=False)


@register("rigl")
def rigl(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """RigL: drop smallest magnitude, regrow by largest dense gradient (Evci et al., 2020)."""
    return dynamic_sparse(config, total_steps, name="rigl", regrow_by_gradient=True)
