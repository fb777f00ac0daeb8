"""Pruning masks: which leaves are prunable, per-leaf sparsity targets, top-k mask building.

Conventions
-----------
- *Params* are the nested dict of Flax linen params (without the outer ``'params'`` key).
  A *path* is the ``'/'``-joined chain of dict keys, e.g. ``'block_0/mlp/fc1/kernel'``.
- *Masks* are a nested dict with the nesting of the params but holding only the prunable
  leaves (never-pruned leaves are absent), ``dtype=bool``, the shape of the kernel;
  True = kept. Every mask builder here returns that nested form. Every function that reads a
  tree accepts it nested *or* flat (``{path: leaf}``), since :func:`flatten` is idempotent.
- Kernels are seen as a logical 2-D ``[fan_in, fan_out]`` matrix (:func:`logical_fan_in_out`),
  which is what ERK and any per-input-feature statistic need.

Rounding rule (used everywhere, see :func:`num_to_keep`): a leaf of ``n`` entries at sparsity
``s`` keeps ``floor((1 - s) * n + 0.5)`` entries (round half up), clipped to ``[0, n]``.

Ties: every top-k here keeps *exactly* k entries; among equal scores the lower flat index
(row-major within a leaf; for global top-k, leaves in sorted-path order) wins. NaN scores
count as ``-inf`` (never preferred over a number) and ``-0.0`` ties with ``+0.0``.

Static vs traced sparsity: with a Python-float sparsity, k is a static Python int and
:func:`topk_mask` uses ``lax.top_k``; with a JAX scalar sparsity (e.g. the polynomial
schedule evaluated inside a jitted step), k is traced and :func:`topk_mask_dynamic` ranks by a
stable argsort instead, so one compiled step serves every sparsity level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nbjax.pruning.schedules import validate_sparsity

Tree = Mapping[str, Any]

DISTRIBUTIONS = ("uniform", "erk")
SCOPES = ("layerwise", "global")


# --------------------------------------------------------------------------------------------
# Path helpers
# --------------------------------------------------------------------------------------------


def flatten(nested: Tree, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': x}}`` -> ``{'a/b': x}``. Any non-mapping value is a leaf (None included).

    Idempotent on flat dicts, so functions can accept both forms. Empty sub-dicts vanish.
    """
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}``, the inverse of :func:`flatten`."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} goes through the leaf {key!r}")
        if leaf in node:
            raise ValueError(f"duplicate path {path!r}")
        node[leaf] = value
    return nested


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array, a ``jax.ShapeDtypeStruct`` or a plain tuple of ints."""
    return tuple(x.shape) if hasattr(x, "shape") else tuple(int(d) for d in x)


def _size(x: Any) -> int:
    return math.prod(_shape(x))


def _is_static(x: Any) -> bool:
    """A Python/NumPy number (known at trace time), as opposed to a JAX value."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Which leaves, and their logical matrix view
# --------------------------------------------------------------------------------------------


def prunable_paths(
    params: Tree, include: str = r".*kernel$", exclude: str | None = r"^head/"
) -> list[str]:
    """Sorted paths of the prunable leaves: matched by ``include`` and not by ``exclude``.

    Both are regular expressions applied with ``re.search`` to the full path (so anchor them
    with ``^``/``$`` where needed). ``exclude=None`` or ``''`` excludes nothing. The default
    selects every kernel but the classifier head's: biases, LayerNorm, ``pos_embed``, ``cls``
    and ``head`` are never pruned. Raises ``ValueError`` if nothing is selected: an empty
    mask tree would silently train a dense network.
    """
    paths = sorted(flatten(params))
    inc = re.compile(include)
    exc = re.compile(exclude) if exclude else None
    selected = [p for p in paths if inc.search(p) and not (exc and exc.search(p))]
    if not selected:
        shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
        raise ValueError(
            f"no prunable leaf: include={include!r}, exclude={exclude!r} select nothing "
            f"among the {len(paths)} param paths ({shown})"
        )
    return selected


def logical_fan_in_out(path: str, shape: Sequence[int]) -> tuple[int, int]:
    """The ``(fan_in, fan_out)`` of a kernel seen as the matrix it applies.

    - 2-D Dense ``[in, out]``: ``(in, out)``.
    - 3-D attention kernel whose module (the path component before the leaf name) is
      ``'out'``: ``[H, Dh, D]`` -> ``(H*Dh, D)``.
    - other 3-D (query/key/value DenseGeneral) ``[D, H, Dh]`` -> ``(D, H*Dh)``.
    - 4-D conv ``[kh, kw, C, D]`` -> ``(kh*kw*C, D)`` (the patch embedding is the linear map
      of a flattened patch).

    In every case a row-major reshape of the kernel to ``[fan_in, fan_out]`` is that matrix
    (:func:`to_matrix`).
    """
    shape = tuple(int(d) for d in shape)
    parts = path.split("/")
    module = parts[-2] if len(parts) >= 2 else ""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        if module == "out":
            return shape[0] * shape[1], shape[2]
        return shape[0], shape[1] * shape[2]
    if len(shape) == 4:
        return shape[0] * shape[1] * shape[2], shape[3]
    raise ValueError(
        f"{path!r}: no logical 2-D view for a {len(shape)}-D leaf of shape {shape}; "
        "only 2-D, 3-D (attention) and 4-D (conv) kernels are prunable"
    )


def to_matrix(path: str, x: jax.Array) -> jax.Array:
    """Reshapes a kernel (or a same-shaped mask/score) to its ``[fan_in, fan_out]`` view."""
    return jnp.reshape(x, logical_fan_in_out(path, x.shape))


def select(tree: Tree, paths: Sequence[str]) -> dict[str, Any]:
    """The flat ``{path: leaf}`` sub-dict of ``tree`` for ``paths`` (KeyError names a miss)."""
    flat = flatten(tree)
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"paths not in the tree: {missing}")
    return {p: flat[p] for p in paths}


def ones_masks(params: Tree, paths: Sequence[str]) -> dict[str, Any]:
    """All-True masks (dense start) for ``paths``, nested like params."""
    return nest({p: jnp.ones(_shape(x), bool) for p, x in select(params, paths).items()})


# --------------------------------------------------------------------------------------------
# Sparsity targets
# --------------------------------------------------------------------------------------------


def num_to_keep(size: int, sparsity: Any) -> Any:
    """Number of entries kept in ``size`` entries at ``sparsity``: the one rounding rule.

    ``floor((1 - sparsity) * size + 0.5)`` (round half up), clipped to ``[0, size]``.
    Rounding to nearest, not flooring, makes ``(1 - 0.9) * 100 = 9.999...`` keep 10.
    Python ``sparsity`` (in [0, 1]) -> Python int; JAX scalar (may be traced) -> int32 scalar
    computed in float32 (same result except at exact .5 ties of float rounding).
    """
    if _is_static(sparsity):
        s = validate_sparsity(sparsity, allow_one=True)
        return min(max(math.floor((1.0 - s) * size + 0.5), 0), size)
    kept = jnp.floor((1.0 - jnp.asarray(sparsity, jnp.float32)) * size + 0.5)
    return jnp.clip(kept, 0, size).astype(jnp.int32)


def _erk_raw_density(path: str, shape: Sequence[int], power: float) -> float:
    fan_in, fan_out = logical_fan_in_out(path, shape)
    return ((fan_in + fan_out) / (fan_in * fan_out)) ** power


def _apportion(real: dict[str, float], caps: dict[str, int], total: int) -> dict[str, int]:
    """Integers close to ``real`` (each within 1, in ``[0, cap]``) that sum to ``total``.

    Largest-remainder method: floor everything, then give the missing units to the largest
    fractional parts (ties: sorted-path order).
    """
    counts = {p: min(math.floor(v), caps[p]) for p, v in real.items()}
    deficit = total - sum(counts.values())
    order = sorted(real, key=lambda p: (-(real[p] - math.floor(real[p])), p))
    while deficit > 0:
        grown = False
        for p in order:
            if deficit > 0 and counts[p] < caps[p]:
                counts[p] += 1
                deficit -= 1
                grown = True
        if not grown:
            raise ValueError("cannot apportion: total exceeds the capacity")
    for p in reversed(order):  # only float noise can make the floors overshoot
        while deficit < 0 and counts[p] > 0:
            counts[p] -= 1
            deficit += 1
    return counts


def erk_keep_counts(
    shapes: Mapping[str, Any], sparsity: float, erk_power_scale: float = 1.0
) -> dict[str, int]:
    """Kept-entry counts ``{path: k_l}`` under Erdős–Rényi-kernel (Evci et al., 2020, RigL).

    ``shapes`` maps every leaf to share the budget over (nested or flat) to an array, a
    ``ShapeDtypeStruct`` or a shape tuple.

    Density of leaf l is ``eps * r_l`` with ``r_l = ((fan_in + fan_out) / (fan_in * fan_out))
    ** erk_power_scale`` on the logical 2-D view, so a 3-D ``[D, H, Dh]`` kernel gets the
    density of the ``[D, H*Dh]`` matrix, and wider layers are sparser. ``eps`` is solved so
    the expected kept count is ``K = num_to_keep(total, sparsity)``; leaves whose density
    would exceed 1 are made dense and ``eps`` is re-solved over the rest, until none exceeds 1
    (a leaf over 1 for some eps is over 1 for the larger re-solved eps, so all such leaves
    are capped at once). The real-valued counts are then rounded by largest remainder, so
    **the counts sum to exactly K**.

    Note: for a conv kernel this uses the 2-D view ``(kh*kw*C, D)``, not RigL's
    ``sum(shape) / prod(shape)`` over all four dims: the ViT patch embedding is a linear map
    of a flattened patch.
    """
    sparsity = validate_sparsity(sparsity)
    if not erk_power_scale >= 0:
        raise ValueError(f"erk_power_scale must be >= 0, got {erk_power_scale!r}")
    shapes = flatten(shapes)
    if not shapes:
        raise ValueError("erk_keep_counts: no leaves")
    sizes = {p: _size(s) for p, s in shapes.items()}
    raw = {p: _erk_raw_density(p, _shape(s), erk_power_scale) for p, s in shapes.items()}
    target = num_to_keep(sum(sizes.values()), sparsity)
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(sizes):
        free = [p for p in sizes if p not in dense]
        budget = target - sum(sizes[p] for p in dense)
        eps = budget / sum(raw[p] * sizes[p] for p in free)
        over = [p for p in free if eps * raw[p] > 1.0 + 1e-12]
        if not over:
            break
        dense.update(over)
    real = {p: float(sizes[p]) if p in dense else min(eps * raw[p], 1.0) * sizes[p] for p in sizes}
    return _apportion(real, sizes, target)


def target_sparsities(
    params: Tree,
    paths: Sequence[str],
    sparsity: float,
    distribution: str = "uniform",
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-leaf sparsity ``{path: s_l}`` for the prunable ``paths`` of ``params``.

    ``params`` may hold arrays, ``ShapeDtypeStruct``s or shape tuples (nested or flat).

    - ``'uniform'``: every leaf at ``sparsity``; each keeps ``num_to_keep(n_l, sparsity)``, so
      the total kept is within ``len(paths) / 2`` of ``num_to_keep(total, sparsity)``.
    - ``'erk'``: see :func:`erk_keep_counts`; the returned ``s_l = 1 - k_l / n_l`` are the
      realised sparsities, so ``num_to_keep(n_l, s_l) == k_l`` and the total kept is
      exactly ``num_to_keep(total, sparsity)``. Leaves capped dense get exactly 0.0.
    """
    sparsity = validate_sparsity(sparsity)
    if not paths:
        raise ValueError("target_sparsities: no prunable paths")
    leaves = select(params, paths)
    if distribution == "uniform":
        return {p: sparsity for p in leaves}
    if distribution == "erk":
        counts = erk_keep_counts(leaves, sparsity, erk_power_scale)
        return {p: 1.0 - counts[p] / _size(leaves[p]) for p in leaves}
    raise ValueError(f"unknown distribution {distribution!r}; allowed: {DISTRIBUTIONS}")


# --------------------------------------------------------------------------------------------
# Top-k masks
# --------------------------------------------------------------------------------------------


def _clean_scores(scores: jax.Array) -> jax.Array:
    scores = jnp.asarray(scores)
    if scores.dtype == jnp.bool_:
        return scores.astype(jnp.int32)
    if jnp.issubdtype(scores.dtype, jnp.floating):
        # lax.top_k ranks -0.0 below +0.0 while the argsort (and ==) call them equal: make
        # every zero +0.0 so all zeros tie (index rule) in both implementations. NaN -> -inf.
        zero = jnp.zeros((), scores.dtype)
        scores = jnp.where(scores == 0, zero, scores)
        return jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    return scores


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Bool mask of ``scores``' shape with exactly ``k`` True: the ``k`` largest scores.

    ``k`` is a static Python int in ``[0, scores.size]``. Ties go to the lower flat
    (row-major) index, so the count is exact even when all scores are equal. Uses
    ``lax.top_k`` on the flattened scores (XLA's TopK returns equal values in index order),
    on the ``n - k`` to prune when ``k > n/2`` (float scores), since its cost grows with k.
    """
    scores = _clean_scores(scores)
    n = scores.size
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return jnp.zeros(scores.shape, bool)
    if k == n:
        return jnp.ones(scores.shape, bool)
    flat = scores.reshape(-1)
    if 2 * k <= n or not jnp.issubdtype(flat.dtype, jnp.floating):
        _, idx = lax.top_k(flat, k)
        return jnp.zeros(n, bool).at[idx].set(True).reshape(scores.shape)
    # k > n/2: top_k's cost grows with k, so find the n - k entries to prune instead: the
    # smallest scores, ties to the *higher* index (top_k of the negated, reversed array).
    _, ridx = lax.top_k(-flat[::-1], n - k)
    return jnp.ones(n, bool).at[n - 1 - ridx].set(False).reshape(scores.shape)


def topk_mask_dynamic(scores: jax.Array, k: Any) -> jax.Array:
    """:func:`topk_mask` for a ``k`` that may be traced (same result, same tie rule).

    Ranks every entry with a stable descending argsort and keeps rank < k; ``k`` is clipped
    to ``[0, scores.size]``. One compilation serves every k (e.g. a sparsity schedule).
    """
    scores = _clean_scores(scores)
    n = scores.size
    order = jnp.argsort(scores.reshape(-1), descending=True, stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (rank < jnp.clip(k, 0, n)).reshape(scores.shape)


def _topk_any(scores: jax.Array, k: Any) -> jax.Array:
    if isinstance(k, (int, np.integer)):
        return topk_mask(scores, int(k))
    return topk_mask_dynamic(scores, k)


def layerwise_masks(scores: Tree, sparsities: Mapping[str, Any]) -> dict[str, Any]:
    """Per-leaf top-k: leaf ``p`` keeps the ``num_to_keep(size, sparsities[p])`` largest of
    ``scores[p]``. Masks are built for the keys of ``sparsities`` (``scores`` may hold more
    leaves, nested or flat). Sparsities may be Python floats (static k) or JAX scalars.
    Returns nested masks.
    """
    flat = select(scores, list(sparsities))
    return nest({p: _topk_any(s, num_to_keep(s.size, sparsities[p])) for p, s in flat.items()})


def global_masks(scores: Tree, sparsity: Any, paths: Sequence[str] | None = None) -> dict:
    """One top-k over all leaves (scores must be comparable across leaves, e.g. ``|W|``).

    Keeps exactly ``num_to_keep(total, sparsity)`` entries in total; ties go to the leaf
    earlier in sorted-path order, then to the lower flat index. ``paths`` restricts the
    leaves of ``scores`` (default: all). ``sparsity`` may be a JAX scalar. Returns nested masks.
    """
    flat = flatten(scores)
    flat = select(flat, sorted(paths if paths is not None else flat))
    if not flat:
        raise ValueError("global_masks: no score leaves")
    dtype = jnp.result_type(*[_clean_scores(s).dtype for s in flat.values()])
    allscores = jnp.concatenate([_clean_scores(s).reshape(-1).astype(dtype) for s in flat.values()])
    keep = _topk_any(allscores, num_to_keep(allscores.size, sparsity))
    masks, offset = {}, 0
    for p, s in flat.items():
        masks[p] = keep[offset : offset + s.size].reshape(s.shape)
        offset += s.size
    return nest(masks)


def random_masks(rng: jax.Array, params_or_shapes: Tree, sparsities: Mapping[str, Any]) -> dict:
    """Uniformly random masks with exactly ``num_to_keep(n_l, s_l)`` kept per leaf.

    ``params_or_shapes`` gives each leaf's shape (arrays, ``ShapeDtypeStruct``s or tuples,
    nested or flat). Leaf ``i`` in sorted-path order uses ``jax.random.split(rng, L)[i]``,
    so the result does not depend on dict order. Returns nested masks.
    """
    paths = sorted(sparsities)
    leaves = select(params_or_shapes, paths)
    keys = jax.random.split(rng, len(paths))
    scores = {
        p: jax.random.uniform(key, _shape(leaves[p])) for p, key in zip(paths, keys, strict=True)
    }
    return layerwise_masks(scores, sparsities)


def compute_masks(
    scores: Tree,
    sparsity: Any,
    distribution: str = "uniform",
    scope: str = "layerwise",
    shapes_or_params: Tree | None = None,
    erk_power_scale: float = 1.0,
) -> dict:
    """Masks from scores in one call, for every leaf of ``scores`` (pass only prunable ones).

    - ``scope='layerwise'``: per-leaf targets from :func:`target_sparsities` (shapes from
      ``shapes_or_params`` if given, else from the scores, which have the kernels' shapes),
      then :func:`layerwise_masks`. ``'erk'`` needs a Python-float sparsity (its budget is
      solved on the host); ``'uniform'`` also takes a traced one.
    - ``scope='global'``: :func:`global_masks`; the distribution then comes out of the
      scores themselves, so only ``distribution='uniform'`` (meaning "no imposed
      distribution") is accepted and ``'erk'`` raises ``ValueError``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; allowed: {DISTRIBUTIONS}")
    flat = flatten(scores)
    if scope == "global":
        if distribution != "uniform":
            raise ValueError(
                f"scope='global' picks the per-leaf sparsities itself; distribution="
                f"{distribution!r} cannot also be imposed (use distribution='uniform')"
            )
        return global_masks(flat, sparsity)
    if scope != "layerwise":
        raise ValueError(f"unknown scope {scope!r}; allowed: {SCOPES}")
    paths = sorted(flat)
    if not _is_static(sparsity):
        if distribution == "erk":
            raise ValueError("distribution='erk' needs a Python-float sparsity, not a JAX value")
        return layerwise_masks(flat, {p: sparsity for p in paths})
    shapes = shapes_or_params if shapes_or_params is not None else flat
    targets = target_sparsities(shapes, paths, sparsity, distribution, erk_power_scale)
    return layerwise_masks(flat, targets)


# --------------------------------------------------------------------------------------------
# Using masks
# --------------------------------------------------------------------------------------------


def sparsity_stats(masks: Tree) -> dict[str, jax.Array]:
    """``{path: sparsity of that leaf, 'total': sparsity over all masked entries}`` as float32
    JAX scalars (no host sync; fine inside jit). ``None`` leaves are skipped."""
    flat = {p: m for p, m in flatten(masks).items() if m is not None}
    stats: dict[str, jax.Array] = {}
    kept_total = jnp.zeros((), jnp.float32)
    size_total = 0
    for p, m in flat.items():
        kept = jnp.sum(m, dtype=jnp.float32)
        stats[p] = 1.0 - kept / m.size
        kept_total = kept_total + kept
        size_total += m.size
    stats["total"] = 1.0 - kept_total / max(size_total, 1)
    return stats


def apply_masks(params: Tree, masks: Tree) -> dict[str, Any]:
    """Params with the pruned entries (mask False) set to 0; unmasked leaves untouched.

    Raises ``ValueError`` if a mask has no param of the same shape (a path typo would
    otherwise prune nothing).
    """
    flat = flatten(params)
    for p, m in flatten(masks).items():
        if m is None:
            continue
        if p not in flat:
            raise ValueError(f"mask {p!r} has no matching param")
        if tuple(m.shape) != tuple(flat[p].shape):
            raise ValueError(f"mask {p!r} has shape {m.shape}, param has {flat[p].shape}")
        flat[p] = jnp.where(m, flat[p], jnp.zeros((), flat[p].dtype))
    return nest(flat)
