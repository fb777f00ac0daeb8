"""The train loop: compiled calls, logging, evaluation, checkpoints, resume.

Everything the loop decides is a function of the step, so a run stopped at a checkpoint and
started again takes exactly the same batches and random numbers as one that never stopped:
the batches come from :mod:`nbjax.train.order`, and the step's random key is
``fold_in(state.rng, step)``. Checkpoints are taken at call boundaries, checked to hold only
finite values; SIGTERM and Ctrl-C save at the current step before stopping. What nbjax
guarantees when things go wrong is in docs/reliability.md.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from nbjax import config as config_lib
from nbjax import errors
from nbjax.burden import tracker as burden_tracker
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.parallel import collectives
from nbjax.parallel import mesh as sharding_lib
from nbjax.parallel.together import CompiledTogether
from nbjax.pruning import Pruner, make_pruner
from nbjax.tome import cost as flops_lib
from nbjax.train import checkpoint as checkpoint_lib
from nbjax.train import hparams as hparams_lib
from nbjax.train import metrics_log, preemption
from nbjax.train import optimizer as optimizer_lib
from nbjax.train import order as order_lib
from nbjax.train import state as state_lib
from nbjax.train import step as train
from nbjax.train import tensorboard as tensorboard_lib
from nbjax.train import workdir as workdir_lib

FINAL_METRICS = "final_metrics.json"  # written last: its presence marks a finished run


@dataclass
class Run:
    """The compiled pieces of one run, built once by :func:`build`."""

    config: ml_collections.ConfigDict
    dataset: data_lib.Dataset
    mesh: Any
    state: state_lib.TrainState
    state_shardings: Any
    train_call: Any  # (state, images, labels, idx[k, B]) -> (state, metrics[k])
    eval_step: Any
    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    total_steps: int
    pruner: Pruner


def build(config: ml_collections.ConfigDict, dataset: data_lib.Dataset | None = None,
          mesh: Any = None, pruner: Pruner | None = None) -> Run:
    """Loads data, builds model, optimizer, pruner and state, and jits the steps.

    ``pruner`` replaces the method ``config.pruning`` names (the benchmark's unmasked
    reference, :func:`nbjax.bench.variants.unmasked_pruner`, has no masks at all).
    """
    config_lib.validate(config)
    dataset = checked_dataset(config, dataset)
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    check_batch_sizes(config, mesh.devices.size, len(dataset.train_labels))
    steps = order_lib.total_steps(config, len(dataset.train_labels))
    model = model_build.build_model(config, dataset.num_classes)
    tx = optimizer_lib.make_optimizer(config, steps)  # its state's structure only
    pruner = make_pruner(config, steps) if pruner is None else pruner
    # On a CPU mesh the step's gradient (and the burden probe's sums) cross the devices as one
    # flat buffer; elsewhere the compiler partitions them (nbjax.parallel.collectives).
    grad_reduce = collectives.grad_reduce_mode(config, mesh)
    # The burden metrics (docs/burden.md): off, the model collects no statistics either.
    tracker = burden_tracker.make_tracker(
        config, model, pruner, dataset.image_shape, grad_reduce=grad_reduce,
        mesh=mesh) if config.burden.enabled else None

    def init() -> state_lib.TrainState:
        return state_lib.init_state(model, tx, pruner, dataset.image_shape, config.seed,
                                    hparams_lib.from_config(config),
                                    burden_init=tracker.init if tracker is not None else None)

    # The state is created by a compiled call straight into its shardings: no host copy, no
    # transfer, and on several processes each one creates only the shards its devices hold.
    shardings = sharding_lib.state_shardings(jax.eval_shape(init), mesh, config.sharding.mode,
                                             config.sharding.fsdp_min_size)
    state = jax.jit(init, out_shardings=shardings)()
    step = train.make_train_step(config, model, pruner, dataset.num_classes, dataset.mean,
                                 dataset.std, total_steps=steps, tracker=tracker,
                                 grad_reduce=grad_reduce, mesh=mesh)
    repl = sharding_lib.replicated(mesh)
    train_call = CompiledTogether(jax.jit(train.make_train_call(step), donate_argnums=0,
                                          out_shardings=(shardings, repl)), "train_call")
    return Run(config=config, dataset=dataset, mesh=mesh, state=state,
               state_shardings=shardings, train_call=train_call,
               eval_step=_eval_step(model, dataset, repl), total_steps=steps, pruner=pruner,
               **device_data(dataset, mesh))


def checked_dataset(config: ml_collections.ConfigDict,
                     dataset: data_lib.Dataset | None) -> data_lib.Dataset:
    """The dataset ``config.data`` names (unless given), checked against ``config.model``."""
    dataset = data_lib.load_dataset(config.data) if dataset is None else dataset
    height, width, _ = dataset.image_shape
    if (height, width) != (config.model.image_size, config.model.image_size):
        raise errors.ConfigError(
            f"config.model.image_size={config.model.image_size} but the {dataset.name} "
            f"images are {height}x{width}",
            f"set --config.model.image_size={height} (and a patch_size dividing it)")
    return dataset


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int,
                       num_train: int) -> None:
    """Batches split evenly over the devices, and a train batch fits in the train set."""
    for key in ("batch_size", "eval_batch_size"):
        size = config.train[key]
        if size % num_devices:
            multiple = max(num_devices, size // num_devices * num_devices)
            raise errors.ConfigError(
                f"config.train.{key}={size} is not a multiple of the {num_devices} devices",
                f"set --config.train.{key}={multiple} (or another multiple of {num_devices})")
    if config.train.batch_size > num_train:
        raise errors.ConfigError(
            f"config.train.batch_size={config.train.batch_size} is larger than the "
            f"{num_train} training examples",
            f"set --config.train.batch_size to at most {num_train}")


def _eval_step(model: Any, dataset: data_lib.Dataset, replicated: Any) -> Any:
    """The jitted eval step: sums of correct, loss and count, replicated on every device."""
    return CompiledTogether(jax.jit(
        train.make_eval_step(model, dataset.num_classes, dataset.mean, dataset.std),
        out_shardings=replicated), "eval_step")


def device_data(dataset: data_lib.Dataset, mesh: Any) -> dict[str, jax.Array]:
    """The dataset replicated on every device; each device gathers its own batch rows from it
    (MNIST and CIFAR-10 fit easily, see docs/scaling.md)."""
    arrays = {"train_images": dataset.train_images, "train_labels": dataset.train_labels,
              "test_images": dataset.test_images, "test_labels": dataset.test_labels}
    return {name: sharding_lib.put_replicated(array, mesh) for name, array in arrays.items()}


def eval_batches(num_examples: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (idx, valid) rows of every global eval batch; the last one is padded.

    Padding rows point at example 0 with ``valid`` 0, so every example counts exactly once,
    whichever process's devices hold its row.
    """
    out = []
    for start in range(0, num_examples, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = (idx < num_examples).astype(np.int32)
        out.append((np.where(valid == 1, idx, 0).astype(np.int32), valid))
    return out


def evaluate(run: Run, state: state_lib.TrainState) -> dict[str, float]:
    """Test loss and accuracy over every test example exactly once (last batch padded).

    Each process transfers only its rows of each global batch; the sums come back replicated.
    """
    sharding = sharding_lib.batch_sharding(run.mesh)
    sums = []
    for idx, valid in eval_batches(len(run.dataset.test_labels),
                                   run.config.train.eval_batch_size):
        sums.append(run.eval_step(state.params, state.masks, run.test_images, run.test_labels,
                                  sharding_lib.put_batch(idx, sharding),
                                  sharding_lib.put_batch(valid, sharding)))
    sums = jax.device_get(sums)  # one explicit transfer; the adding is done on the host
    total = {k: float(sum(np.float64(s[k]) for s in sums)) for k in sums[0]}
    return {"test/accuracy": total["correct"] / total["count"],
            "test/loss": total["loss"] / total["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: data_lib.Dataset | None = None,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, returns metrics.

    ``workdir`` is a local path or a ``gs://`` URL, held by one run at a time; a resume must
    use the config the run began with, except for the keys that cannot change its trajectory
    (``allow_config_change`` overrides; :mod:`nbjax.train.workdir`). A finished run returns
    its final metrics and writes nothing. With several processes every process calls this
    (SPMD); only process 0 writes files, except the checkpoints, which Orbax writes
    collectively, so ``workdir`` must be one location that every process sees.
    """
    config_lib.validate(config)
    workdir = epath.Path(workdir)
    with workdir_lib.hold(workdir):
        changes = workdir_lib.check_resume(workdir, config, allow_config_change)
        final = final_metrics(workdir)
        if final is not None and all(workdir_lib.is_safe(key) for key in changes):
            return final
        run = build(config, dataset)
        ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints",
                                           keep=config.train.keep_checkpoints)
        try:
            state, start = restore(run, ckpt)
            if final is not None and start == run.total_steps:
                return final
            _set_final_aside(workdir, final)
            workdir_lib.record_start(workdir, config, start, changes, allow_config_change)
            if jax.process_index() == 0:  # tokens per block and forward FLOPs, in flops.json
                flops_lib.startup_report(config, run.dataset.num_classes,
                                         run.dataset.image_shape, workdir)
            log = metrics_log.MetricsLog(workdir / "metrics.jsonl", start,
                                         enabled=jax.process_index() == 0)
            board = tensorboard_lib.make_writer(config, workdir, start,
                                                enabled=jax.process_index() == 0)
            try:
                state, step = _train_steps(run, ckpt, state, start, log, board)
                return _finish(run, ckpt, state, step, log, workdir, board)
            finally:
                board.close()
        finally:
            ckpt.close()


def final_metrics(workdir: epath.Path) -> dict[str, Any] | None:
    path = workdir / FINAL_METRICS
    return json.loads(path.read_text()) if path.exists() else None


def _set_final_aside(workdir: epath.Path, final: dict[str, Any] | None) -> None:
    """A finished run trained further (a changed length): its old final metrics are kept
    under their step's name, so the file means "finished" again only when it is."""
    if final is not None and jax.process_index() == 0:
        steps = final.get("train/steps", "old")
        (workdir / FINAL_METRICS).rename(workdir / f"final_metrics.step{steps}.json")


def restore(run: Run, ckpt: checkpoint_lib.Checkpointer) -> tuple[state_lib.TrainState, int]:
    """The newest good checkpoint's state and step, or the fresh state at step 0."""
    def warn(line: str) -> None:
        if jax.process_index() == 0:
            print(line, file=sys.stderr, flush=True)

    restored = ckpt.restore_latest_good(checkpoint_lib.abstract_like(run.state), warn)
    return restored if restored is not None else (run.state, 0)


class _Progress:
    """The loop's host side: pending device metrics, the progress bar, throughput, the log."""

    def __init__(self, run: Run, ckpt: checkpoint_lib.Checkpointer, start: int,
                 log: metrics_log.MetricsLog,
                 board: tensorboard_lib.TensorBoardWriter) -> None:
        self.run, self.log, self.board = run, log, board
        self.pending = metrics_log.PendingMetrics(ckpt.resume_note)
        is_main = jax.process_index() == 0
        self.bar = tqdm(total=run.total_steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=not (run.config.train.progress and is_main))
        self.last_step, self.last_time = start, time.perf_counter()

    def log_step(self, state: state_lib.TrainState, before: int, step: int) -> None:
        """Fetches (and checks) the pending metrics, evaluates if due, writes the record."""
        record = self.pending.fetch()
        now = time.perf_counter()
        record["train/images_per_sec"] = ((step - self.last_step) * self.run.config.train.
                                          batch_size / max(now - self.last_time, 1e-9))
        self.last_step, self.last_time = step, now
        if order_lib.crossed(before, step, self.run.config.train.eval_every):
            record.update(evaluate(self.run, state))
        self.log.write(step, record)
        self.board.log(step, record, state)  # on every process: may gather FSDP shards
        self.bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                             acc=f"{record['train/accuracy']:.3f}",
                             img_s=f"{record['train/images_per_sec']:.0f}")


def _train_steps(run: Run, ckpt: checkpoint_lib.Checkpointer, state: state_lib.TrainState,
                 start: int, log: metrics_log.MetricsLog,
                 board: tensorboard_lib.TensorBoardWriter) -> tuple[state_lib.TrainState, int]:
    """Runs the run's compiled calls from ``start`` to the end (:func:`run_calls`)."""
    order = order_lib.BatchOrder(len(run.dataset.train_labels), run.config.train.batch_size,
                                 run.config.seed)
    return run_calls(run, ckpt, state, start, _Progress(run, ckpt, start, log, board),
                     lambda step, num_steps: train_indices(run, order, step, num_steps))


def run_calls(run: Run, ckpt: checkpoint_lib.Checkpointer, state: Any, start: int,
              progress: Any, indices: Callable[[int, int], jax.Array]) -> tuple[Any, int]:
    """Runs ``run.train_call`` from ``start`` to the end on ``indices(step, num_steps)``,
    logging through ``progress`` (its ``pending``, ``bar`` and ``log_step``) and
    checkpointing on the way; a stop request (SIGTERM, Ctrl-C) saves at the current step and
    raises Stopped. A single run and a population both train through it."""
    train_cfg = run.config.train
    step = start
    with preemption.StopSignals() as stop:
        try:
            while step < run.total_steps:
                num_steps = min(train_cfg.steps_per_call, run.total_steps - step)
                state, metrics = run.train_call(state, run.train_images, run.train_labels,
                                                indices(step, num_steps))
                progress.pending.add(step, metrics)
                before, step = step, step + num_steps
                progress.bar.update(num_steps)
                if order_lib.crossed(before, step, train_cfg.log_every) or step == run.total_steps:
                    progress.log_step(state, before, step)
                if stop.requested():
                    save_and_stop(ckpt, progress, state, step, stop.signum)
                checkpoint_due = order_lib.crossed(before, step, train_cfg.checkpoint_every)
                if checkpoint_due and step < run.total_steps:
                    progress.pending.fetch()  # never checkpoint past a non-finite step
                    ckpt.save(step, state)
        except KeyboardInterrupt as interrupt:  # raised by code inside the loop itself
            if isinstance(interrupt, errors.Stopped) or stop.forced or not intact(state):
                raise
            save_and_stop(ckpt, progress, state, step, signal.SIGINT)
        finally:
            progress.bar.close()
    return state, step


def intact(state: state_lib.TrainState) -> bool:
    """Whether ``state`` can still be saved (a call interrupted mid-way has donated it)."""
    return jax.process_count() == 1 and not any(
        leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))


def save_and_stop(ckpt: checkpoint_lib.Checkpointer, progress: Any,
                   state: state_lib.TrainState, step: int, signum: int | None) -> None:
    """Checks the pending steps, saves ``state`` at ``step`` and raises Stopped."""
    progress.pending.fetch()
    if ckpt.latest_step() != step:
        ckpt.save(step, state, force=True)
    ckpt.wait()
    name = signal.Signals(signum or signal.SIGINT).name
    raise errors.Stopped(f"stopped by {name} at step {step}; saved a checkpoint in "
                         f"{ckpt.directory} — run the same command again to resume",
                         signum or signal.SIGINT)


def _finish(run: Run, ckpt: checkpoint_lib.Checkpointer, state: state_lib.TrainState, step: int,
            log: metrics_log.MetricsLog, workdir: epath.Path,
            board: tensorboard_lib.TensorBoardWriter) -> dict[str, Any]:
    """Final evaluation, the final checkpoint, then final_metrics.json (which marks the end)."""
    final = evaluate(run, state)
    final["train/steps"] = step
    log.write(step, {**final, "final": True})
    board.log(step, final)
    tensorboard_lib.log_merge_picture(board, run, state, step)  # runs that merge tokens
    if ckpt.latest_step() != step:
        ckpt.save(step, state, force=True)
    ckpt.wait()
    if jax.process_index() == 0:
        metrics_log.write_atomic(workdir / FINAL_METRICS, json.dumps(final, indent=2))
    return final


def train_indices(run: Run, order: order_lib.BatchOrder, step: int, num_steps: int) -> jax.Array:
    """The [num_steps, batch] example indices of the next call, sharded over the batch.

    Every process knows the whole (cheap, seeded) batch order but transfers only the columns
    its own devices hold; each device then gathers its own examples from the replicated
    dataset inside the compiled step. An explicit transfer, allowed by the transfer guard.
    """
    sharding = sharding_lib.batch_sharding(run.mesh, batch_axis=1)
    return sharding_lib.put_batch(order.block(step, num_steps), sharding)
