"""Export a pruned model as one compact safetensors file, and load it back without nbjax's
checkpoints.

::

    python -m nbjax.export --workdir RUN --out model.safetensors [--step N]

Each masked kernel is stored as its kept values (row-major order) plus its mask, either
packed as bits (``np.packbits``) or as the flat indices of the kept entries in the smallest
unsigned integer type that holds them, whichever is smaller for that kernel. Never-pruned
leaves are stored dense. The metadata holds the resolved run config (JSON), what the model
needs around it (classes, image shape, normalisation) and the shape of each masked kernel.

A pruned weight is stored as 0: the export holds W ⊙ M, what the forward pass uses, also for
a persistent method whose train state keeps the pruned weights. :func:`load` rebuilds the
Flax model and its params (and masks) from the file alone. docs/export.md has the sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from etils import epath

from nbjax import errors
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.model import vit as model_lib
from nbjax.pruning import masks as masks_lib

FORMAT = "nbjax-pruned/1"
PyTree = Any


def index_dtype(size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every flat index of ``size`` entries."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def encode_mask(mask: np.ndarray) -> tuple[str, np.ndarray]:
    """``('bits', packbits)`` or ``('indices', kept flat indices)``, whichever is smaller."""
    flat = np.asarray(mask, bool).ravel()
    bits = np.packbits(flat)
    indices = np.flatnonzero(flat).astype(index_dtype(flat.size))
    return ("indices", indices) if indices.nbytes < bits.nbytes else ("bits", bits)


def decode_mask(kind: str, data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The boolean mask of ``shape`` that :func:`encode_mask` encoded."""
    size = int(np.prod(shape, dtype=np.int64))
    if kind == "bits":
        flat = np.unpackbits(np.asarray(data, np.uint8), count=size).astype(bool)
    elif kind == "indices":
        flat = np.zeros(size, bool)
        flat[np.asarray(data, np.int64)] = True
    else:
        raise ValueError(f"unknown mask encoding {kind!r}")
    return flat.reshape(tuple(shape))


def pack(params: PyTree, masks: PyTree) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """``(tensors, masked_shapes)``: the safetensors tensors of ``params`` pruned by ``masks``
    (``dense/P``; ``kept/P`` with ``mask_bits/P`` or ``mask_indices/P``) and the shape of
    each masked leaf, which its flat tensors do not carry."""
    flat_masks = {p: np.asarray(m, bool) for p, m in masks_lib.flatten(masks).items()}
    tensors: dict[str, np.ndarray] = {}
    masked_shapes: dict[str, list[int]] = {}
    for path, value in sorted(masks_lib.flatten(params).items()):
        value = np.asarray(value)
        if path in flat_masks:
            kind, data = encode_mask(flat_masks[path])
            tensors[f"kept/{path}"] = np.ascontiguousarray(value[flat_masks[path]])
            tensors[f"mask_{kind}/{path}"] = data
            masked_shapes[path] = list(value.shape)
        else:
            tensors[f"dense/{path}"] = np.ascontiguousarray(value)
    return tensors, masked_shapes


def encodings(tensors: dict[str, Any]) -> dict[str, str]:
    """``{path: 'bits' or 'indices'}`` of every masked leaf of packed ``tensors``."""
    return {name.split("/", 1)[1]: name.split("/", 1)[0].removeprefix("mask_")
            for name in tensors if name.startswith("mask_")}


def unpack(tensors: dict[str, np.ndarray],
           masked_shapes: dict[str, Sequence[int]]) -> tuple[dict, dict]:
    """``(params, masks)``, nested: the inverse of :func:`pack` (pruned entries are 0)."""
    params = {name.removeprefix("dense/"): value for name, value in tensors.items()
              if name.startswith("dense/")}
    masks = {}
    kinds = encodings(tensors)
    for path, shape in masked_shapes.items():
        kind = kinds[path]
        mask = decode_mask(kind, tensors[f"mask_{kind}/{path}"], shape)
        kept = tensors[f"kept/{path}"]
        value = np.zeros(tuple(shape), kept.dtype)
        value[mask] = kept
        params[path], masks[path] = value, mask
    return masks_lib.nest(params), masks_lib.nest(masks)


def export_params(out: str | os.PathLike, params: PyTree, masks: PyTree,
                  config: ml_collections.ConfigDict, *, num_classes: int,
                  image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                  class_names: Sequence[str] = (), step: int | None = None) -> dict[str, Any]:
    """Writes the safetensors file of a model (params, masks, config); returns a summary:
    bytes written and each masked leaf's encoding."""
    tensors, masked_shapes = pack(jax.device_get(params), jax.device_get(masks))
    model_info = {"num_classes": int(num_classes), "image_shape": [int(d) for d in image_shape],
                  "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                  "class_names": [str(n) for n in class_names], "step": step,
                  "masked_shapes": masked_shapes}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True),
                "model": json.dumps(model_info)}
    data = safetensors.numpy.save(tensors, metadata=metadata)
    epath.Path(out).write_bytes(data)
    return {"path": os.fspath(out), "bytes": len(data), "encodings": encodings(tensors)}


def export_run(workdir: str | os.PathLike, out: str | os.PathLike,
               step: int | None = None) -> dict[str, Any]:
    """Exports the checkpoint at ``step`` (default: the latest) of the run in ``workdir``."""
    from nbjax import eval as eval_lib

    run, state, step = eval_lib.restore(workdir, step)
    ds = run.dataset
    return export_params(out, state.params, state.masks, run.config,
                         num_classes=ds.num_classes, image_shape=ds.image_shape, mean=ds.mean,
                         std=ds.std, class_names=ds.class_names, step=step)


@dataclasses.dataclass
class Exported:
    """A model loaded from an export: the Flax ViT, its params (pruned entries 0), its masks
    and what it needs around it."""

    model: model_lib.ViT
    params: PyTree
    masks: PyTree
    config: ml_collections.ConfigDict
    num_classes: int
    image_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    step: int | None

    def variables(self, with_masks: bool = True) -> dict[str, PyTree]:
        """``model.apply``'s variables; without the masks the params alone give the same
        forward pass, since their pruned entries are 0."""
        return {"params": self.params, "masks": self.masks} if with_masks \
            else {"params": self.params}

    def logits(self, images: Any, with_masks: bool = True) -> jax.Array:
        """Logits of uint8 images (normalised here) or of already normalised float images."""
        images = np.asarray(images)
        if np.issubdtype(images.dtype, np.integer):
            images = data_lib.normalize(images, self.mean, self.std)
        return self._apply(self.variables(with_masks), images)

    @functools.cached_property
    def _apply(self) -> Any:
        return jax.jit(self.model.apply)


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def load(path: str | os.PathLike) -> Exported:
    """Rebuilds the model and its params from an export (a local path or a ``gs://`` URL)."""
    data = epath.Path(path).read_bytes()
    metadata = read_metadata(data)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an nbjax export (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    config = ml_collections.ConfigDict(json.loads(metadata["config"]))
    info = json.loads(metadata["model"])
    params, masks = unpack(safetensors.numpy.load(data), info["masked_shapes"])
    model = model_build.build_model(config, info["num_classes"]).clone(
        collect_stats=False, token_stats=False)
    image_shape = tuple(info["image_shape"])
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, *image_shape), np.float32))["params"]
    want = {p: tuple(v.shape) for p, v in masks_lib.flatten(expected).items()}
    got = {p: tuple(v.shape) for p, v in masks_lib.flatten(params).items()}
    if want != got:
        raise ValueError(f"{path}: the stored params do not fit the model its config "
                         f"describes ({sorted(set(want) ^ set(got)) or 'shapes differ'})")
    return Exported(model, params, masks, config, info["num_classes"], image_shape,
                    tuple(info["mean"]), tuple(info["std"]), tuple(info["class_names"]),
                    info["step"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: exports a run; prints and returns the summary."""
    parser = argparse.ArgumentParser(prog="python -m nbjax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (config.json, "
                        "checkpoints/)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: "
                        "the latest)")
    args = parser.parse_args(argv)
    try:
        summary = export_run(args.workdir, args.out, args.step)
    except (ValueError, FileNotFoundError, errors.UserError) as err:
        parser.exit(2, f"error: {err}\n")
    kinds = sorted(set(summary["encodings"].values()))
    print(f"wrote {summary['path']}: {summary['bytes']} bytes; masks as "
          f"{', '.join(kinds) or 'none (a dense model)'}", file=sys.stdout)
    return summary


if __name__ == "__main__":
    errors.run_cli(main)
