"""Pruning masks: which leaves are prunable, per-leaf sparsity targets, applying masks.

A *path* is the ``'/'``-joined chain of param dict keys, e.g. ``'block_0/mlp/fc1/kernel'``.
*Masks* are nested like the params but hold only the prunable leaves: ``bool``, the shape of
the kernel, True = kept. Every function that reads a tree accepts it nested or flat
(``{path: leaf}``), since :func:`flatten` is idempotent.

One rounding rule everywhere (:func:`num_to_keep`): ``n`` entries at sparsity ``s`` keep
``floor((1 - s) * n + 0.5)``. Masks are built from scores by the one top-k,
:func:`nbjax.pruning.common.topk_layerwise` and :func:`nbjax.pruning.common.topk_global`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

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

    In every case a row-major reshape of the kernel to ``[fan_in, fan_out]`` is that matrix.
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

    ``shapes`` maps each leaf sharing the budget (nested or flat) to an array, a
    ``ShapeDtypeStruct`` or a shape tuple. Leaf l's density is ``eps * r_l``, ``r_l =
    ((fan_in + fan_out) / (fan_in * fan_out)) ** erk_power_scale`` on its logical 2-D view
    (:func:`logical_fan_in_out`); leaves over density 1 are made dense and ``eps`` re-solved
    over the rest. Largest-remainder rounding makes the counts sum to exactly
    ``num_to_keep(total, sparsity)``.
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
# Using masks
# --------------------------------------------------------------------------------------------


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
