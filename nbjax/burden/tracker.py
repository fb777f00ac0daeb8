"""The burden tracker: the burden state and the per-step update the train step calls.

:func:`make_tracker` builds a :class:`BurdenTracker` for a config and model. Its ``init``
makes the burden state (the reference values, held per kernel); its ``update``, inside the
jitted step, takes the step's :class:`BurdenInput` and returns the new state and the step's
``burden/...`` metrics, computed with the functions of :mod:`nbjax.burden.metrics` from the
grouped per-kernel sums of :mod:`nbjax.burden.sums`. What each metric means, and which
network a step's metrics describe: docs/burden.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from nbjax.burden.metrics import (
    DENSE_SQ,
    PREFIX,
    PRUNED_SQ,
    STAT,
    burden_index,
    compensation,
    compensation_grad,
    compensation_rms,
    dormant_frac,
    kept_weight_rms,
    load,
    overload_frac,
    pruned_signal,
    reference_step,
    selection,
)
from nbjax.burden.sums import REFERENCE_ENTRIES, KernelSums, kernel_sums
from nbjax.parallel import collectives
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import Pruner

PyTree = Any
# The per-block metrics averaged over the transformer blocks, and their index's name.
INDEXES = {"load": "index", "selection": "selection_index",
           "compensation": "compensation_index"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BurdenInput:
    """What one train step hands the tracker (a pytree).

    ``params`` and ``masks`` are those the step ran with (its forward pass, before any update
    of the step), ``updated_params`` the params after the optimizer update and before the
    mask update (the weights a non-persistent update is about to zero still hold their
    values), ``new_masks`` the masks after the mask update, ``mask_updated`` whether the
    pruning method recomputed them this step.
    """

    step: jax.Array  # int32 scalar: the step that ran (0-based)
    params: PyTree
    masks: PyTree
    grads: PyTree  # the step's dense gradient
    stats: PyTree  # the model's 'stats' collection of the step's forward pass
    images: jax.Array  # the step's batch as the model saw it (normalised, augmented, mixed)
    updated_params: PyTree
    new_masks: PyTree
    mask_updated: jax.Array  # bool scalar


def _group(path: str) -> str:
    """The block a kernel belongs to: ``'block_2/attn/query/kernel'`` -> ``'block_2'``."""
    return path.split("/")[0]


def _group_order(name: str) -> tuple[int, int, str]:
    if name.startswith("block_") and name[6:].isdigit():
        return (1, int(name[6:]), name)
    return (0, 0, name)


def _stat(flat_stats: Mapping[str, Any], kernel_path: str, name: str) -> jax.Array:
    value = flat_stats[kernel_path[: -len("kernel")] + name]
    return value[-1] if isinstance(value, tuple) else value


def _mean(values: Sequence[jax.Array]) -> jax.Array:
    return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in values]))


@dataclasses.dataclass(frozen=True)
class BurdenTracker:
    """The burden state's init and the update the train step calls after its pruning update.

    ``kernels``: the paths of every MaskedLinear kernel (those whose layer sows ``STAT``);
    a kernel with no mask counts as all kept. ``probe``: the model with ``measure_pruned``
    (and no ``collect_stats``), for the ``pruned_signal`` pass. ``grad_reduce``: as the train
    step's (:func:`nbjax.parallel.collectives.grad_reduce_mode`); ``'flat'`` runs the probe
    pass per batch shard of ``mesh`` and adds its sums as one flat buffer.
    """

    kernels: tuple[str, ...]
    in_ndims: tuple[int, ...]  # input axes of each kernel (the rank of its sown e_j)
    probe: nn.Module
    persistent: bool
    reference_step: int
    every: int
    kappa: float
    tau: float
    grad_reduce: str = "compiler"
    mesh: Any = None

    @property
    def groups(self) -> dict[str, list[str]]:
        """Kernel paths per block (``patch_embed`` is a group of its own, not a block)."""
        out: dict[str, list[str]] = {}
        for p in self.kernels:
            out.setdefault(_group(p), []).append(p)
        return {g: out[g] for g in sorted(out, key=_group_order)}

    @property
    def blocks(self) -> list[str]:
        """The transformer blocks, in order: the groups ``load`` is averaged over for ``index``."""
        return [g for g in self.groups if g.startswith("block_")]

    def init(self, dense_params: PyTree, masks: PyTree) -> PyTree:
        """The burden state at step 0, from the *dense* initial params (before masking).

        Holds, per kernel: the reference ``load`` denominator and kept-weight rms (captured
        by the first step), the per-input-feature Σ_i |W_init| of the initial weights a
        non-persistent method zeroes at init (for the dense reference of a sparse start),
        the per-entry reference |W| (the dense initial |W| until a capture replaces its kept
        entries) and |g| and the per-feature reference e of ``selection`` and
        ``compensation``, and the held ``pruned_signal``; plus the steps of the reference
        and the last ``pruned_signal`` measurement.
        """
        params = masks_lib.flatten(dense_params)
        flat_masks = masks_lib.flatten(masks)
        nan = jnp.full((), jnp.nan, jnp.float32)
        init_pruned, ref_e = {}, {}
        for p, in_ndim in zip(self.kernels, self.in_ndims, strict=True):
            w, m = params[p], flat_masks.get(p)
            colsum = jnp.zeros(w.shape[:in_ndim], jnp.float32)
            if m is not None and not self.persistent:
                pruned = jnp.where(m, 0.0, jnp.abs(w.astype(jnp.float32)))
                colsum = jnp.sum(pruned, axis=tuple(range(in_ndim, w.ndim)))
            init_pruned[p] = colsum
            ref_e[p] = jnp.zeros(w.shape[:in_ndim], jnp.float32)
        per_kernel = lambda value: masks_lib.nest({p: value for p in self.kernels})
        return {
            "ref_load": per_kernel(nan),
            "ref_rms": per_kernel(nan),
            "init_pruned_abs_colsum": masks_lib.nest(init_pruned),
            "ref_abs_w": masks_lib.nest({p: jnp.abs(params[p].astype(jnp.float32))
                                         for p in self.kernels}),
            "ref_abs_g": masks_lib.nest({p: jnp.zeros(params[p].shape, jnp.float32)
                                         for p in self.kernels}),
            "ref_e": masks_lib.nest(ref_e),
            "pruned_signal": per_kernel(jnp.zeros((), jnp.float32)),
            "reference_step": jnp.full((), -1, jnp.int32),
            "pruned_signal_step": jnp.full((), -1, jnp.int32),
        }

    def update(self, burden: PyTree, inputs: BurdenInput
               ) -> tuple[PyTree, dict[str, jax.Array]]:
        """The new burden state and this step's metrics (``burden/...``), inside jit."""
        flat_stats = masks_lib.flatten(inputs.stats)
        e = {p: _stat(flat_stats, p, STAT) for p in self.kernels}
        capture = (inputs.step == 0) | (inputs.step == self.reference_step)
        reference = {name: masks_lib.flatten(burden[name]) for name in REFERENCE_ENTRIES}
        sums = kernel_sums(self.kernels, e, masks_lib.flatten(inputs.params),
                           masks_lib.flatten(inputs.masks), masks_lib.flatten(inputs.grads),
                           reference, inputs.step == 0, capture)
        ref_load, ref_rms, ref_at = self._capture_reference(burden, inputs.step, capture, sums)
        signal, signal_at = self._pruned_signal(burden, inputs)
        per_kernel = _kernel_metrics(sums, ref_load, ref_rms)
        per_kernel["pruned_signal"] = signal
        metrics = self._group_metrics(per_kernel, e)
        metrics[f"{PREFIX}/reference_step"] = ref_at
        metrics[f"{PREFIX}/pruned_signal_step"] = signal_at
        new_burden = dict(burden)
        new_burden.update(ref_load=masks_lib.nest(ref_load), ref_rms=masks_lib.nest(ref_rms),
                          ref_abs_w=masks_lib.nest(sums.ref_abs_w),
                          ref_abs_g=masks_lib.nest(sums.ref_abs_g),
                          ref_e=masks_lib.nest(sums.ref_e),
                          pruned_signal=masks_lib.nest(signal), reference_step=ref_at,
                          pruned_signal_step=signal_at)
        return new_burden, metrics

    def _capture_reference(self, burden: PyTree, step: jax.Array, capture: jax.Array,
                           sums: KernelSums
                           ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
        """The reference ``load`` and kept rms per kernel, and their step, after this step.

        Captured where ``capture``: at step 0 and at the reference step. The candidates are
        computed every step (in the grouped sums) and kept only at a capture step: a select,
        where a lax.cond would cost a host round trip per step on a GPU (XLA reads a
        conditional's predicate on the host).
        """
        held_load = masks_lib.flatten(burden["ref_load"])
        held_rms = masks_lib.flatten(burden["ref_rms"])
        ref_load = {p: jnp.where(capture, sums.reference_load[p], held_load[p])
                    for p in self.kernels}
        ref_rms = {p: jnp.where(capture, sums.weight_rms[p], held_rms[p]) for p in self.kernels}
        return ref_load, ref_rms, jnp.where(capture, step, burden["reference_step"])

    def _pruned_signal(self, burden: PyTree, inputs: BurdenInput
                       ) -> tuple[dict[str, jax.Array], jax.Array]:
        """``pruned_signal`` per kernel and the step it was measured at.

        Measured by the probe pass (under ``lax.cond``) on a mask-update step and, for a
        persistent method, every ``every`` steps, with the params before the mask update and
        the new masks; held from the burden state on every other step.
        """
        periodic = ((inputs.step % self.every == 0) if self.persistent
                    else jnp.zeros((), bool))
        measure = inputs.mask_updated | periodic
        held = masks_lib.flatten(burden["pruned_signal"])
        probe_sums = self._probe_sums()

        def probe(_):
            sq = probe_sums(inputs.updated_params, inputs.new_masks, inputs.images)
            return {p: pruned_signal(*sq[p]) for p in self.kernels}

        signal = lax.cond(measure, probe, lambda _: held, None)
        return signal, jnp.where(measure, inputs.step, burden["pruned_signal_step"])

    def _probe_sums(self) -> Any:
        """``(params, masks, images) -> {kernel: (pruned_sq, dense_sq)}``: the probe pass."""

        def sums(params, masks, images):
            _, aux = self.probe.apply({"params": params, "masks": masks}, images,
                                      mutable=["stats"])
            sown = masks_lib.flatten(aux["stats"])
            return {p: (_stat(sown, p, PRUNED_SQ), _stat(sown, p, DENSE_SQ))
                    for p in self.kernels}

        if self.grad_reduce == "flat":
            return collectives.shard_batch_sums(sums, self.mesh)
        return sums

    def _group_metrics(self, per_kernel: Mapping[str, Mapping[str, jax.Array]],
                       e: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per group: the mean of each per-kernel metric and the unit fractions; the indexes
        (:data:`INDEXES`)."""
        metrics: dict[str, jax.Array] = {}
        for group, paths in self.groups.items():
            for name, values in per_kernel.items():
                metrics[f"{PREFIX}/{name}/{group}"] = _mean([values[p] for p in paths])
            for family, module in (("", "fc2"), ("attn_", "attn/out")):
                path = f"{group}/{module}/kernel"
                if path in e:
                    metrics[f"{PREFIX}/{family}overload_frac/{group}"] = overload_frac(
                        e[path], self.kappa)
                    metrics[f"{PREFIX}/{family}dormant_frac/{group}"] = dormant_frac(
                        e[path], self.tau)
        blocks = self.blocks
        for name, index in INDEXES.items() if blocks else ():
            metrics[f"{PREFIX}/{index}"] = burden_index(
                [metrics[f"{PREFIX}/{name}/{block}"] for block in blocks])
        return metrics


def _kernel_metrics(sums: KernelSums, ref_load: Mapping[str, jax.Array],
                    ref_rms: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """Per metric name, the per-kernel values of the step's metrics from its sums."""
    return {
        "load": {p: load(v, ref_load[p]) for p, v in sums.load_numerator.items()},
        "kept_weight_rms": {p: kept_weight_rms(v, ref_rms[p])
                            for p, v in sums.weight_rms.items()},
        "kept_grad_rms": sums.grad_rms,
        "selection": {p: selection(v, ref_load[p])
                      for p, v in sums.selection_numerator.items()},
        "compensation": {p: compensation(sums.load_numerator[p], v)
                         for p, v in sums.selection_numerator.items()},
        "compensation_rms": {p: compensation_rms(sums.weight_rms[p], v)
                             for p, v in sums.reference_weight_rms.items()},
        "compensation_grad": {p: compensation_grad(sums.grad_rms[p], v)
                              for p, v in sums.reference_grad_rms.items()},
    }


def make_tracker(config: ml_collections.ConfigDict, model: nn.Module, pruner: Pruner,
                 image_shape: tuple[int, ...], grad_reduce: str = "compiler",
                 mesh: Any = None) -> BurdenTracker:
    """The tracker of ``config.burden`` for ``model`` (built with ``collect_stats``).

    ``grad_reduce`` and ``mesh``: those of the train step (``'flat'``: the probe pass's
    per-layer sums cross the batch shards of ``mesh`` as one flat buffer, as the step's
    gradient does; see :mod:`nbjax.parallel.collectives`).
    """
    collectives.check_grad_reduce(grad_reduce, mesh)
    if not getattr(model, "collect_stats", False):
        raise ValueError("the burden tracker needs a model built with collect_stats=True "
                         "(config.burden.enabled)")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *image_shape), jnp.float32))
    sown = {p[: -len(STAT)] + "kernel": v for p, v in
            masks_lib.flatten(shapes.get("stats", {})).items() if p.endswith("/" + STAT)}
    kernels = tuple(sorted(sown))
    if not kernels:
        raise ValueError("the model sows no per-feature statistics: nothing to track")
    b = config.burden
    return BurdenTracker(
        kernels=kernels,
        in_ndims=tuple(len((v[-1] if isinstance(v, tuple) else v).shape)
                       for v in (sown[p] for p in kernels)),
        probe=model.clone(collect_stats=False, measure_pruned=True),
        persistent=bool(pruner.persistent),
        reference_step=reference_step(pruner),
        every=int(b.every), kappa=float(b.kappa), tau=float(b.tau),
        grad_reduce=grad_reduce, mesh=mesh if grad_reduce == "flat" else None,
    )
