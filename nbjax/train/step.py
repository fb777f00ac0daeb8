"""The train state, the compiled train and eval steps, and the train loop.

The state is one pytree (:class:`TrainState`). The train step is a pure function of the state,
the on-device dataset and a block of batch indices; it is compiled once with ``jax.jit``,
donates the state, and runs ``train.steps_per_call`` steps per call with ``lax.scan`` so the
host dispatches rarely. Nothing inside it waits for the host. The loop around it (data order,
logging, evaluation, checkpoints) lives in :mod:`nbjax.train.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nbjax.data import pipeline as data
from nbjax.model import vit as model_lib
from nbjax.parallel import mesh as sharding_lib
from nbjax.pruning import PruneContext, Pruner
from nbjax.pruning import masks as masks_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: jit, sharding and checkpoints see one pytree."""

    step: jax.Array  # int32 scalar: steps taken so far
    params: PyTree  # dense weights (pruned entries are zero unless the method is persistent)
    masks: PyTree  # bool, only the prunable kernels, nested like params
    opt_state: PyTree
    pruning: PyTree  # the pruning method's state
    burden: PyTree  # the burden tracker's state (reference values), {} when disabled
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs no extra state


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; weight decay on kernels only."""
    t = config.train
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=t.learning_rate * t.end_lr_factor)

    def decay_mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    parts = []
    if t.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The schedule inside :func:`make_optimizer`, for logging."""
    t = config.train
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, warmup, max(total_steps, warmup + 1),
        t.learning_rate * t.end_lr_factor)


def init_state(model: nn.Module, tx: optax.GradientTransformation, pruner: Pruner,
               image_shape: tuple[int, ...], seed: int,
               burden_init: Callable[[PyTree, PyTree], PyTree] | None = None) -> TrainState:
    """A fresh state: params, masks from the pruner, zeroed pruned weights, optimizer state.

    ``burden_init(dense_params, masks)`` sees the params *before* the pruned weights are
    zeroed (the burden reference of a method that starts sparse is the dense layer).
    """
    rng = jax.random.PRNGKey(seed)
    init_rng, mask_rng, step_rng = jax.random.split(rng, 3)
    params = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    masks, pruning_state = pruner.init(params, mask_rng)
    dense_params = params
    if not pruner.persistent:
        params = masks_lib.apply_masks(params, masks)
    burden = burden_init(dense_params, masks) if burden_init is not None else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, masks=masks,
                      opt_state=tx.init(params), pruning=pruning_state, burden=burden,
                      rng=step_rng)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


BurdenFn = Callable[..., tuple[PyTree, dict[str, jax.Array]]]


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, pruner: Pruner, num_classes: int,
                    mean: tuple[float, ...], std: tuple[float, ...],
                    burden_fn: BurdenFn | None = None,
                    lr_fn: optax.Schedule | None = None,
                    flat_mesh: Any = None) -> Callable:
    """One train step ``(state, images_u8, labels, idx[B]) -> (state, metrics)``, not jitted.

    ``burden_fn(state_before, state_after, grads, stats, *, images, pre_prune_params,
    prune_metrics)`` returns the new burden state and its metrics; it runs after the pruning
    update so it sees this step's masks before and after. ``images`` is the step's batch as
    the model saw it, ``pre_prune_params`` the params after the optimizer update and before
    the mask update (the weights a non-persistent update is about to zero still hold their
    values), ``prune_metrics`` the pruning method's metrics of the step
    (:class:`nbjax.burden.tracker.BurdenTracker`).

    ``flat_mesh``: the loss and gradient are computed per batch shard of this mesh and summed
    as one flat buffer (:func:`sharded_loss_and_grad`; ``loop.build`` passes the run's mesh
    where :func:`nbjax.parallel.mesh.flat_grad_reduce` says so); None: the step is written as for
    one device and the compiler partitions it.
    """
    augment_kind, pad, pad_mode = (config.data.augment, config.data.augment_pad,
                                   config.data.augment_pad_mode)
    smoothing = config.train.label_smoothing

    def loss_fn(params, masks, images, labels):
        logits, aux = model.apply({"params": params, "masks": masks}, images, mutable=["stats"])
        loss = cross_entropy(logits, labels, num_classes, smoothing)
        return loss, (logits, aux.get("stats", {}))

    loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if flat_mesh is not None:
        loss_and_grad = sharded_loss_and_grad(loss_and_grad, flat_mesh)

    def step(state: TrainState, images_u8: jax.Array, labels_all: jax.Array, idx: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, prune_rng = jax.random.split(rng)
        images = data.normalize(images_u8[idx], mean, std)
        images = data.augment(images, aug_rng, augment_kind, pad, pad_mode)
        labels = labels_all[idx]
        (loss, (logits, stats)), grads = loss_and_grad(state.params, state.masks, images,
                                                       labels)
        # The model's masks are straight-through, so ``grads`` is the dense gradient (RigL
        # regrows by it); a non-persistent method updates only the kept weights.
        update_grads = grads if pruner.persistent else masks_lib.apply_masks(grads, state.masks)
        updates, opt_state = tx.update(update_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if not pruner.persistent:
            params = masks_lib.apply_masks(params, state.masks)
        ctx = pruner.update(PruneContext(step=state.step, params=params, masks=state.masks,
                                         opt_state=opt_state, pruning_state=state.pruning,
                                         grads=grads, rng=prune_rng))
        new_state = state.replace(step=state.step + 1, params=ctx.params, masks=ctx.masks,
                                  opt_state=ctx.opt_state, pruning=ctx.pruning_state)
        metrics = {
            "train/loss": loss,
            "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "train/grad_norm": optax.tree.norm(grads),
        }
        if lr_fn is not None:
            metrics["train/learning_rate"] = lr_fn(state.step)
        metrics.update(ctx.metrics)
        # Token merging: tokens per block and token sizes (sown when the model merges).
        metrics.update(model_lib.token_metrics(stats))
        if burden_fn is not None:
            burden_state, burden_metrics = burden_fn(
                state, new_state, grads, stats, images=images, pre_prune_params=params,
                prune_metrics=ctx.metrics)
            new_state = new_state.replace(burden=burden_state)
            metrics.update(burden_metrics)
        return new_state, metrics

    return step


def sharded_loss_and_grad(loss_and_grad: Callable, mesh: Any) -> Callable:
    """``loss_and_grad`` run per batch shard, its results combined with one flat all-reduce.

    ``loss_and_grad(params, masks, images, labels) -> ((loss, (logits, stats)), grads)`` with
    a mean loss. Each device computes it on its rows of the batch; the loss, the gradient and
    the model's per-feature statistics (all means over the batch) are averaged over the shards
    in one :func:`nbjax.parallel.mesh.flat_psum`, the ``MAX_STATS`` by ``pmax``; the logits stay
    split over the batch. The shards are equal, so the result is the global-batch value, as
    the compiler's partitioning of the same step computes it (only the order of the
    floating-point sums differs). It draws no random numbers (the model has no dropout, and
    augmentation runs before, on the global batch); a model that did would need a key per
    shard here.
    """
    axis = sharding_lib.DATA_AXIS
    shards = mesh.shape[axis]

    def local(params, masks, images, labels):
        (loss, (logits, stats)), grads = loss_and_grad(params, masks, images, labels)
        flat = masks_lib.flatten(stats)
        maxes = {k: v for k, v in flat.items() if k.split("/")[-1] in model_lib.MAX_STATS}
        means = {k: v for k, v in flat.items() if k not in maxes}
        loss, grads, means = jax.tree.map(lambda x: x / shards,
                                          sharding_lib.flat_psum((loss, grads, means), axis))
        maxes = jax.lax.pmax(maxes, axis)
        return (loss, (logits, masks_lib.nest({**means, **maxes}))), grads

    batch = jax.sharding.PartitionSpec(axis)
    whole = jax.sharding.PartitionSpec()
    # check_vma off: with it, JAX would transpose the replicated params' broadcast into a psum
    # per gradient leaf, the very all-reduces this function replaces.
    return jax.shard_map(local, mesh=mesh, in_specs=(whole, whole, batch, batch),
                         out_specs=((whole, (batch, whole)), whole), check_vma=False)


def make_multi_step(step: Callable) -> Callable:
    """``(state, images, labels, idx[k, B]) -> (state, metrics[k])``: k steps in one scan.

    Inside the loop each step's metrics (a hundred scalars with burden metrics on) travel as
    one vector per dtype, so the scan writes one output per dtype per step instead of one
    per metric: on a CPU each of those small writes is an operation with a fixed cost. The
    dict is rebuilt once per call, with the same values.
    """

    def multi_step(state, images_u8, labels, idx_block):
        layout: list[tuple[str, jnp.dtype, int, int, tuple[int, ...]]] = []

        def body(carry, idx):
            carry, metrics = step(carry, images_u8, labels, idx)
            layout.clear()
            parts: dict[Any, list[jax.Array]] = {}
            sizes: dict[Any, int] = {}
            for key in sorted(metrics):
                value = jnp.asarray(metrics[key])
                offset = sizes.get(value.dtype, 0)
                layout.append((key, value.dtype, offset, value.size, value.shape))
                parts.setdefault(value.dtype, []).append(value.ravel())
                sizes[value.dtype] = offset + value.size
            return carry, {str(d): jnp.concatenate(v) for d, v in parts.items()}

        state, packed = jax.lax.scan(body, state, idx_block)
        k = idx_block.shape[0]
        metrics = {key: packed[str(dtype)][:, offset:offset + size].reshape((k, *shape))
                   for key, dtype, offset, size, shape in layout}
        return state, metrics

    return multi_step


def make_eval_step(model: nn.Module, num_classes: int, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> Callable:
    """``(params, masks, images_u8, labels, idx, valid) -> sums``: correct, loss and count.

    ``valid`` (0/1 per row) lets the last, padded batch count each example exactly once.
    """

    def eval_step(params, masks, images_u8, labels_all, idx, valid):
        images = data.normalize(images_u8[idx], mean, std)
        labels = labels_all[idx]
        logits = model.apply({"params": params, "masks": masks}, images)
        losses = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        valid = valid.astype(jnp.float32)
        return {"correct": jnp.sum(correct * valid), "loss": jnp.sum(losses * valid),
                "count": jnp.sum(valid)}

    return eval_step
