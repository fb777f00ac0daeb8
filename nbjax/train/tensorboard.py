"""TensorBoard event files for a run: scalars, kept-weight histograms, the merge picture.

Written with tensorboardX, which needs neither TensorFlow nor PyTorch (docs/tensorboard.md
says why). The events go into the run's work directory itself, so ``tensorboard --logdir
STUDY_DIR`` shows every cell of a study as its own run, named by its directory. A resumed run
opens its writer with ``purge_step`` = the resume step, so TensorBoard hides the events past
the checkpoint that the first attempt wrote, as ``metrics.jsonl`` drops its lines past it.

Only process 0 writes. :meth:`TensorBoardWriter.mask_histograms` must still be called on
every process: fetching FSDP-sharded weights that span several hosts is a collective.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

KEPT_WEIGHTS_TAG = "kept_weights"  # histogram tag prefix: kept_weights/<block>


def _numeric_scalar(value: Any) -> float | None:
    """``value`` as a float if it is one number (not a bool, string, or array of several)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Number):
        return float(value)
    array = np.asarray(value)
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def block_of(path: str) -> str:
    """The block a kernel path belongs to: ``block_0/attn/query/kernel`` -> ``block_0``.

    Leaves outside the transformer blocks are their own group (``patch_embed``, ``head``).
    """
    return path.split("/", 1)[0]


def kept_magnitudes_per_block(params: Mapping[str, Any],
                              masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{block: |W| of every kept entry of that block's masked kernels}`` (host arrays).

    Only kernels that have a mask count: never-pruned leaves are not part of the picture.
    """
    from nbjax.pruning import masks as masks_lib

    flat_params, flat_masks = masks_lib.flatten(params), masks_lib.flatten(masks)
    groups: dict[str, list[np.ndarray]] = {}
    for path in sorted(flat_masks):
        mask = np.asarray(flat_masks[path], bool)
        weights = np.asarray(flat_params[path])
        groups.setdefault(block_of(path), []).append(np.abs(weights[mask]).ravel())
    return {block: np.concatenate(parts) for block, parts in groups.items()}


def _to_host(tree: Any, fetch: bool) -> Any:
    """Host copies of ``tree``; gathers over processes when a leaf spans several of them.

    The gather is collective, so every process runs it; otherwise only a process that will
    write (``fetch``) copies anything.
    """
    leaves = jax.tree.leaves(tree)
    spans_hosts = any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves)
    if spans_hosts:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree) if fetch else None


def _image_array(image: Any) -> np.ndarray:
    """An [H, W, C] array from an array, a PNG path, PNG bytes or a matplotlib figure."""
    from PIL import Image

    if hasattr(image, "savefig"):  # a matplotlib Figure
        buf = io.BytesIO()
        image.savefig(buf, format="png", dpi=100)
        image = buf.getvalue()
    if isinstance(image, (str, os.PathLike)):
        image = epath.Path(image).read_bytes()
    if isinstance(image, bytes):
        image = np.asarray(Image.open(io.BytesIO(image)).convert("RGBA"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image must be [H, W] or [H, W, C], got shape {array.shape}")
    return array


class TensorBoardWriter:
    """The run's TensorBoard writer; a disabled one (or on a process other than 0) is a no-op.

    ``logdir`` is the run's work directory. ``start_step``: the step a resumed run restarts
    from; the events at or past it that an earlier attempt wrote are hidden.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True, start_step: int = 0,
                 flush_secs: int = 30) -> None:
        self.logdir = os.fspath(logdir)
        self.enabled = bool(enabled) and jax.process_index() == 0
        self._writer = None
        self._last_logged = int(start_step)
        if self.enabled:
            from tensorboardX import SummaryWriter

            # Event file names carry the time in whole seconds: without a suffix, an attempt
            # resumed within the second of the previous one would overwrite its file.
            suffix = f".from_step_{start_step}" if start_step else ""
            self._writer = SummaryWriter(self.logdir, purge_step=start_step or None,
                                         flush_secs=flush_secs, filename_suffix=suffix)

    def log(self, step: int, record: Mapping[str, Any], state: Any = None) -> None:
        """What the train loop writes at a log step: the record's scalars and, given the
        train ``state`` and a mask update since the previous log, the kept-weight
        histograms. Call it on every process (see :meth:`mask_histograms`)."""
        self.scalars(step, record)
        if state is not None and masks_updated_since(record, self._last_logged):
            self.mask_histograms(step, state.params, state.masks)
        self._last_logged = int(step)

    def scalars(self, step: int, record: Mapping[str, Any]) -> list[str]:
        """Writes every numeric scalar of ``record`` under its own key; returns the tags.

        Booleans, strings, arrays of several values and the ``step`` key are skipped.
        """
        if self._writer is None:
            return []
        tags = []
        for key, value in record.items():
            number = _numeric_scalar(value)
            if key == "step" or number is None:
                continue
            self._writer.add_scalar(key, number, int(step))
            tags.append(key)
        self._writer.flush()
        return tags

    def mask_histograms(self, step: int, params: Any, masks: Any) -> None:
        """Histograms ``kept_weights/<block>`` of the magnitudes of the kept weights.

        Call it on every process (see the module docstring).
        """
        if not jax.tree.leaves(masks):  # a dense run: nothing is pruned
            return
        host = _to_host({"params": params, "masks": masks}, fetch=self._writer is not None)
        if self._writer is None:
            return
        for block, values in kept_magnitudes_per_block(host["params"], host["masks"]).items():
            if values.size:
                self._writer.add_histogram(f"{KEPT_WEIGHTS_TAG}/{block}", values, int(step))
        self._writer.flush()

    def image(self, tag: str, step: int, image: Any) -> None:
        """Writes one picture: an [H, W(, C)] array (uint8, or float in [0, 1]), a PNG path
        or PNG bytes, or a matplotlib figure (e.g. :func:`nbjax.visualize.plot_merges`)."""
        if self._writer is None:
            return
        self._writer.add_image(tag, _image_array(image), int(step), dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_writer(config: Any, workdir: str | os.PathLike, start_step: int = 0,
                enabled: bool = True) -> TensorBoardWriter:
    """The writer of a run: on when ``config.train.tensorboard`` (default True) and
    ``enabled``; a run resumed at ``start_step`` > 0 purges the events past it."""
    on = bool(config.train.get("tensorboard", True)) and enabled
    return TensorBoardWriter(workdir, enabled=on, start_step=start_step)


def masks_updated_since(record: Mapping[str, Any], since_step: int) -> bool:
    """Whether a mask update happened in the steps ``since_step`` .. the record's step.

    ``since_step`` is the number of steps taken at the previous log; the record's
    ``pruning/last_update`` is the 0-based index of the step of the last update (-1: none).
    """
    last = _numeric_scalar(record.get("pruning/last_update"))
    return last is not None and last >= since_step


def log_merge_picture(writer: TensorBoardWriter, run: Any, state: Any, step: int,
                      num_images: int = 8) -> bool:
    """Writes the merge picture (:func:`nbjax.visualize.plot_merges`) of a run that merges
    tokens, under the tag ``token_merging/merges``; False (nothing done) otherwise.

    Call it on every process, like :meth:`TensorBoardWriter.mask_histograms`.
    """
    from nbjax import visualize
    from nbjax.model import build as model_build

    model = model_build.build_model(run.config, run.dataset.num_classes)
    if not any(model.merge_r):
        return False
    host = _to_host((state.params, state.masks), fetch=writer.enabled)
    if not writer.enabled:
        return False
    params, masks = host
    figure = visualize.plot_merges(model, params, masks,
                                   run.dataset.test_images[:num_images],
                                   mean=run.dataset.mean, std=run.dataset.std)
    writer.image("token_merging/merges", step, figure)
    return True
