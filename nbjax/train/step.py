"""The compiled train and eval steps: pure functions of the state and the on-device data.

:func:`make_train_step` builds one train step (batch, forward and backward, optimizer update,
the pruning method's update, the burden tracker's update); :func:`make_train_call` runs
``train.steps_per_call`` of them in one ``lax.scan``, the function the loop compiles once
with ``jax.jit``, donating the state, so the host dispatches rarely. Nothing inside waits for
the host. The state is :mod:`nbjax.train.state`, the optimizer :mod:`nbjax.train.optimizer`,
and the loop around the call (data order, logging, evaluation, checkpoints)
:mod:`nbjax.train.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nbjax.burden.tracker import BurdenInput, BurdenTracker
from nbjax.data import mix as mix_lib
from nbjax.data import pipeline as data
from nbjax.model.token_stats import token_metrics
from nbjax.model.vit import MAX_STATS
from nbjax.parallel import collectives
from nbjax.pruning import PruneContext, Pruner
from nbjax.pruning import masks as masks_lib
from nbjax.train import optimizer as optimizer_lib

# Kept importable from here for the callers that predate the split into state and optimizer.
from nbjax.train.state import TrainState

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
    return soft_cross_entropy(logits, jax.nn.one_hot(labels, num_classes), label_smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) targets [B, K], e.g. mixed
    one-hot labels (smoothing is linear, so smoothing mixed targets = mixing smoothed ones)."""
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, pruner: Pruner,
                    num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                    total_steps: int, tracker: BurdenTracker | None = None,
                    grad_reduce: str = "compiler", mesh: Any = None) -> Callable:
    """One train step ``(state, images_u8, labels, idx[B]) -> (state, metrics)``, not jitted.

    The optimizer (:func:`nbjax.train.optimizer.make_optimizer` for a run of ``total_steps``)
    and the pruner read the per-member values of ``state.hparams``, so ``jax.vmap`` of this
    step trains a population (nbjax.population). ``tracker``: the burden tracker, updated
    after the pruning update with the step's :class:`~nbjax.burden.tracker.BurdenInput`
    (None: no burden metrics). ``grad_reduce``: ``'flat'`` computes the
    loss and gradient per batch shard of ``mesh`` and adds the shards as one flat buffer;
    ``'compiler'`` writes the step as for one device and the compiler partitions it
    (:func:`nbjax.parallel.collectives.grad_reduce_mode` chooses).
    """
    collectives.check_grad_reduce(grad_reduce, mesh)
    batch_of = _batch_fn(config, mean, std, num_classes)
    loss_and_grad = _loss_and_grad_fn(model, config.train.label_smoothing, grad_reduce, mesh)

    def step(state: TrainState, images_u8: jax.Array, labels_all: jax.Array, idx: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, prune_rng = jax.random.split(rng)
        images, labels, targets = batch_of(images_u8, labels_all, idx, aug_rng,
                                           state.hparams["mix_alpha"])
        (loss, (logits, stats)), grads = loss_and_grad(state.params, state.masks, images,
                                                       targets)
        tx = optimizer_lib.make_optimizer(config, total_steps, state.hparams)
        params, opt_state = _optimizer_update(tx, pruner.persistent, state, grads)
        pruned = pruner.update(PruneContext(step=state.step, params=params, masks=state.masks,
                                            opt_state=opt_state, pruning_state=state.pruning,
                                            grads=grads, rng=prune_rng, hparams=state.hparams))
        new_state = state.replace(step=state.step + 1, params=pruned.params, masks=pruned.masks,
                                  opt_state=pruned.opt_state, pruning=pruned.pruning_state)
        lr = optimizer_lib.learning_rate_schedule(config, total_steps,
                                                  state.hparams["learning_rate"])(state.step)
        metrics = _train_metrics(loss, logits, labels, grads, lr)
        metrics.update(pruned.metrics)
        metrics.update(token_metrics(stats))  # sown only when the model merges tokens
        if tracker is not None:
            burden, burden_metrics = tracker.update(state.burden, BurdenInput(
                step=state.step, params=state.params, masks=state.masks, grads=grads,
                stats=stats, images=images, updated_params=params, new_masks=pruned.masks,
                mask_updated=pruned.mask_updated))
            new_state = new_state.replace(burden=burden)
            metrics.update(burden_metrics)
        return new_state, metrics

    return step


def _batch_fn(config: ml_collections.ConfigDict, mean: tuple[float, ...],
              std: tuple[float, ...], num_classes: int) -> Callable:
    """``(images_u8, labels, idx, rng, mix_alpha) -> (images, labels, targets)``: the step's
    batch, gathered from the on-device dataset, normalised, augmented and mixed
    (``config.data``); ``targets`` [B, K] are the one-hot labels, mixed as the images are."""
    kind, pad, pad_mode = config.data.augment, config.data.augment_pad, config.data.augment_pad_mode

    def batch_of(images_u8, labels_all, idx, rng, mix_alpha):
        images = data.augment(data.normalize(images_u8[idx], mean, std), rng, kind, pad,
                              pad_mode)
        labels = labels_all[idx]
        targets = jax.nn.one_hot(labels, num_classes)
        # A key of its own, so that turning mixing on leaves the crops and flips as they were.
        images, targets = mix_lib.mix(images, targets, jax.random.fold_in(rng, 1),
                                      config.data.mix, mix_alpha)
        return images, labels, targets

    return batch_of


def _loss_and_grad_fn(model: nn.Module, label_smoothing: float, grad_reduce: str,
                      mesh: Any) -> Callable:
    """``(params, masks, images, targets) -> ((loss, (logits, stats)), grads)``.

    ``stats`` is the model's ``'stats'`` collection. The model's masks are straight-through,
    so ``grads`` is the dense gradient (RigL regrows by it).
    """

    def loss_fn(params, masks, images, targets):
        logits, aux = model.apply({"params": params, "masks": masks}, images, mutable=["stats"])
        loss = soft_cross_entropy(logits, targets, label_smoothing)
        return loss, (logits, aux.get("stats", {}))

    loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_reduce == "flat":
        return collectives.sharded_loss_and_grad(loss_and_grad, mesh, max_stats=MAX_STATS)
    return loss_and_grad


def _optimizer_update(tx: optax.GradientTransformation, persistent: bool, state: TrainState,
                      grads: PyTree) -> tuple[PyTree, PyTree]:
    """The params and optimizer state after the optimizer update of the dense ``grads``.

    A non-persistent method updates only the kept weights: its gradient is masked first, and
    its pruned weights are zeroed again after the update (AdamW's decay would move them).
    """
    update_grads = grads if persistent else masks_lib.apply_masks(grads, state.masks)
    updates, opt_state = tx.update(update_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if not persistent:
        params = masks_lib.apply_masks(params, state.masks)
    return params, opt_state


def _train_metrics(loss: jax.Array, logits: jax.Array, labels: jax.Array, grads: PyTree,
                   learning_rate: jax.Array) -> dict[str, jax.Array]:
    """The step's ``train/...`` metrics."""
    return {
        "train/loss": loss,
        "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "train/grad_norm": optax.tree.norm(grads),
        "train/learning_rate": jnp.asarray(learning_rate, jnp.float32),
    }


def make_train_call(step: Callable) -> Callable:
    """``(state, images, labels, idx[k, B]) -> (state, metrics[k])``: k steps in one scan.

    k is ``train.steps_per_call`` (the leading axis of ``idx``). Inside the loop each step's
    metrics (a hundred scalars with burden metrics on) travel as one vector per dtype, so the
    scan writes one output per dtype per step instead of one per metric: on a CPU each of
    those small writes is an operation with a fixed cost. The dict is rebuilt once per call,
    with the same values.
    """

    def train_call(state, images_u8, labels, idx_block):
        layout: list[tuple[str, jnp.dtype, int, int, tuple[int, ...]]] = []

        def body(carry, idx):
            carry, metrics = step(carry, images_u8, labels, idx)
            layout.clear()
            return carry, _pack(metrics, layout)

        state, packed = jax.lax.scan(body, state, idx_block)
        k = idx_block.shape[0]
        metrics = {key: packed[str(dtype)][:, offset:offset + size].reshape((k, *shape))
                   for key, dtype, offset, size, shape in layout}
        return state, metrics

    return train_call


def _pack(metrics: dict[str, Any], layout: list) -> dict[str, jax.Array]:
    """One flat vector per dtype of ``metrics`` (sorted by key); appends to ``layout`` each
    metric's ``(key, dtype, offset, size, shape)`` in it."""
    parts: dict[Any, list[jax.Array]] = {}
    sizes: dict[Any, int] = {}
    for key in sorted(metrics):
        value = jnp.asarray(metrics[key])
        offset = sizes.get(value.dtype, 0)
        layout.append((key, value.dtype, offset, value.size, value.shape))
        parts.setdefault(value.dtype, []).append(value.ravel())
        sizes[value.dtype] = offset + value.size
    return {str(d): jnp.concatenate(v) for d, v in parts.items()}


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
