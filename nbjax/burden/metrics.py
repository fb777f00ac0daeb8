"""The neural-burden metrics, one function each on plain arrays, and the reference step.

Every :class:`~nbjax.model.vit.MaskedLinear` sows e_j = E|x_j| (``in_abs_mean``), the mean
absolute value of each input feature over batch and tokens; the metrics are reductions over
it, the kernels, their masks and the gradient. :mod:`nbjax.burden.tracker` computes them
inside the train step from these functions. What each metric means, why it reads as burden,
which network a step's metrics describe and what they cost: docs/burden.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nbjax.pruning.base import Pruner

PyTree = Any
PREFIX = "burden"
STAT = "in_abs_mean"  # what every MaskedLinear sows: E|x_j| over batch and tokens
PRUNED_SQ, DENSE_SQ = "pruned_sq", "dense_sq"  # what the probe pass sows (measure_pruned)
TINY = 1e-30


# --------------------------------------------------------------------------------------------
# The metrics, one function each, on plain arrays (what the tracker calls)
# --------------------------------------------------------------------------------------------


def input_abs_mean(x: jax.Array, in_axes: int) -> jax.Array:
    """e_j = E|x_j|: mean absolute value of each input feature over every leading axis.

    This is what :class:`~nbjax.model.vit.MaskedLinear` sows as ``in_abs_mean`` (``in_axes`` is
    the number of trailing input axes the kernel contracts).
    """
    lead = tuple(range(x.ndim - in_axes))
    return jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=lead)


def _out_axes(e: jax.Array, kernel: jax.Array) -> tuple[int, ...]:
    return tuple(range(e.ndim, kernel.ndim))


def _kept_count(kernel: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.asarray(kernel.size, jnp.float32)
    return jnp.sum(mask, dtype=jnp.float32)


def kept_abs_sums(e: jax.Array, kernel: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Σ_j e_j Σ_i M_ji |W_ji|: the signal-weighted magnitude the kept connections carry."""
    a = jnp.abs(kernel.astype(jnp.float32))
    if mask is not None:
        a = jnp.where(mask, a, 0.0)
    return jnp.sum(e * jnp.sum(a, axis=_out_axes(e, kernel)))


def load_numerator(e: jax.Array, kernel: jax.Array, mask: jax.Array | None,
                   kept_sum: jax.Array | None = None) -> jax.Array:
    """mean over kept (j,i) of e_j |W_ji|: the mean signal one surviving connection carries.

    0 for a layer with nothing kept. ``mask=None`` means all kept. ``kept_sum``: the sum
    Σ_j e_j Σ_i M_ji|W_ji| if already computed.
    """
    total = kept_abs_sums(e, kernel, mask) if kept_sum is None else kept_sum
    return total / jnp.maximum(_kept_count(kernel, mask), 1.0)


def reference_load(e: jax.Array, kernel: jax.Array, mask: jax.Array | None = None,
                   pruned_abs_colsum: jax.Array | None = None,
                   kept_sum: jax.Array | None = None) -> jax.Array:
    """mean over all (j,i) of e⁰_j |W⁰_ji|: the denominator of ``load`` (the dense layer).

    Computed as (Σ_j e_j Σ_i M|W| + Σ_j e_j r_j) / n, with r_j = Σ_i (1 - M_ji)|W_ji| for the
    entries of ``kernel`` that ``mask`` prunes, plus ``pruned_abs_colsum`` (per input
    feature) for dense weights no longer in ``kernel`` (the zeroed initial weights of a
    method that starts sparse). For an all-kept mask the first term is the very number the
    numerator divides by k = n, so ``load`` is exactly 1 at the reference step of a dense
    layer, bit for bit (the tracker passes the numerator's own ``kept_sum``, so the two
    share the very same number).
    """
    total = kept_abs_sums(e, kernel, mask) if kept_sum is None else kept_sum
    rest = jnp.zeros(e.shape, jnp.float32)
    if mask is not None:
        pruned = jnp.where(mask, 0.0, jnp.abs(kernel.astype(jnp.float32)))
        rest = rest + jnp.sum(pruned, axis=_out_axes(e, kernel))
    if pruned_abs_colsum is not None:
        rest = rest + pruned_abs_colsum
    return (total + jnp.sum(e * rest)) / kernel.size


def load(numerator: jax.Array, reference: jax.Array) -> jax.Array:
    """``load`` = mean over kept (j,i) of e_j|W_ji|  /  mean over all (j,i) of e⁰_j|W⁰_ji|.

    ``numerator``: :func:`load_numerator` of this step; ``reference``: :func:`reference_load`
    of the dense layer at the reference step. The mean signal one surviving connection
    carries, relative to the dense layer's average connection: exactly 1 at the reference
    step of a dense layer; it rises by selection and by compensation (docs/burden.md).
    """
    return numerator / reference


def _relative_activity(a: jax.Array) -> jax.Array:
    a = jnp.ravel(a).astype(jnp.float32)
    return a / jnp.maximum(jnp.mean(a), TINY)


def overload_frac(a: jax.Array, kappa: float) -> jax.Array:
    """Share of units u with a_u / mean(a) >= kappa (config ``burden.kappa``, default 2).

    a_u = E|h_u| is the mean absolute activation of unit u over batch and tokens (for the
    MLP hidden units, fc2's sown ``in_abs_mean``; for the attention output channels, the
    attention ``out`` projection's). A unit that carries kappa times the average is
    overloaded: pruning concentrates the signal on fewer survivors.
    """
    return jnp.mean(_relative_activity(a) >= kappa, dtype=jnp.float32)


def dormant_frac(a: jax.Array, tau: float) -> jax.Array:
    """Share of units u with a_u / mean(a) <= tau (``burden.tau``, default 0.1; ReDo's score).

    A dormant unit carries (almost) nothing (Sokar et al., 2023, "The Dormant Neuron
    Phenomenon"): the layer's work is done by fewer units, whose share of the load grows.
    """
    return jnp.mean(_relative_activity(a) <= tau, dtype=jnp.float32)


def pruned_signal(pruned_sq: jax.Array, dense_sq: jax.Array) -> jax.Array:
    """``pruned_signal`` = ||x (W ⊙ (1 - M))||² / ||x W||², 0 where the dense output is 0.

    The share of a layer's dense output energy (bias excluded, over batch and tokens) that
    its mask withholds, from the two squared norms the probe pass sows
    (:class:`~nbjax.model.vit.MaskedLinear` with ``measure_pruned``): 0 for an all-kept
    mask, 1 for an all-pruned one. When it is measured, and with which W: docs/burden.md.
    """
    return jnp.where(dense_sq > 0, pruned_sq / jnp.maximum(dense_sq, TINY), 0.0)


def kept_rms(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """sqrt(mean over kept positions of x²); 0 when nothing is kept."""
    sq = jnp.square(x.astype(jnp.float32))
    if mask is not None:
        sq = jnp.where(mask, sq, 0.0)
    return jnp.sqrt(jnp.sum(sq) / jnp.maximum(_kept_count(x, mask), 1.0))


def kept_weight_rms(rms: jax.Array, reference_rms: jax.Array) -> jax.Array:
    """``kept_weight_rms`` = rms of the kept weights / the same at the reference step.

    ``rms`` and ``reference_rms`` are :func:`kept_rms` of the kernel and its mask now and at
    the reference step. Do the survivors grow? 1 at the reference step, above 1 when the kept
    weights are larger, by selection or by growth under training.
    """
    return rms / jnp.maximum(reference_rms, TINY)


def kept_grad_rms(grad: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``kept_grad_rms`` = rms of the dense gradient of the step at the kept positions.

    The gradient pressure on the survivors: how hard the loss pushes the connections that
    must carry the signal. Absolute (not relative): compare runs at the same step.
    """
    return kept_rms(grad, mask)


def selection_numerator(reference_e: jax.Array, reference_abs_w: jax.Array,
                        mask: jax.Array | None) -> jax.Array:
    """mean over kept (j,i) of e⁰_j |W⁰_ji|: the survivors' load as they were at the reference.

    ``reference_e`` and ``reference_abs_w`` are e and |W| of the reference step (per input
    feature and per entry), ``mask`` the current one: what the connections kept *now* carried
    in the dense layer, before any training on the mask.
    """
    return load_numerator(reference_e, reference_abs_w, mask)


def selection(selection_num: jax.Array, reference: jax.Array) -> jax.Array:
    """``selection`` = :func:`selection_numerator` / :func:`reference_load`.

    How much more than the dense layer's average connection the kept connections carried at
    the reference: the part of ``load`` that choosing them explains. 1 for a dense layer, ≈ 1
    on average for a random mask, above 1 when the largest weights are kept.
    """
    return selection_num / reference


def compensation(numerator: jax.Array, selection_num: jax.Array) -> jax.Array:
    """``compensation`` = :func:`load_numerator` / :func:`selection_numerator`.

    How much more the same kept connections carry now than at the reference: the part of
    ``load`` that training on the mask explains. ``selection × compensation == load`` (per
    kernel, up to rounding); 0 when the survivors carried nothing at the reference.
    """
    return numerator / jnp.maximum(selection_num, TINY)


def compensation_rms(rms: jax.Array, reference_rms: jax.Array) -> jax.Array:
    """``compensation_rms`` = rms of the kept weights now / rms of the same entries' |W⁰|.

    ``rms``: :func:`kept_rms` of the kernel and its current mask; ``reference_rms``: the same
    of the reference |W⁰| and the *current* mask. Did the survivors' weights grow since the
    reference? Unlike ``kept_weight_rms``, a prune that keeps the largest weights leaves it 1.
    """
    return rms / jnp.maximum(reference_rms, TINY)


def compensation_grad(rms: jax.Array, reference_rms: jax.Array) -> jax.Array:
    """``compensation_grad`` = rms of the dense gradient now / rms of |g⁰|, both over the kept
    entries of the current mask: how much harder the loss pushes the survivors than it pushed
    the same connections at the reference."""
    return rms / jnp.maximum(reference_rms, TINY)


def burden_index(block_values: Sequence[jax.Array]) -> jax.Array:
    """``index`` = mean over blocks of ``load``: one number per step, the network's burden.

    ``selection_index`` and ``compensation_index`` are the same mean of ``selection`` and
    ``compensation``.
    """
    return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in block_values]))


# --------------------------------------------------------------------------------------------
# The reference step
# --------------------------------------------------------------------------------------------


def reference_step(pruner: Pruner) -> int:
    """The step whose network ``load`` and ``kept_weight_rms`` are relative to.

    For a method that starts dense and prunes later, the step of its first mask update (the
    last step whose network is still dense); 0 for every other method.
    """
    if pruner.starts_dense and pruner.first_update is not None:
        return int(pruner.first_update)
    return 0
