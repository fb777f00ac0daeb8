"""How the train step's batch sums cross the devices: the compiler's all-reduces, or flat ones.

``sharding.grad_reduce`` picks one of two ways (:func:`grad_reduce_mode`). ``'compiler'``: the
step is written as for one device and XLA partitions it, inserting its own all-reduces (one
tuple operand per param). ``'flat'``: the step computes each batch shard's gradient in a
``shard_map`` (:func:`sharded_loss_and_grad`) and adds the shards with one all-reduce of one
concatenated buffer per dtype (:func:`flat_psum`); the burden probe pass's sums cross the same
way (:func:`shard_batch_sums`). Why flat on a CPU host: docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nbjax.parallel.mesh import DATA_AXIS

GRAD_REDUCE_MODES = ("auto", "flat", "compiler")


def grad_reduce_mode(config: ml_collections.ConfigDict, mesh: Mesh) -> str:
    """``'flat'`` or ``'compiler'``: how the train step of ``config`` on ``mesh`` adds its shards.

    ``config.sharding.grad_reduce`` is ``'compiler'``, ``'flat'``, or ``'auto'``: flat on a CPU
    mesh of several devices (XLA:CPU's in-process all-reduce pays a fixed cost per operand,
    and the gradient has one per param), the compiler's elsewhere (GPU and TPU all-reduces
    are not per-operand bound, and XLA overlaps them with the backward pass). Only the
    replicated state mode takes the flat path: FSDP's gradients are reduce-scattered by the
    compiler ('flat' with FSDP is an error, 'auto' falls back). One device: 'compiler'.
    """
    mode = config.sharding.grad_reduce
    if mode not in GRAD_REDUCE_MODES:
        raise ValueError(f"sharding.grad_reduce={mode!r}; allowed: {list(GRAD_REDUCE_MODES)}")
    if mode == "flat" and config.sharding.mode != "replicated":
        raise ValueError("sharding.grad_reduce='flat' needs sharding.mode='replicated' (FSDP's "
                         "gradients are reduce-scattered by the compiler); use 'auto'")
    if mode == "compiler" or mesh.devices.size == 1 or config.sharding.mode != "replicated":
        return "compiler"
    if mode == "flat" or mesh.devices.flat[0].platform == "cpu":
        return "flat"
    return "compiler"


def check_grad_reduce(grad_reduce: str, mesh: Mesh | None) -> None:
    """Raises ``ValueError`` unless ``grad_reduce`` is a resolved mode, with a mesh if flat."""
    if grad_reduce not in ("flat", "compiler"):
        raise ValueError(f"grad_reduce={grad_reduce!r}; allowed: 'flat', 'compiler' "
                         "(see grad_reduce_mode)")
    if grad_reduce == "flat" and mesh is None:
        raise ValueError("grad_reduce='flat' needs the mesh whose batch shards it adds")


def flat_psum(tree: Any, axis_name: str = DATA_AXIS) -> Any:
    """``lax.psum`` of every leaf of ``tree`` over ``axis_name`` as one all-reduce per dtype.

    The leaves of a dtype are raveled into one buffer, summed, and split back, so the
    collective has one operand however many leaves there are. Inside ``shard_map`` only.
    """
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(x) for x in leaves]
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        by_dtype.setdefault(x.dtype, []).append(i)
    out = list(leaves)
    for indices in by_dtype.values():
        flat = jax.lax.psum(jnp.concatenate([leaves[i].ravel() for i in indices]), axis_name)
        offset = 0
        for i in indices:
            size = leaves[i].size
            out[i] = flat[offset:offset + size].reshape(leaves[i].shape)
            offset += size
    return jax.tree.unflatten(treedef, out)


def shard_batch_sums(fn: Callable, mesh: Mesh) -> Callable:
    """``fn(params, masks, images)`` -> a pytree of sums over the batch, run per batch shard.

    Each device applies ``fn`` to its rows of ``images`` (params and masks replicated) and the
    shards' sums are added with one :func:`flat_psum`: the same values as ``fn`` on the global
    batch, with one all-reduce operand per dtype instead of one per leaf.
    """
    whole, batch = P(), P(DATA_AXIS)
    return jax.shard_map(lambda *args: flat_psum(fn(*args)), mesh=mesh,
                         in_specs=(whole, whole, batch), out_specs=whole, check_vma=False)


def sharded_loss_and_grad(loss_and_grad: Callable, mesh: Mesh,
                          max_stats: Collection[str] = ()) -> Callable:
    """``loss_and_grad`` run per batch shard, its results combined with one flat all-reduce.

    ``loss_and_grad(params, masks, images, labels) -> ((loss, (logits, stats)), grads)`` with
    a mean loss. Each device computes it on its rows of the batch; the loss, the gradient and
    the model's sown statistics (means over the batch) are averaged over the shards in one
    :func:`flat_psum`, except the statistics named in ``max_stats`` (maxima over the batch),
    combined by ``pmax``; the logits stay split over the batch. The shards are equal, so the
    result is the global-batch value, as the compiler's partitioning of the same step computes
    it (only the order of the floating-point sums differs). It draws no random numbers (the
    model has no dropout, and augmentation runs before, on the global batch); a model that did
    would need a key per shard here.
    """
    shards = mesh.shape[DATA_AXIS]

    def local(params, masks, images, labels):
        (loss, (logits, stats)), grads = loss_and_grad(params, masks, images, labels)
        means, maxes, rebuild = _partition(stats, max_stats)
        loss, grads, means = jax.tree.map(lambda x: x / shards,
                                          flat_psum((loss, grads, means), DATA_AXIS))
        maxes = jax.lax.pmax(maxes, DATA_AXIS)
        return (loss, (logits, rebuild(means, maxes))), grads

    batch, whole = P(DATA_AXIS), P()
    # check_vma off: with it, JAX would transpose the replicated params' broadcast into a psum
    # per gradient leaf, the very all-reduces this function replaces.
    return jax.shard_map(local, mesh=mesh, in_specs=(whole, whole, batch, batch),
                         out_specs=((whole, (batch, whole)), whole), check_vma=False)


def _partition(stats: Any, names: Collection[str]) -> tuple[list, list, Callable]:
    """The leaves of ``stats`` sown under a name not in ``names``, those under one, and the
    function that puts two such lists back into the structure of ``stats``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(stats)
    picked = [_sown_name(path) in names for path, _ in leaves]
    rest = [x for (_, x), chosen in zip(leaves, picked, strict=True) if not chosen]
    named = [x for (_, x), chosen in zip(leaves, picked, strict=True) if chosen]

    def rebuild(rest: list, named: list) -> Any:
        rest_it, named_it = iter(rest), iter(named)
        return jax.tree.unflatten(treedef, [next(named_it) if chosen else next(rest_it)
                                            for chosen in picked])

    return rest, named, rebuild


def _sown_name(path: tuple) -> str | None:
    """The name a layer sowed a value under: the last dict key of its key path."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else None
