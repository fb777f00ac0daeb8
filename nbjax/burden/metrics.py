"""Neural burden metrics, computed inside the jit-compiled train step (SPEC.md, "Burden metrics").

In a brain that loses neurons the survivors carry the load of the lost ones. In a network
pruned while it trains, the surviving connections and units must carry the signal that the
pruned ones carried. This module measures that, per block, at (almost) every step, from
reductions that the model does itself: every :class:`~nbjax.model.vit.MaskedLinear` sows
``in_abs_mean`` = e_j = E|x_j|, the mean absolute value of each of its input features over
batch and tokens. Nothing of shape [batch, tokens, features] leaves the step and nothing
waits for the host.

Notation, for one prunable kernel W (input features j, outputs i; the kernel's leading axes
are its inputs, e.g. [D, H, Dh] for a query projection or [H, Dh, D] for the attention
output), mask M (True = kept), n = number of entries of W, k = number kept:

=====================  ======================================================================
metric                 formula (see the function of the same name)
=====================  ======================================================================
``load``               mean over kept (j,i) of e_j|W_ji|  /  mean over all (j,i) of e⁰_j|W⁰_ji|
``overload_frac``      share of units with a_u / mean(a) >= kappa
``dormant_frac``       share of units with a_u / mean(a) <= tau (ReDo's dormant score)
``pruned_signal``      ||x (W ⊙ (1 - M))||² / ||x W||²
``kept_weight_rms``    rms of kept W  /  the same at the reference step
``kept_grad_rms``      rms of the dense gradient at kept positions
``index``              mean over blocks of ``load``
=====================  ======================================================================

**Which network a step's metrics describe.** The metrics logged for step t (the step that
processes batch t, ``state.step == t`` before it) describe the network that processed batch
t: the activations of its forward pass, the params and masks it ran with (before the
optimizer update and the mask update of step t), and the gradient it produced. The one
exception is ``pruned_signal``, measured at the *end* of step t: with the params after the
optimizer update and the masks after the mask update of step t (see :func:`pruned_signal`).

**Reference step** (:func:`reference_step`). ``load`` and ``kept_weight_rms`` are relative to
the network at a reference step t_ref: the first mask update of the gradual schedule
(``pruning.start_frac`` of training) for the schedule-based methods ``gmp`` and ``pdwp``, and
step 0 for every other method (``set``, ``rigl``, ``static`` start sparse; ``none`` never
prunes). The reference is captured twice at most: at step 0 (so every step has one), and
again at t_ref when t_ref > 0. So before pruning starts a gmp/pdwp run's load is measured
against step 0, exactly 1 at step 0, and exactly 1 again at t_ref (the schedule's first
update happens at the *end* of step t_ref, so the network of step t_ref is still dense); the
first step that runs a pruned network, t_ref + 1 or the next update, shows the jump. The
reference denominator is that of the *dense* layer: for the non-persistent methods that start
sparse, whose pruned weights are zeroed at initialisation, it uses the dense initial weights
(their per-input-feature sums |W| are kept in the burden state at init), so a random mask at
step 0 reads as load ≈ 1 and only what happens afterwards (compensation) moves it.

**Cost.** ``load``, ``overload_frac``, ``dormant_frac``, ``kept_weight_rms`` and
``kept_grad_rms`` are a few reductions over the kernels, the gradients and the sown
per-feature means: O(parameters) a step, against O(batch × tokens × parameters) for the step
itself. ``pruned_signal`` needs the layers' inputs x and a second matmul per layer, so it
runs a second, forward-only pass of the model (:class:`~nbjax.model.vit.MaskedLinear` with
``measure_pruned``) under ``lax.cond`` only on the steps that measure it; the step compiles
once. ``burden.enabled=False`` removes all of it, the statistics of the model included.

**Held values.** On steps that do not measure ``pruned_signal`` the logged value is the last
measurement, held in the burden state (``burden/pruned_signal_step`` says which step that
was; -1 = never, the value is then 0). Holding rather than logging NaN means the loop, which
logs the last step of each logging window, always shows the latest measurement.

Turnover, re-activated count and exploration at mask updates are the pruning methods' own
metrics (``nbjax.pruning``); they are logged once, under the pruning prefix, not duplicated.

This module holds the metrics, one function each on plain arrays, and the reference step;
:mod:`nbjax.burden.tracker` holds the burden state and the per-step function the train step
calls, built from them.
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
MASK_UPDATED = "pruning/mask_updated"  # the pruning methods' flag: 1.0 on mask-update steps
TINY = 1e-30


# --------------------------------------------------------------------------------------------
# The metrics, one function each, on plain arrays (what the tracker and the tests call)
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


def load(e: jax.Array, kernel: jax.Array, mask: jax.Array | None, reference: jax.Array,
         kept_sum: jax.Array | None = None) -> jax.Array:
    """``load`` = mean over kept (j,i) of e_j|W_ji|  /  mean over all (j,i) of e⁰_j|W⁰_ji|.

    The mean signal carried per surviving connection, relative to the dense layer at the
    reference step (``reference`` = :func:`reference_load` there). Exactly 1 at the
    reference step of a dense layer. It rises when fewer connections carry the signal:
    through *selection* (magnitude pruning keeps the largest weights, so right after a
    magnitude prune load > 1) and through *compensation* (survivors, or the activations
    feeding them, grow while training). Both are the burden. A dense layer whose weights
    and activations keep their scale stays near 1, so dividing by density is not what
    moves it: it comes from the weights and activations actually present.
    """
    return load_numerator(e, kernel, mask, kept_sum) / reference


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


def pruned_signal_from_sums(pruned_sq: jax.Array, dense_sq: jax.Array) -> jax.Array:
    """``pruned_sq / dense_sq``, 0 where the dense output is 0 (see :func:`pruned_signal`)."""
    return jnp.where(dense_sq > 0, pruned_sq / jnp.maximum(dense_sq, TINY), 0.0)


def pruned_signal(x: jax.Array, kernel: jax.Array, mask: jax.Array | None,
                  in_axes: int = 1) -> jax.Array:
    """``pruned_signal`` = ||x (W ⊙ (1 - M))||² / ||x W||², over the whole batch and tokens.

    The reconstruction cost of the mask: the share of the layer's dense output energy (bias
    excluded) that the mask withholds, given the input x the pruned network delivers to the
    layer. 0 for an all-kept mask, 1 for an all-pruned one. W must be the *dense* kernel;
    in a train step it is measured by a forward-only probe pass in which every
    MaskedLinear sows the two squared norms (``measure_pruned``), this function is the same
    formula on explicit arrays. When measured, and with which W and M:

    * Persistent methods (pdwp, ``mitigation.persistent``) keep the dense W, so the value is
      measured every ``burden.every`` steps and at each mask update, with the params after
      the optimizer update and the masks after the mask update: the signal the current mask
      withholds from the current dense weights.
    * Non-persistent methods zero their pruned weights, so between updates W ⊙ (1 - M) = 0
      and the value would be 0 by construction. It is measured at each mask update only,
      with the params *before* the update (the weights about to be pruned still hold their
      values) and the new mask: the share of the signal that the update removed. It is held
      until the next update; 0 before the first (and always for ``none``).
    """
    kept = jnp.tensordot(x, jnp.where(mask, kernel, 0.0) if mask is not None else kernel,
                         axes=in_axes)
    removed = (jnp.tensordot(x, jnp.where(mask, 0.0, kernel), axes=in_axes)
               if mask is not None else jnp.zeros_like(kept))
    return pruned_signal_from_sums(jnp.sum(removed.astype(jnp.float32) ** 2),
                                   jnp.sum((kept + removed).astype(jnp.float32) ** 2))


def kept_rms(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """sqrt(mean over kept positions of x²); 0 when nothing is kept."""
    sq = jnp.square(x.astype(jnp.float32))
    if mask is not None:
        sq = jnp.where(mask, sq, 0.0)
    return jnp.sqrt(jnp.sum(sq) / jnp.maximum(_kept_count(x, mask), 1.0))


def kept_weight_rms(kernel: jax.Array, mask: jax.Array | None,
                    reference: jax.Array) -> jax.Array:
    """``kept_weight_rms`` = rms of the kept weights / rms of the kept weights at the reference.

    Do the survivors grow to compensate? 1 at the reference step; above 1 when the kept
    weights are larger than the reference's kept weights, by selection (magnitude pruning
    keeps the large ones) or by growth under training. ``reference`` is :func:`kept_rms` of
    the kernel and mask at the reference step.
    """
    return kept_rms(kernel, mask) / jnp.maximum(reference, TINY)


def kept_grad_rms(grad: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``kept_grad_rms`` = rms of the dense gradient of the step at the kept positions.

    The gradient pressure on the survivors: how hard the loss pushes the connections that
    must carry the signal. Absolute (not relative): compare runs at the same step.
    """
    return kept_rms(grad, mask)


def burden_index(block_loads: Sequence[jax.Array]) -> jax.Array:
    """``index`` = mean over blocks of ``load``: one number per step, the network's burden."""
    return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in block_loads]))


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
