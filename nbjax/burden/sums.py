"""The per-kernel sums behind the burden metrics, one grouped, vmapped pass per step.

:func:`kernel_sums` computes, for every prunable kernel, the reductions the tracker
(:mod:`nbjax.burden.tracker`) turns into ``load``, its split into ``selection`` and
``compensation``, and the kept rms, and carries the per-entry reference of the split
forward (captured at the reference steps). What the metrics mean: docs/burden.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbjax.burden.metrics import (
    kept_abs_sums,
    kept_grad_rms,
    kept_rms,
    load_numerator,
    reference_load,
    selection_numerator,
)

# The burden state's per-kernel reference entries that the pass reads (and the last three
# of which it captures): the zeroed initial weights' Σ_i |W_ji| of a sparse start, and the
# reference |W|, |g| (per entry, float32) and e (per input feature).
REFERENCE_ENTRIES = ("init_pruned_abs_colsum", "ref_abs_w", "ref_abs_g", "ref_e")


class KernelSums(NamedTuple):
    """Per kernel path, this step's values of the grouped sums (:func:`kernel_sums`)."""

    load_numerator: dict[str, jax.Array]
    reference_load: dict[str, jax.Array]  # what a capture at this step would hold
    weight_rms: dict[str, jax.Array]  # kept_rms of the kernel
    grad_rms: dict[str, jax.Array]  # kept_grad_rms
    selection_numerator: dict[str, jax.Array]
    reference_weight_rms: dict[str, jax.Array]  # kept_rms of the reference |W|, current mask
    reference_grad_rms: dict[str, jax.Array]  # kept_rms of the reference |g|, current mask
    ref_abs_w: dict[str, jax.Array]  # the per-entry reference after this step
    ref_abs_g: dict[str, jax.Array]
    ref_e: dict[str, jax.Array]


def _abs32(x: jax.Array) -> jax.Array:
    return jnp.abs(x.astype(jnp.float32))


def _one_kernel(first_step: jax.Array, capture: jax.Array, e: jax.Array, w: jax.Array,
                g: jax.Array, init_pruned: jax.Array, ref_abs_w: jax.Array,
                ref_abs_g: jax.Array, ref_e: jax.Array, mask: jax.Array | None = None
                ) -> tuple[jax.Array, ...]:
    """One kernel's :class:`KernelSums` values (in field order); vmapped over a group.

    At a capture step the reference takes this step's e, |g| and the kept |W| (a pruned entry
    keeps its earlier reference: a sparse start's dense initial magnitude). The reference's
    kept values are then this step's own, so the selection numerator and the reference rms
    are this step's very numbers: selection × compensation and both rms ratios are exactly 1
    at the reference step of a dense layer.
    """
    kept = kept_abs_sums(e, w, mask)
    numerator = load_numerator(e, w, mask, kept)
    extra = jnp.where(first_step, init_pruned, 0.0)
    w_rms, g_rms = kept_rms(w, mask), kept_grad_rms(g, mask)
    captured_w = _abs32(w) if mask is None else jnp.where(mask, _abs32(w), ref_abs_w)
    ref_abs_w = jnp.where(capture, captured_w, ref_abs_w)
    ref_abs_g = jnp.where(capture, _abs32(g), ref_abs_g)
    ref_e = jnp.where(capture, e, ref_e)
    sel = jnp.where(capture, numerator, selection_numerator(ref_e, ref_abs_w, mask))
    ref_w_rms = jnp.where(capture, w_rms, kept_rms(ref_abs_w, mask))
    ref_g_rms = jnp.where(capture, g_rms, kept_rms(ref_abs_g, mask))
    return (numerator, reference_load(e, w, mask, extra, kept), w_rms, g_rms, sel,
            ref_w_rms, ref_g_rms, ref_abs_w, ref_abs_g, ref_e)


def kernel_sums(kernels: Sequence[str], e: Mapping[str, jax.Array],
                params: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                grads: Mapping[str, jax.Array],
                reference: Mapping[str, Mapping[str, jax.Array]],
                first_step: jax.Array, capture: jax.Array) -> KernelSums:
    """Per kernel: :func:`load_numerator`, the :func:`reference_load` this step would capture,
    :func:`kept_rms` of W, :func:`kept_grad_rms`, the :func:`selection_numerator`, the rms of
    the reference |W| and |g| over the current mask, and the per-entry reference after this
    step; each computed once per group of same-shape kernels.

    q/k/v, out, fc1 and fc2 repeat in every block, so each group is stacked with the kernel as
    a leading axis and :func:`_one_kernel` is vmapped over it: a few operations per group
    instead of per kernel (on a CPU the cost of these tiny metrics is the number of
    operations, docs/performance.md). ``load``'s numerator and reference share one
    Σ_j e_j Σ_i M|W|, so ``load`` is exactly 1 at the reference step of a dense layer.
    ``reference``: the flat burden state entries of :data:`REFERENCE_ENTRIES`; the initial
    pruned sums count in the reference load only where ``first_step``; the per-entry
    reference is captured where ``capture``.
    """
    groups: dict[tuple, list[str]] = {}
    for p in kernels:
        key = (params[p].shape, params[p].dtype, e[p].shape, p in masks)
        groups.setdefault(key, []).append(p)

    def one(*args):
        return _one_kernel(first_step, capture, *args)

    out = KernelSums(*({} for _ in KernelSums._fields))
    for (*_, masked), paths in groups.items():
        trees = (e, params, grads, *(reference[name] for name in REFERENCE_ENTRIES))
        trees += (masks,) if masked else ()
        values = jax.vmap(one)(*[jnp.stack([tree[p] for p in paths]) for tree in trees])
        for i, p in enumerate(paths):
            for target, value in zip(out, values, strict=True):
                target[p] = value[i]
    return out
