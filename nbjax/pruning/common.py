"""What the pruning methods share: their state, the update skeleton, metrics, top-k, resets.

Pruning state (one nested dict of arrays, part of the train state, so jit, sharding and
checkpoints carry it):

=====================  ======================================================================
key                    meaning
=====================  ======================================================================
``last_update``        int32, the step of the last mask update (-1: none yet)
``num_updates``        int32, mask updates so far
``turnover``           float32, share of the prunable entries whose mask flipped at the last
                       update (0 before any)
``reactivated``        int32, entries switched off → on at the last update
``reactivated_total``  int32, the same summed over every update
``target_sparsity``    float32, the total target the current masks were built for
``leaf_targets``       nested like the masks: float32 per-leaf target of the current masks
                       (for ``scope='global'``, where no per-leaf target exists, the realised
                       per-leaf sparsity after the update)
``ever_active``        nested like the masks: bool, the union of every mask so far (ITOP
                       exploration, Liu et al. 2021)
=====================  ======================================================================

Metrics (every step, the same keys on update and non-update steps so ``lax.cond`` and
``lax.scan`` see one structure): ``pruning/sparsity`` (realised, over all prunable entries),
``pruning/sparsity/<path>`` per leaf, ``pruning/target_sparsity``, ``pruning/mask_updated``
(1.0 on the steps that updated the mask, else 0.0), ``pruning/turnover`` and
``pruning/reactivated`` (**held**: the values of the last update, so a log that samples one
step in many still shows the latest; read them where ``pruning/mask_updated`` is 1, or use
``pruning/last_update``), ``pruning/reactivated_total``, ``pruning/exploration`` (share of the
prunable entries ever active), ``pruning/num_updates``, ``pruning/last_update``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import PruneContext, PruneResult

PyTree = Any
PREFIX = "pruning"

# (flat new masks {path: bool}, flat per-leaf targets {path: f32 scalar}, total target f32)
MaskRule = Callable[[PruneContext], tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]]


# --------------------------------------------------------------------------------------------
# Targets and initial masks
# --------------------------------------------------------------------------------------------


def leaf_targets(shapes: Mapping[str, Any], sparsity: float,
                 config: ml_collections.ConfigDict) -> dict[str, float]:
    """Per-leaf target sparsities at ``sparsity`` under ``pruning.distribution`` (Python floats).

    ``shapes`` is flat ``{path: shape or array}`` of the prunable leaves. ERK counts are exact
    (they sum to ``num_to_keep(total, sparsity)``, see :func:`nbjax.pruning.masks.erk_keep_counts`).
    """
    p = config.pruning
    return masks_lib.target_sparsities(dict(shapes), sorted(shapes), float(sparsity),
                                       p.distribution, p.erk_power_scale)


def uniform_scores(rng: jax.Array, shapes: Mapping[str, Sequence[int]]) -> dict[str, jax.Array]:
    """Uniform [0, 1) scores ``{path: array of shape}`` from **one** draw over all leaves.

    One draw split into leaves (sorted-path order), not one per leaf: XLA compiles each
    ``jax.random`` call of a new shape separately and that dominated the step's compile time.
    """
    paths = sorted(shapes)
    sizes = [math.prod(shapes[p]) for p in paths]
    flat = jax.random.uniform(rng, (sum(sizes),))
    out, offset = {}, 0
    for p, size in zip(paths, sizes, strict=True):
        out[p] = flat[offset:offset + size].reshape(tuple(shapes[p]))
        offset += size
    return out


def random_initial_masks(params: PyTree, paths: Sequence[str], config: ml_collections.ConfigDict,
                         rng: jax.Array) -> tuple[dict, dict[str, Any]]:
    """Random masks at ``pruning.sparsity`` (static, set, rigl) and their per-leaf targets.

    A top-k of uniform scores: ``scope='layerwise'`` keeps exactly ``num_to_keep(n_l, s_l)``
    per leaf, ``s_l`` from the distribution (Python floats); ``scope='global'`` keeps exactly
    ``num_to_keep(N, s)`` over all leaves and, having no per-leaf target, returns the
    realised per-leaf sparsities (JAX scalars) in its place.
    """
    s = float(config.pruning.sparsity)
    shapes = {p: tuple(x.shape) for p, x in masks_lib.select(params, paths).items()}
    sizes = {p: math.prod(shape) for p, shape in shapes.items()}
    scores = uniform_scores(rng, shapes)
    if config.pruning.scope == "global":
        masks = topk_global(scores, masks_lib.num_to_keep(sum(sizes.values()), s))
        return masks_lib.nest(masks), realised_targets(masks)
    targets = leaf_targets(shapes, s, config)
    ks = {p: masks_lib.num_to_keep(sizes[p], targets[p]) for p in shapes}
    return masks_lib.nest(topk_layerwise(scores, ks)), targets


# --------------------------------------------------------------------------------------------
# State and metrics
# --------------------------------------------------------------------------------------------


def init_state(masks: PyTree, targets: Mapping[str, float], total_target: float) -> dict:
    """The pruning state at step 0 (see the module docstring)."""
    flat = masks_lib.flatten(masks)
    return {
        "last_update": jnp.full((), -1, jnp.int32),
        "num_updates": jnp.zeros((), jnp.int32),
        "turnover": jnp.zeros((), jnp.float32),
        "reactivated": jnp.zeros((), jnp.int32),
        "reactivated_total": jnp.zeros((), jnp.int32),
        "target_sparsity": jnp.asarray(total_target, jnp.float32),
        "leaf_targets": masks_lib.nest({p: jnp.asarray(targets[p], jnp.float32) for p in flat}),
        "ever_active": masks_lib.nest({p: jnp.asarray(m, bool) for p, m in flat.items()}),
    }


def metrics(masks: PyTree, state: Mapping[str, Any], updated: jax.Array) -> dict[str, jax.Array]:
    """The step's pruning metrics (see the module docstring); same keys on every step."""
    flat = masks_lib.flatten(masks)
    # Sparsity from integer counts of pruned entries, so a dense leaf reads exactly 0.0.
    pruned = {p: jnp.sum(~m, dtype=jnp.int32) for p, m in flat.items()}
    n = sum(m.size for m in flat.values())
    ever = masks_lib.flatten(state["ever_active"])
    explored = sum(jnp.sum(m, dtype=jnp.int32) for m in ever.values())
    out = {
        f"{PREFIX}/sparsity": (sum(pruned.values()) / max(n, 1)).astype(jnp.float32),
        f"{PREFIX}/target_sparsity": state["target_sparsity"],
        f"{PREFIX}/mask_updated": jnp.asarray(updated, jnp.float32),
        f"{PREFIX}/turnover": state["turnover"],
        f"{PREFIX}/reactivated": state["reactivated"],
        f"{PREFIX}/reactivated_total": state["reactivated_total"],
        f"{PREFIX}/exploration": (explored / max(n, 1)).astype(jnp.float32),
        f"{PREFIX}/num_updates": state["num_updates"],
        f"{PREFIX}/last_update": state["last_update"],
    }
    out.update({f"{PREFIX}/sparsity/{p}": (c / flat[p].size).astype(jnp.float32)
                for p, c in pruned.items()})
    return out


# --------------------------------------------------------------------------------------------
# The top-k that builds every mask: k may be traced, per leaf or over all leaves
# --------------------------------------------------------------------------------------------


def finite(scores: jax.Array) -> jax.Array:
    """``scores`` with NaN as the lowest finite value (below any real score, above -inf).

    Keeps the candidate sets of a top-k (finite) apart from the excluded entries (-inf), so
    a NaN weight or gradient cannot make a top-k pick an excluded entry.
    """
    low = jnp.finfo(scores.dtype).min if jnp.issubdtype(scores.dtype, jnp.floating) else 0
    return jnp.where(jnp.isnan(scores), low, scores)


def exclude(scores: jax.Array, excluded: jax.Array) -> jax.Array:
    """``finite(scores)`` with -inf where ``excluded``: never chosen while a candidate remains."""
    scores = finite(jnp.asarray(scores, jnp.float32))
    return jnp.where(excluded, -jnp.inf, scores)


def _segmented_topk(scores: Mapping[str, jax.Array], ks: Mapping[str, Any],
                    segments: Mapping[str, int]) -> dict[str, jax.Array]:
    """Top-k within segments of leaves, with **one** sort for all of them.

    Leaf ``path`` belongs to segment ``segments[path]``; segment g keeps its ``ks[g]``
    largest scores. One stable ``lax.sort`` by (segment, -score) orders the entries in
    sorted-path, then flat-index order among ties; an entry's rank in its segment is its
    position minus the segment's start. (One sort, not one per leaf: the step's compile time
    grew with the number of sorts.)
    """
    paths = sorted(scores)
    order_of = {g: i for i, g in enumerate(sorted(set(segments.values())))}
    seg = jnp.concatenate([jnp.full(scores[p].size, order_of[segments[p]], jnp.int32)
                           for p in paths])
    # -(x + 0.0): -0.0 becomes +0.0 first, so all zeros tie (the sort's order is total).
    neg = jnp.concatenate([-(jnp.reshape(scores[p], -1).astype(jnp.float32) + 0.0)
                           for p in paths])
    n = neg.size
    _, _, order = lax.sort((seg, neg, jnp.arange(n, dtype=jnp.int32)), num_keys=2,
                           is_stable=True)
    position = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    groups = sorted(order_of, key=order_of.get)
    sizes = [sum(scores[p].size for p in paths if segments[p] == g) for g in groups]
    starts = jnp.asarray([sum(sizes[:i]) for i in range(len(groups))], jnp.int32)
    limits = jnp.stack([jnp.clip(jnp.asarray(ks[g], jnp.int32), 0, size)
                        for g, size in zip(groups, sizes, strict=True)])
    keep = position - starts[seg] < limits[seg]
    out, offset = {}, 0
    for p in paths:
        size = scores[p].size
        out[p] = keep[offset:offset + size].reshape(scores[p].shape)
        offset += size
    return out


def topk_layerwise(scores: Mapping[str, jax.Array], ks: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``{path: bool mask of the ks[path] largest of scores[path]}``, exactly ks[path] True.

    Scores compare as float32; k may be traced and is clipped to ``[0, size]``. Ties go to the
    lower flat (row-major) index, -0.0 ties with +0.0, and NaN ranks below every number.
    """
    return _segmented_topk(scores, ks, {p: p for p in scores})


def topk_global(scores: Mapping[str, jax.Array], k: Any) -> dict[str, jax.Array]:
    """One top-k over every leaf: exactly ``k`` True in all. Ties go to the leaf earlier in
    sorted-path order, then as in :func:`topk_layerwise`."""
    return _segmented_topk(scores, {"": k}, {p: "" for p in scores})


def count(masks: Mapping[str, jax.Array]) -> jax.Array:
    """Kept entries over all leaves of a flat mask dict, int32."""
    return sum(jnp.sum(m, dtype=jnp.int32) for m in masks.values())


# --------------------------------------------------------------------------------------------
# Optimizer state: reset the per-weight statistics of chosen entries, for any optax chain
# --------------------------------------------------------------------------------------------


def _dict_suffix(key_path: tuple) -> list[str]:
    """The trailing run of dict keys of a key path, as strings (the param path inside it)."""
    keys: list[str] = []
    for k in reversed(key_path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return keys[::-1]


def reset_param_state(opt_state: PyTree, where: Mapping[str, jax.Array]) -> PyTree:
    """``opt_state`` with every per-weight statistic of the entries ``where[path]`` set to 0.

    Works for any optax chain without knowing it: optax keeps per-weight statistics (Adam's
    ``mu``/``nu``, momentum ``trace``) as copies of the params tree, so a leaf whose key path
    *ends* with a param's path and has its shape is that param's statistic. Scalars and other
    shapes are left alone (limits: docs/pruning.md).
    """
    where = dict(where)

    def fix(key_path: tuple, leaf: Any) -> Any:
        if not hasattr(leaf, "shape"):
            return leaf
        keys = _dict_suffix(key_path)
        for i in range(len(keys)):
            path = "/".join(keys[i:])
            if path in where and tuple(where[path].shape) == tuple(leaf.shape):
                return jnp.where(where[path], jnp.zeros((), leaf.dtype), leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, opt_state)


# --------------------------------------------------------------------------------------------
# The update skeleton
# --------------------------------------------------------------------------------------------


def commit(ctx: PruneContext, new_masks: Mapping[str, jax.Array],
           new_targets: Mapping[str, jax.Array], total_target: jax.Array, *, persistent: bool
           ) -> tuple[PyTree, PyTree, PyTree, dict]:
    """Installs new masks: ``(params, masks, opt_state, pruning_state)`` after the update.

    Non-persistent: newly pruned weights are zeroed, and every entry switched on (regrown)
    starts at 0 (it already is: pruned entries are zeroed every step) with its optimizer
    statistics reset to 0. Persistent: params and optimizer state are left as they are (the
    dense weights and their statistics persist). The counters and the ever-active union of
    the state are updated in both cases.
    """
    old = masks_lib.flatten(ctx.masks)
    new = {p: jnp.asarray(new_masks[p], bool) for p in sorted(old)}
    switched_on = {p: new[p] & ~old[p] for p in new}
    flipped = sum(jnp.sum(new[p] != old[p], dtype=jnp.float32) for p in new)
    size = sum(m.size for m in new.values())
    on = count(switched_on)
    state = ctx.pruning_state
    ever = masks_lib.flatten(state["ever_active"])
    new_state = {
        "last_update": jnp.asarray(ctx.step, jnp.int32),
        "num_updates": state["num_updates"] + 1,
        "turnover": (flipped / size).astype(jnp.float32),
        "reactivated": on,
        "reactivated_total": state["reactivated_total"] + on,
        "target_sparsity": jnp.asarray(total_target, jnp.float32),
        "leaf_targets": masks_lib.nest({p: jnp.asarray(new_targets[p], jnp.float32)
                                        for p in new}),
        "ever_active": masks_lib.nest({p: ever[p] | new[p] for p in new}),
    }
    nested = masks_lib.nest(new)
    if persistent:
        return ctx.params, nested, ctx.opt_state, new_state
    params = masks_lib.apply_masks(ctx.params, nested)
    return params, nested, reset_param_state(ctx.opt_state, switched_on), new_state


def realised_targets(masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-leaf realised sparsity of flat masks (the "targets" of a global top-k)."""
    return {p: (jnp.sum(~m, dtype=jnp.int32) / m.size).astype(jnp.float32)
            for p, m in masks.items()}


def make_update(is_update: Callable[[jax.Array], jax.Array], rule: MaskRule, *,
                persistent: bool,
                extra_metrics: Callable[[PruneContext], dict[str, jax.Array]] | None = None
                ) -> Callable[[PruneContext], PruneResult]:
    """The ``update`` of a mask-updating method: ``rule`` runs under ``lax.cond(is_update)``.

    Both branches return the same pytree structure (params, masks, optimizer state, pruning
    state), so the step compiles once for update and non-update steps, and nothing leaves
    the device.
    """

    def update(ctx: PruneContext) -> PruneResult:
        do = jnp.asarray(is_update(ctx.step), bool)

        def apply() -> tuple:
            new_masks, targets, total = rule(ctx)
            return commit(ctx, new_masks, targets, total, persistent=persistent)

        def keep() -> tuple:
            return ctx.params, ctx.masks, ctx.opt_state, ctx.pruning_state

        params, masks, opt_state, state = lax.cond(do, apply, keep)
        out = metrics(masks, state, do)
        if extra_metrics is not None:
            out.update(extra_metrics(ctx))
        return PruneResult(params=params, masks=masks, opt_state=opt_state,
                           pruning_state=state, mask_updated=do, metrics=out)

    return update


def fixed_update(ctx: PruneContext) -> PruneResult:
    """The ``update`` of a method whose mask never changes: metrics only, no ``lax.cond``."""
    result = PruneResult.unchanged(ctx)
    return dataclasses.replace(
        result, metrics=metrics(ctx.masks, ctx.pruning_state, result.mask_updated))
