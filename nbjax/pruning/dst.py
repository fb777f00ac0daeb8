"""Dynamic sparse training at a fixed sparsity: ``set`` and ``rigl``.

Both start from a random mask at ``pruning.sparsity`` (per-leaf targets from the
distribution, or one global draw) and, on every step t with t > 0, t % ΔT == 0 and t < t_end
(t_end = ``drop_end_frac`` of training), drop and regrow:

1. n_drop = round(f_t · k) with k the kept count (per leaf, or in total for
   ``scope='global'``) and f_t the drop fraction, ``drop_fraction`` decayed by a cosine to 0 at
   t_end (:func:`nbjax.pruning.schedules.cosine_drop_fraction`, RigL's schedule);
2. drop: keep the k - n_drop largest |W| among the kept weights;
3. regrow n_drop among the weights not kept after the drop (just-dropped ones included, as in
   RigL): uniformly at random (``set``, Mocanu et al. 2018) or by largest |dense gradient| of
   the step (``rigl``, Evci et al. 2020; the model's straight-through masks give the dense
   gradient).

So the number of kept weights never changes (per leaf for ``layerwise``, in total for
``global``). Regrown weights start at 0 and their optimizer statistics are reset to 0, in any
optax chain (:func:`nbjax.pruning.common.reset_param_state`).

Persistent variant (``mitigation.persistent=True``, **nbjax choice**): as SPEC.md describes
persistence, the dense weights persist and keep receiving the straight-through gradient while
pruned, and the mask is recomputed by the same drop/regrow rule. Nothing is zeroed: a dropped
weight keeps its value and keeps learning, a regrown one resumes from its persisted dense
value with its optimizer statistics intact (resetting them would discard exactly what
persistence keeps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from nbjax.pruning import common, schedules
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import PruneContext, Pruner, drop_end_step, prunable, register


def _n_drop(fraction: jax.Array, kept: jax.Array) -> jax.Array:
    """round(fraction · kept), half up, in [0, kept]."""
    n = jnp.floor(fraction * kept.astype(jnp.float32) + 0.5).astype(jnp.int32)
    return jnp.clip(n, 0, kept)


def dynamic_sparse(config: ml_collections.ConfigDict, total_steps: int, *, name: str,
                   regrow_by_gradient: bool) -> Pruner:
    """The SET (random regrowth) or RigL (gradient regrowth) pruner."""
    p = config.pruning
    s = schedules.validate_sparsity(p.sparsity, "pruning.sparsity")
    drop_fraction = schedules.validate_sparsity(p.drop_fraction, "pruning.drop_fraction",
                                                allow_one=True)
    every = int(p.update_every)
    schedules.validate_every(every)
    t_end = drop_end_step(config, total_steps)
    persistent = bool(config.mitigation.persistent)
    scope = p.scope

    def is_update(step: jax.Array) -> jax.Array:
        return (step > 0) & (step % every == 0) & (step < t_end)

    def fraction(step: jax.Array) -> jax.Array:
        return schedules.cosine_drop_fraction(step, initial=drop_fraction, end_step=t_end)

    def init(params, rng):
        paths = prunable(params, config)
        masks, targets = common.random_initial_masks(params, paths, config, rng)
        return masks, common.init_state(masks, targets, s)

    def rule(ctx: PruneContext):
        old = masks_lib.flatten(ctx.masks)
        paths = sorted(old)
        weights = masks_lib.select(ctx.params, paths)
        drop_scores = {q: common.exclude(jnp.abs(weights[q]), ~old[q]) for q in paths}
        if regrow_by_gradient:
            grow_scores = {q: jnp.abs(g) for q, g in masks_lib.select(ctx.grads, paths).items()}
        else:
            grow_scores = common.uniform_scores(ctx.rng, {q: old[q].shape for q in paths})
        f = fraction(ctx.step)
        if scope == "global":
            kept = common.count(old)
            n = _n_drop(f, kept)
            survivors = common.topk_global(drop_scores, kept - n)
            grown = common.topk_global(
                {q: common.exclude(grow_scores[q], survivors[q]) for q in paths}, n)
            new = {q: survivors[q] | grown[q] for q in paths}
            return new, common.realised_targets(new), ctx.pruning_state["target_sparsity"]
        kept = {q: jnp.sum(old[q], dtype=jnp.int32) for q in paths}
        n = {q: _n_drop(f, kept[q]) for q in paths}
        survivors = common.topk_layerwise(drop_scores, {q: kept[q] - n[q] for q in paths})
        grown = common.topk_layerwise(
            {q: common.exclude(grow_scores[q], survivors[q]) for q in paths}, n)
        new = {q: survivors[q] | grown[q] for q in paths}
        targets = masks_lib.flatten(ctx.pruning_state["leaf_targets"])
        return new, targets, ctx.pruning_state["target_sparsity"]

    def extra(ctx: PruneContext) -> dict[str, jax.Array]:
        return {f"{common.PREFIX}/drop_fraction": jnp.asarray(fraction(ctx.step), jnp.float32)}

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
