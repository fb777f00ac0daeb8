"""The train loop: data order, compiled calls, logging, evaluation, checkpoints, resume.

Everything the loop decides is a function of the step, so a run stopped at a checkpoint and
started again takes exactly the same batches and random numbers as one that never stopped:
the batch order of epoch e is a permutation seeded by (seed, e), and the step's random key is
``fold_in(state.rng, step)``. Checkpoints are taken at call boundaries; Ctrl-C saves first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from nbjax import config as config_lib
from nbjax.burden import tracker as burden_tracker
from nbjax.data import pipeline as data_lib
from nbjax.model import vit as model_lib
from nbjax.parallel import mesh as sharding_lib
from nbjax.pruning import Pruner, make_pruner
from nbjax.tome import cost as flops_lib
from nbjax.train import checkpoint as checkpoint_lib
from nbjax.train import step as train


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
    """``train.num_steps`` if set, else ``train.num_epochs`` full batches of the train set."""
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    steps_per_epoch = num_train // config.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                         f"{num_train} training examples")
    return max(1, int(round(config.train.num_epochs * steps_per_epoch)))


class BatchOrder:
    """The indices of the examples of every step: epoch e is a permutation seeded by (seed, e).

    The remainder of each epoch that does not fill a batch is skipped, as usual.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            rows = perm[: self.steps_per_epoch * self.batch_size].astype(np.int32)
            self._cache = (epoch, rows.reshape(self.steps_per_epoch, self.batch_size))
        return self._cache[1]

    def block(self, start_step: int, num_steps: int) -> np.ndarray:
        """The [num_steps, batch] indices of steps start_step .. start_step + num_steps - 1."""
        rows = [self._epoch(s // self.steps_per_epoch)[s % self.steps_per_epoch]
                for s in range(start_step, start_step + num_steps)]
        return np.stack(rows)


class MetricsLog:
    """JSON-lines metrics, one object per line with its step; resume drops lines past it."""

    def __init__(self, path: str | os.PathLike, resume_step: int, enabled: bool = True) -> None:
        self.path, self.enabled = epath.Path(path), enabled
        self._lines: list[str] = []
        if not enabled:
            return
        if self.path.exists():
            self._lines = [line + "\n" for line in self.path.read_text().splitlines()
                           if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            _write_atomic(self.path, "".join(self._lines))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        line = json.dumps(record) + "\n"
        if "://" not in str(self.path):  # a local file: append
            with self.path.open("a") as f:
                f.write(line)
        else:  # object stores (gs://) cannot append: rewrite the whole (small) file
            self._lines.append(line)
            _write_atomic(self.path, "".join(self._lines))


def _write_atomic(path: epath.Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _to_python(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


@dataclass
class Run:
    """The compiled pieces of one run, built once by :func:`build`."""

    config: ml_collections.ConfigDict
    dataset: data_lib.Dataset
    mesh: Any
    state: train.TrainState
    state_shardings: Any
    train_chunk: Any
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
    dataset = data_lib.load_dataset(config.data) if dataset is None else dataset
    h, w, _ = dataset.image_shape
    if (h, w) != (config.model.image_size, config.model.image_size):
        raise ValueError(f"config.model.image_size={config.model.image_size} but the "
                         f"{dataset.name} images are {h}x{w}")
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    for key in ("batch_size", "eval_batch_size"):
        if getattr(config.train, key) % num_devices:
            raise ValueError(f"config.train.{key}={getattr(config.train, key)} must be a "
                             f"multiple of the {num_devices} devices")
    steps = total_steps(config, len(dataset.train_labels))
    model = model_lib.build_model(config, dataset.num_classes)
    tx = train.make_optimizer(config, steps)
    pruner = make_pruner(config, steps) if pruner is None else pruner
    lr_fn = train.learning_rate_fn(config, steps)
    # On a CPU mesh the step's gradient (and the burden probe's sums) cross the devices as one
    # flat buffer (nbjax.parallel.mesh.flat_grad_reduce); elsewhere the compiler partitions them.
    flat_mesh = mesh if sharding_lib.flat_grad_reduce(config, mesh) else None
    # The burden metrics (docs/burden.md): off, the model collects no statistics either.
    tracker = burden_tracker.make_tracker(config, model, pruner, dataset.image_shape,
                                          flat_mesh=flat_mesh) if config.burden.enabled else None

    def init() -> train.TrainState:
        return train.init_state(model, tx, pruner, dataset.image_shape, config.seed,
                                burden_init=tracker.init if tracker is not None else None)

    # The state is created by a compiled call straight into its shardings: no host copy, no
    # transfer, and on several processes each one creates only the shards its devices hold.
    shardings = sharding_lib.state_shardings(jax.eval_shape(init), mesh, config.sharding.mode,
                                             config.sharding.fsdp_min_size)
    state = jax.jit(init, out_shardings=shardings)()
    step = train.make_train_step(config, model, tx, pruner, dataset.num_classes,
                                 dataset.mean, dataset.std, burden_fn=tracker, lr_fn=lr_fn,
                                 flat_mesh=flat_mesh)
    repl = sharding_lib.replicated(mesh)
    train_chunk = jax.jit(train.make_multi_step(step), donate_argnums=0,
                          out_shardings=(shardings, repl))
    eval_step = jax.jit(train.make_eval_step(model, dataset.num_classes, dataset.mean,
                                             dataset.std), out_shardings=repl)
    # The dataset is replicated on every device (MNIST and CIFAR-10 fit easily); each device
    # gathers only its own rows of the batch from it (see docs/scaling.md).
    put = lambda x: sharding_lib.put_replicated(x, mesh)
    return Run(config, dataset, mesh, state, shardings, train_chunk, eval_step,
               put(dataset.train_images), put(dataset.train_labels),
               put(dataset.test_images), put(dataset.test_labels), steps, pruner)


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


def evaluate(run: Run, state: train.TrainState) -> dict[str, float]:
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
                       dataset: data_lib.Dataset | None = None) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, returns metrics.

    ``workdir`` is a local path or a ``gs://`` URL. With several processes every process calls
    this (SPMD); only process 0 writes files, except the checkpoints, which Orbax writes
    collectively, so ``workdir`` must be one location that every process sees.
    """
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    run = build(config, dataset)
    t = config.train
    final_path = workdir / "final_metrics.json"
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(config))
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    state = run.state
    start = ckpt.latest_step() or 0
    if start == run.total_steps and final_path.exists():
        ckpt.close()
        return json.loads(final_path.read_text())
    if start:
        state = ckpt.restore(checkpoint_lib.abstract_like(state))
    if is_main:  # tokens per block and forward FLOPs/image, printed and in flops.json
        flops_lib.startup_report(config, run.dataset.num_classes, run.dataset.image_shape,
                                 workdir)
    log = MetricsLog(workdir / "metrics.jsonl", start, enabled=is_main)
    order = BatchOrder(len(run.dataset.train_labels), t.batch_size, config.seed)
    bar = tqdm(total=run.total_steps, initial=start, disable=not (t.progress and is_main),
               unit="step", dynamic_ncols=True)
    step, last_log_step, last_log_time = start, start, time.perf_counter()
    pending: list[dict[str, Any]] = []
    try:
        while step < run.total_steps:
            k = min(t.steps_per_call, run.total_steps - step)
            state, metrics = run.train_chunk(state, run.train_images, run.train_labels,
                                             train_indices(run, order, step, k))
            pending.append(metrics)
            before, step = step, step + k
            bar.update(k)
            if _crossed(before, step, t.log_every) or step == run.total_steps:
                record = _last_values(pending)
                pending.clear()
                now = time.perf_counter()
                record["train/images_per_sec"] = (step - last_log_step) * t.batch_size / max(
                    now - last_log_time, 1e-9)
                last_log_step, last_log_time = step, now
                if _crossed(before, step, t.eval_every):
                    record.update(evaluate(run, state))
                _check_finite(record, step)
                log.write(step, record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                acc=f"{record['train/accuracy']:.3f}",
                                img_s=f"{record['train/images_per_sec']:.0f}")
            if _crossed(before, step, t.checkpoint_every) and step < run.total_steps:
                ckpt.save(step, state)
    except KeyboardInterrupt:
        bar.close()
        if jax.process_count() > 1:
            # A save is collective and the other processes are not here: saving would hang.
            # The periodic checkpoints (train.checkpoint_every) are the resume points.
            if is_main:
                print(f"\ninterrupted at step {step}; several processes, so no save on "
                      f"interrupt: a rerun resumes from the latest checkpoint in "
                      f"{ckpt.directory}")
            raise
        ckpt.save(step, state, force=True)
        ckpt.close()
        print(f"\ninterrupted: saved a checkpoint at step {step} in {ckpt.directory}; "
              "run the same command again to resume")
        raise
    bar.close()
    final = evaluate(run, state)
    final["train/steps"] = step
    log.write(step, {**final, "final": True})
    if ckpt.latest_step() != step:
        ckpt.save(step, state, force=True)
    ckpt.close()
    if is_main:
        _write_atomic(final_path, json.dumps(final, indent=2))
    return final


def train_indices(run: Run, order: BatchOrder, step: int, num_steps: int) -> jax.Array:
    """The [num_steps, batch] example indices of the next call, sharded over the batch.

    Every process knows the whole (cheap, seeded) batch order but transfers only the columns
    its own devices hold; each device then gathers its own examples from the replicated
    dataset inside the compiled step. An explicit transfer, allowed by the transfer guard.
    """
    sharding = sharding_lib.batch_sharding(run.mesh, batch_axis=1)
    return sharding_lib.put_batch(order.block(step, num_steps), sharding)


def _last_values(pending: list[dict[str, Any]]) -> dict[str, Any]:
    """Host copies of the metrics of the last step of the pending calls (one sync)."""
    last = jax.device_get(pending[-1])
    return {k: np.asarray(v)[-1] for k, v in last.items()}


def _check_finite(record: dict[str, Any], step: int) -> None:
    loss = float(record["train/loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"train loss is {loss} at step {step}: lower train.learning_rate, keep "
            "train.grad_clip_norm > 0, or check the data; the last good checkpoint is kept")
