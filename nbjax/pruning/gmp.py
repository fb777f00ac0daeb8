"""Gradual magnitude pruning (``gmp``) and its persistent variant (``pdwp``).

``gmp`` (Zhu & Gupta, 2017, "To prune, or not to prune"): start dense; on the update steps
t0, t0 + ΔT, ..., and t1 (:func:`nbjax.pruning.schedules.is_update_step`) keep the largest-magnitude
weights at the polynomial target s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^e. Pruned
weights are zeroed and stay zero: the new mask is a top-k of |W| *among the kept weights*
only, so it is always a subset of the old one.

``pdwp`` (persistent dynamic weight pruning, after DPF, Lin et al. 2020), also
``gmp`` with ``mitigation.persistent=True``: the dense weights persist in the state and keep
receiving the straight-through gradient of the masked forward pass; the mask is recomputed
from |W| over *all* weights under the same schedule, so a pruned weight whose magnitude
overtakes a kept one comes back (re-activated). The sparsity target follows gmp's staircase
(it changes on the t0 + kΔT grid and at t1), but pdwp re-ranks every
``pruning.persistent_update_every`` steps (default 16, DPF's own interval), at the current
target, and after t1 at s_f until ``pruning.persistent_end_frac`` of training (default 1: to
the end, as DPF does; set it <= ``end_frac`` to freeze the mask at t1 like gmp).

Why a short re-ranking interval (**nbjax choice**, docs/pruning.md): between re-rankings a
pruned weight gets the straight-through gradient but has no effect on the loss, so nothing
corrects it; under Adam each such weight moves by about the learning rate per step whatever
its gradient's size. With ΔT = 100 the pruned weights outgrow the kept ones and carry half the
dense output energy (``burden/pruned_signal`` 0.5), and gmp-90 % on MNIST fell from 95.0 % to
68.4 % (4 epochs); re-ranking every 16 steps bounds that drift and gave 94.2 %.

Per-leaf targets (``scope='layerwise'``): the distribution fixes each leaf's *final* target
s_l^f at s_f (``uniform``: s_f; ``erk``: exact ERK counts at s_f, solved once on the host),
and each leaf follows the polynomial schedule scaled to it, s_l(t) = s_l^f · s_t / s_f, i.e.
the same schedule from s_l^i = s_i · s_l^f / s_f to s_l^f. So every leaf is exactly at its
final target after t1 (for ``erk`` the kept counts then sum to exactly num_to_keep(N, s_f)),
every leaf's target only grows (no leaf is asked to regrow in gmp), and ``uniform`` is exactly
the Zhu & Gupta formula per leaf. ``scope='global'``: one top-k of |W| over all prunable
weights at s_t (the per-leaf sparsities then come out of the magnitudes).

All counts are traced (the schedule is evaluated inside the step), so the top-k is a sort
(:func:`nbjax.pruning.common.topk_layerwise`, one sort for all leaves, the tie rule of
:func:`nbjax.pruning.masks.topk_mask_dynamic`): one compiled step for every sparsity, run only on
update steps under ``lax.cond``.
"""

from __future__ import annotations

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


def gradual(config: ml_collections.ConfigDict, total_steps: int, *, name: str,
            persistent: bool) -> Pruner:
    """The gradual magnitude pruner (persistent or not) for a run of ``total_steps``."""
    p = config.pruning
    s_i = schedules.validate_sparsity(p.initial_sparsity, "pruning.initial_sparsity")
    s_f = schedules.validate_sparsity(p.sparsity, "pruning.sparsity")
    every, exponent = int(p.update_every), float(p.exponent)
    schedules.validate_every(every)
    # pdwp re-ranks on a finer grid than the sparsity steps (see the module docstring).
    rerank_every = int(p.persistent_update_every) if persistent else every
    schedules.validate_every(rerank_every)
    t0, t1 = schedule_steps(config, total_steps)
    last = persistent_end_step(config, total_steps) if persistent else t1
    scope = p.scope

    def is_update(step: jax.Array) -> jax.Array:
        on_grid = (step - t0) % rerank_every == 0
        return (step >= t0) & (((step <= last) & on_grid) | (step == t1))

    def schedule(step: jax.Array, initial: float, final: float) -> jax.Array:
        # The target steps on gmp's ΔT grid (and t1) only, so gmp and pdwp prune to the very
        # same staircase whatever pdwp's re-ranking interval.
        on_grid = jnp.where(step >= t1, t1, t0 + (step - t0) // every * every)
        return schedules.polynomial_sparsity(on_grid, initial=initial, final=final,
                                             start_step=t0, end_step=t1, exponent=exponent)

    def init(params, rng):
        del rng
        paths = prunable(params, config)
        masks = masks_lib.ones_masks(params, paths)
        return masks, common.init_state(masks, {q: 0.0 for q in paths}, 0.0)

    def rule(ctx: PruneContext):
        old = masks_lib.flatten(ctx.masks)
        weights = masks_lib.select(ctx.params, sorted(old))
        magnitude = {q: jnp.abs(w) for q, w in weights.items()}
        # gmp ranks only the kept weights (pruned ones never return); pdwp ranks all.
        scores = ({q: common.finite(m.astype(jnp.float32)) for q, m in magnitude.items()}
                  if persistent else
                  {q: common.exclude(magnitude[q], ~old[q]) for q in old})
        total = schedule(ctx.step, s_i, s_f)
        if scope == "global":
            k = masks_lib.num_to_keep(sum(m.size for m in old.values()), total)
            if not persistent:
                k = jnp.minimum(k, common.count(old))
            new = common.topk_global(scores, k)
            return new, common.realised_targets(new), total
        finals = common.leaf_targets({q: m.shape for q, m in old.items()}, s_f, config)
        targets, ks = {}, {}
        for q, m in old.items():
            # s_l^i = s_i · s_l^f / s_f (exactly s_i for a leaf at s_f, as under uniform)
            start = s_i if finals[q] == s_f else s_i * finals[q] / s_f
            targets[q] = schedule(ctx.step, start, finals[q])
            ks[q] = masks_lib.num_to_keep(m.size, targets[q])
            if not persistent:  # never ask a leaf to regrow (float noise); a no-op in exact math
                ks[q] = jnp.minimum(ks[q], jnp.sum(m, dtype=jnp.int32))
        return common.topk_layerwise(scores, ks), targets, total

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
