"""Evaluate a run's checkpoint: test accuracy (overall and per class), sparsity, parameters, FLOPs.

::

    python -m nbjax.eval --workdir RUN [--step N] [--config.data.KEY=VALUE ...] [--json OUT]

The run's ``config.json`` rebuilds the model; the latest checkpoint (or ``--step N``) gives
its weights and masks. ``--config.data.*`` evaluates on another dataset (or a part of one,
e.g. ``--config.data.test_limit=1000``): its images must have the run's shape and its labels
the run's classes. Inputs are normalised with the run's own training-set statistics, as the
model was trained. docs/export.md shows the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from nbjax import errors
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.model import vit as model_lib
from nbjax.pruning import masks as masks_lib

PyTree = Any


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``workdir/checkpoints``, ascending."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, Any, int]:
    """``(run, state, step)``: the run built from ``workdir/config.json`` and its checkpoint
    at ``step`` (default: the latest)."""
    from nbjax import visualize
    from nbjax.train import checkpoint as checkpoint_lib
    from nbjax.train import loop

    steps = saved_steps(workdir)
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None or step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {workdir}/checkpoints; "
                                f"saved steps: {steps or 'none'}")
    run = loop.build(visualize.load_run_config(workdir))
    ckpt = checkpoint_lib.Checkpointer(epath.Path(workdir) / "checkpoints")
    try:
        state = ckpt.restore(checkpoint_lib.abstract_like(run.state), step)
    finally:
        ckpt.close()
    return run, state, step


def eval_dataset(run: Any, overrides: dict[str, Any] | None) -> data_lib.Dataset:
    """The run's own dataset, or the one ``config.data`` with ``overrides`` names, checked
    against the model's image shape and classes."""
    if not overrides:
        return run.dataset
    cfg = ml_collections.ConfigDict(run.config.data.to_dict())
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"config.data.{key} is not a data field; fields: {sorted(cfg)}")
        cfg[key] = value
    dataset = data_lib.load_dataset(cfg)
    if dataset.image_shape != run.dataset.image_shape:
        raise ValueError(f"{dataset.name} images are {dataset.image_shape}; the model takes "
                         f"{run.dataset.image_shape}")
    if len(dataset.test_labels) and int(dataset.test_labels.max()) >= run.dataset.num_classes:
        raise ValueError(f"{dataset.name} has labels up to {int(dataset.test_labels.max())}; "
                         f"the model has {run.dataset.num_classes} classes")
    return dataset


def predict(model: model_lib.ViT, params: PyTree, masks: PyTree, images_u8: np.ndarray,
            mean: Sequence[float], std: Sequence[float], batch_size: int) -> np.ndarray:
    """Logits [N, classes] of uint8 images, in batches of ``batch_size`` (last one padded)."""
    apply = jax.jit(lambda p, m, x: model.apply({"params": p, "masks": m},
                                                data_lib.normalize(x, mean, std)))
    out = []
    for start in range(0, len(images_u8), batch_size):
        batch = images_u8[start:start + batch_size]
        count = len(batch)
        if count < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]),
                                                    batch.dtype)])
        out.append(np.asarray(apply(params, masks, batch))[:count])
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def accuracy_report(logits: np.ndarray, labels: np.ndarray, num_classes: int,
                    class_names: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and per-class accuracy (None for a class with no
    examples) of ``logits`` against ``labels``."""
    logits = logits.astype(np.float64)
    correct = np.argmax(logits, axis=-1) == labels
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels]
    per_class = []
    for c in range(num_classes):
        of_class = labels == c
        count = int(of_class.sum())
        per_class.append({"class": c, "name": class_names[c] if c < len(class_names) else str(c),
                          "count": count, "correct": int(correct[of_class].sum()),
                          "accuracy": float(correct[of_class].mean()) if count else None})
    return {"test/accuracy": float(correct.mean()) if len(labels) else float("nan"),
            "test/loss": float(loss.mean()) if len(labels) else float("nan"),
            "num_examples": int(len(labels)), "per_class": per_class}


def sparsity_report(params: PyTree, masks: PyTree) -> dict[str, Any]:
    """Per masked layer: shape, size, kept entries, sparsity; and over the prunable layers
    and over every parameter (never-pruned leaves count as kept)."""
    flat_params, flat_masks = masks_lib.flatten(params), masks_lib.flatten(masks)
    layers = {}
    for path in sorted(flat_masks):
        mask = np.asarray(flat_masks[path], bool)
        kept = int(mask.sum())
        layers[path] = {"shape": list(mask.shape), "size": int(mask.size), "kept": kept,
                        "sparsity": 1.0 - kept / max(mask.size, 1)}
    total = sum(int(np.size(v)) for v in flat_params.values())
    prunable = sum(layer["size"] for layer in layers.values())
    prunable_kept = sum(layer["kept"] for layer in layers.values())
    kept = total - prunable + prunable_kept
    return {"layers": layers,
            "prunable_sparsity": 1.0 - prunable_kept / prunable if prunable else 0.0,
            "overall_sparsity": 1.0 - kept / total if total else 0.0,
            "parameters": {"total": total, "kept": kept, "prunable": prunable,
                           "prunable_kept": prunable_kept}}


def evaluate_run(workdir: str | os.PathLike, step: int | None = None,
                 data_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``python -m nbjax.eval`` reports, as one JSON-able dict."""
    from nbjax.tome import cost as cost_lib

    run, state, step = restore(workdir, step)
    dataset = eval_dataset(run, data_overrides)
    params, masks = jax.device_get((state.params, state.masks))
    model = model_build.build_model(run.config, run.dataset.num_classes)
    logits = predict(model, params, masks, dataset.test_images, run.dataset.mean,
                     run.dataset.std, run.config.train.eval_batch_size)
    result: dict[str, Any] = {"workdir": os.fspath(workdir), "step": step,
                              "dataset": dataset.name}
    result.update(accuracy_report(logits, dataset.test_labels, run.dataset.num_classes,
                                  dataset.class_names or run.dataset.class_names))
    result.update(sparsity_report(params, masks))
    cost = cost_lib.startup_report(run.config, run.dataset.num_classes,
                                   run.dataset.image_shape, print_fn=None)
    result["flops"] = cost.to_dict()
    return result


def _millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f} M"


def format_table(result: dict[str, Any]) -> str:
    """The printed form of :func:`evaluate_run`'s result."""
    rows = [f"{result['workdir']} at step {result['step']}, {result['dataset']} test set "
            f"({result['num_examples']} images)",
            f"test accuracy {100 * result['test/accuracy']:.2f} %, "
            f"test loss {result['test/loss']:.4f}", "",
            f"{'class':<16}{'images':>8}{'accuracy':>10}"]
    for c in result["per_class"]:
        acc = "n/a" if c["accuracy"] is None else f"{100 * c['accuracy']:.2f} %"
        rows.append(f"{c['name'][:15]:<16}{c['count']:>8}{acc:>10}")
    rows += ["", f"{'layer':<28}{'size':>9}{'kept':>9}{'sparsity':>10}"]
    for path, layer in result["layers"].items():
        rows.append(f"{path.removesuffix('/kernel'):<28}{layer['size']:>9}{layer['kept']:>9}"
                    f"{100 * layer['sparsity']:>9.2f}%")
    p = result["parameters"]
    rows += [f"{'prunable layers':<28}{p['prunable']:>9}{p['prunable_kept']:>9}"
             f"{100 * result['prunable_sparsity']:>9.2f}%",
             f"{'all parameters':<28}{p['total']:>9}{p['kept']:>9}"
             f"{100 * result['overall_sparsity']:>9.2f}%", ""]
    f = result["flops"]
    rows += [f"{'forward FLOPs/image':<28}{'compiled (XLA)':>16}{'analytic':>12}",
             f"{'  without merging':<28}{_millions(f['compiled_unmerged']):>16}"
             f"{_millions(f['analytic_unmerged']):>12}",
             f"{'  with merging, r ' + str(f['merge_r']):<28}"
             f"{_millions(f['compiled_merged']):>16}{_millions(f['analytic_merged']):>12}"]
    return "\n".join(rows)


def parse_data_overrides(extra: Sequence[str],
                         defaults: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """``--config.data.KEY=VALUE`` (or ``--config.data.KEY VALUE``) flags as ``{KEY: value}``,
    each value parsed as the type of the field's default."""
    defaults = data_lib.default_data_config() if defaults is None else defaults
    out: dict[str, Any] = {}
    items = list(extra)
    while items:
        flag = items.pop(0)
        name, has_value, value = flag.partition("=")
        if not name.startswith("--config.data."):
            raise ValueError(f"unknown argument {flag!r}: only --config.data.KEY=VALUE "
                             "overrides are accepted (the model is the checkpoint's)")
        if not has_value:
            if not items:
                raise ValueError(f"{flag} needs a value")
            value = items.pop(0)
        key = name.removeprefix("--config.data.")
        if key not in defaults:
            raise ValueError(f"config.data.{key} is not a data field; fields: {sorted(defaults)}")
        out[key] = _parse_like(defaults[key], value)
    return out


def _parse_like(default: Any, text: str) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return type(default)(text) if isinstance(default, (int, float)) else text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: prints the table, writes ``--json``, returns the result."""
    parser = argparse.ArgumentParser(prog="python -m nbjax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (config.json, "
                        "checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: "
                        "the latest)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_data_overrides(extra)
        result = evaluate_run(args.workdir, args.step, overrides)
    except (ValueError, FileNotFoundError, errors.UserError) as err:
        parser.exit(2, f"error: {err}\n")
    print(format_table(result))
    if args.json:
        epath.Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    errors.run_cli(main)
