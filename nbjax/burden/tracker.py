"""The burden tracker: the burden state and the function the train step calls every step.

:func:`make_tracker` builds a :class:`BurdenTracker` for a config and model. Its ``init``
makes the burden state (the reference values, held per kernel) and calling it inside the
jitted step computes that step's ``burden/...`` metrics from the metric functions of
:mod:`nbjax.burden.metrics` (what each metric means, and which network a step's metrics describe,
is documented there and in docs/burden.md).
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
    MASK_UPDATED,
    PREFIX,
    PRUNED_SQ,
    STAT,
    TINY,
    burden_index,
    dormant_frac,
    kept_abs_sums,
    kept_grad_rms,
    kept_rms,
    load_numerator,
    overload_frac,
    pruned_signal_from_sums,
    reference_load,
    reference_step,
)
from nbjax.parallel import mesh as sharding_lib
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import Pruner

PyTree = Any


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
    """The burden state's init and the function the train step calls after each update.

    ``kernels``: the paths of every MaskedLinear kernel (those whose layer sows ``STAT``);
    a kernel with no mask counts as all kept. ``probe``: the model with ``measure_pruned``
    (and no ``collect_stats``), for the ``pruned_signal`` pass.
    """

    kernels: tuple[str, ...]
    in_ndims: tuple[int, ...]  # input axes of each kernel (the rank of its sown e_j)
    probe: nn.Module
    persistent: bool
    reference_step: int
    every: int
    kappa: float
    tau: float
    flat_mesh: Any = None  # set: the probe pass runs per batch shard, its sums as one buffer

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
        and the held ``pruned_signal``; plus the steps of the reference and the last
        ``pruned_signal`` measurement.
        """
        params = masks_lib.flatten(dense_params)
        flat_masks = masks_lib.flatten(masks)
        nan = jnp.full((), jnp.nan, jnp.float32)
        init_pruned = {}
        for p, in_ndim in zip(self.kernels, self.in_ndims, strict=True):
            w, m = params[p], flat_masks.get(p)
            colsum = jnp.zeros(w.shape[:in_ndim], jnp.float32)
            if m is not None and not self.persistent:
                pruned = jnp.where(m, 0.0, jnp.abs(w.astype(jnp.float32)))
                colsum = jnp.sum(pruned, axis=tuple(range(in_ndim, w.ndim)))
            init_pruned[p] = colsum
        per_kernel = lambda value: masks_lib.nest({p: value for p in self.kernels})
        return {
            "ref_load": per_kernel(nan),
            "ref_rms": per_kernel(nan),
            "init_pruned_abs_colsum": masks_lib.nest(init_pruned),
            "pruned_signal": per_kernel(jnp.zeros((), jnp.float32)),
            "reference_step": jnp.full((), -1, jnp.int32),
            "pruned_signal_step": jnp.full((), -1, jnp.int32),
        }

    def __call__(self, state_before: Any, state_after: Any, grads: PyTree, stats: PyTree, *,
                 images: jax.Array, pre_prune_params: PyTree,
                 prune_metrics: Mapping[str, jax.Array] | None = None,
                 ) -> tuple[PyTree, dict[str, jax.Array]]:
        """The new burden state and this step's metrics (``burden/...``), inside jit.

        ``state_before``/``state_after``: the train state before and after the step;
        ``grads``: the dense gradient; ``stats``: the model's ``'stats'`` collection;
        ``images``: the step's (augmented, normalised) batch; ``pre_prune_params``: the
        params after the optimizer update, before the mask update touched them.
        """
        b = state_before.burden
        step = state_before.step
        params = masks_lib.flatten(state_before.params)
        masks = masks_lib.flatten(state_before.masks)
        flat_grads = masks_lib.flatten(grads)
        flat_stats = masks_lib.flatten(stats)
        ref_load = masks_lib.flatten(b["ref_load"])
        ref_rms = masks_lib.flatten(b["ref_rms"])
        init_pruned = masks_lib.flatten(b["init_pruned_abs_colsum"])

        # Reference capture: at step 0 and at the reference step (scalars per kernel).
        capture = (step == 0) | (step == self.reference_step)
        e = {p: _stat(flat_stats, p, STAT) for p in self.kernels}
        # The reference candidates are computed every step, in the same grouped pass as the
        # metrics, and kept only at a capture step: a select, where a lax.cond would cost a
        # host round trip per step on a GPU (XLA reads a conditional's predicate on the host).
        load_num, new_ref_load, w_rms, g_rms = _kernel_sums(
            self.kernels, e, params, masks, flat_grads, init_pruned, step == 0)
        ref_load = {p: jnp.where(capture, new_ref_load[p], ref_load[p]) for p in self.kernels}
        ref_rms = {p: jnp.where(capture, w_rms[p], ref_rms[p]) for p in self.kernels}
        ref_at = jnp.where(capture, step, b["reference_step"])

        # Every-step metrics, per kernel, then per block.
        per: dict[str, dict[str, jax.Array]] = {"load": {}, "kept_weight_rms": {},
                                                 "kept_grad_rms": {}}
        for p in self.kernels:  # load() and kept_weight_rms(), from the grouped sums
            per["load"][p] = load_num[p] / ref_load[p]
            per["kept_weight_rms"][p] = w_rms[p] / jnp.maximum(ref_rms[p], TINY)
            per["kept_grad_rms"][p] = g_rms[p]

        # pruned_signal: the probe pass, only on the steps that measure it. A mask update is
        # a step where the method says so (``pruning/mask_updated``, which every method of
        # nbjax.pruning logs) or where any mask flipped (a method without the flag).
        flag = (prune_metrics or {}).get(MASK_UPDATED)
        # The flag is exact for nbjax's methods; comparing every mask is the fallback (it
        # reads all masks each step, a cost the default step need not pay).
        updated = (flag > 0 if flag is not None
                   else _any_flipped(masks, masks_lib.flatten(state_after.masks)))
        periodic = (step % self.every == 0) if self.persistent else jnp.zeros((), bool)
        measure = updated | periodic
        held = masks_lib.flatten(b["pruned_signal"])

        def sums(params, masks, images):
            _, aux = self.probe.apply({"params": params, "masks": masks}, images,
                                      mutable=["stats"])
            sown = masks_lib.flatten(aux["stats"])
            return {p: (_stat(sown, p, PRUNED_SQ), _stat(sown, p, DENSE_SQ))
                    for p in self.kernels}

        if self.flat_mesh is not None:  # as the step's gradient (flat_grad_reduce)
            sums = sharding_lib.shard_batch_sums(sums, self.flat_mesh)

        def probe(_):
            sq = sums(pre_prune_params, state_after.masks, images)
            return {p: pruned_signal_from_sums(*sq[p]) for p in self.kernels}

        signal = lax.cond(measure, probe, lambda _: held, None)
        signal_at = jnp.where(measure, step, b["pruned_signal_step"])
        per["pruned_signal"] = signal

        metrics: dict[str, jax.Array] = {}
        block_loads = []
        for group, paths in self.groups.items():
            for name, values in per.items():
                metrics[f"{PREFIX}/{name}/{group}"] = _mean([values[p] for p in paths])
            if group.startswith("block_"):
                block_loads.append(metrics[f"{PREFIX}/load/{group}"])
            for family, module in (("", "fc2"), ("attn_", "attn/out")):
                path = f"{group}/{module}/kernel"
                if path in e:
                    metrics[f"{PREFIX}/{family}overload_frac/{group}"] = overload_frac(
                        e[path], self.kappa)
                    metrics[f"{PREFIX}/{family}dormant_frac/{group}"] = dormant_frac(
                        e[path], self.tau)
        if block_loads:
            metrics[f"{PREFIX}/index"] = burden_index(block_loads)
        metrics[f"{PREFIX}/reference_step"] = ref_at
        metrics[f"{PREFIX}/pruned_signal_step"] = signal_at

        new_burden = dict(b)
        new_burden.update(ref_load=masks_lib.nest(ref_load), ref_rms=masks_lib.nest(ref_rms),
                          pruned_signal=masks_lib.nest(signal), reference_step=ref_at,
                          pruned_signal_step=signal_at)
        return new_burden, metrics


def _kernel_sums(kernels: Sequence[str], e: Mapping[str, jax.Array],
                 params: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                 grads: Mapping[str, jax.Array], init_pruned: Mapping[str, jax.Array],
                 first_step: jax.Array) -> tuple[dict[str, jax.Array], ...]:
    """Per kernel: :func:`load_numerator`, the :func:`reference_load` this step would capture,
    :func:`kept_rms` of W and :func:`kept_grad_rms`, each computed once per group of
    same-shape kernels.

    q/k/v, out, fc1 and fc2 repeat in every block, so each group is stacked with the kernel as
    a leading axis and the metric functions are vmapped over it: a few operations per group
    instead of per kernel. The every-step metrics are tiny, so their cost on a CPU is the
    number of operations, not arithmetic (docs/performance.md). The numerator and the
    reference share one Σ_j e_j Σ_i M|W|, so ``load`` is exactly 1 at the reference step of a
    dense layer. ``init_pruned`` (the dense initial weights a sparse start zeroed) counts in
    the reference only where ``first_step``.
    """
    groups: dict[tuple, list[str]] = {}
    for p in kernels:
        key = (params[p].shape, params[p].dtype, e[p].shape, p in masks)
        groups.setdefault(key, []).append(p)

    def sums(e_j, w, g, extra, m=None):
        kept = kept_abs_sums(e_j, w, m)
        extra = jnp.where(first_step, extra, 0.0)
        return (load_numerator(e_j, w, m, kept), reference_load(e_j, w, m, extra, kept),
                kept_rms(w, m), kept_grad_rms(g, m))

    out: tuple[dict[str, jax.Array], ...] = ({}, {}, {}, {})
    for (*_, masked), paths in groups.items():
        trees = (e, params, grads, init_pruned) + ((masks,) if masked else ())
        values = jax.vmap(sums)(*[jnp.stack([tree[p] for p in paths]) for tree in trees])
        for i, p in enumerate(paths):
            for target, value in zip(out, values, strict=True):
                target[p] = value[i]
    return out


def _any_flipped(before: Mapping[str, Any], after: Mapping[str, Any]) -> jax.Array:
    """Whether any entry of any mask differs between two flat mask dicts."""
    changed = jnp.zeros((), bool)
    for p, m in before.items():
        if m is not None and after.get(p) is not None:
            changed = changed | jnp.any(m != after[p])
    return changed


def make_tracker(config: ml_collections.ConfigDict, model: nn.Module, pruner: Pruner,
                 image_shape: tuple[int, ...],
                 flat_mesh: Any = None) -> BurdenTracker:
    """The tracker of ``config.burden`` for ``model`` (built with ``collect_stats``).

    ``flat_mesh``: the mesh the step sums its gradient over as one flat buffer (see
    :func:`nbjax.train.step.make_train_step`); the probe pass's per-layer sums then cross its
    batch shards as one flat buffer too.
    """
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
        flat_mesh=flat_mesh,
    )
