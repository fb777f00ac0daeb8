"""Which patches did token merging merge? A picture for a few test images.

For each image, two panels (as in the ToMe paper's figure):

* top: the input with every merged group (a token standing for more than one patch) tinted in
  its own colour, and the group boundaries drawn; untinted patches were not merged;
* bottom: every token's patches filled with the token's mean pixel value, boundaries drawn:
  roughly what the tokens after merging "see".

Groups are read from the model's source map (``return_source=True``: merged token -> input
patches), so the picture shows exactly what the forward pass did, after all of the model's
merges (every block for ``every_layer``).

From Python (a notebook)::

    fig = visualize.plot_merges(model, params, masks, images_u8, mean=ds.mean, std=ds.std,
                                out="merges.png")

From the shell, for a run directory (restores its config.json and latest checkpoint)::

    python -m nbjax.visualize --workdir runs/mnist_vit4_tome --num_images 8 --out merges.png
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from etils import epath
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from nbjax import errors
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.model import vit as model_lib

PyTree = Any


def merge_groups(model: model_lib.ViT, params: PyTree, masks: PyTree | None,
                 images: jax.Array, merge_r: Sequence[int] | None = None) -> np.ndarray:
    """The token each input patch ended in: int array [B, num_patches] (row-major patches).

    ``images`` are model inputs (normalised float). ``merge_r`` overrides the model's merge
    schedule (e.g. to see what a model trained without merging would merge). Token indices
    are those of the final token order; patches with the same index were merged together.
    """
    overrides: dict[str, Any] = {"collect_stats": False, "token_stats": False}
    if merge_r is not None:
        overrides["merge_r"] = tuple(int(r) for r in merge_r)
    model = model.clone(**overrides)
    variables = {"params": params}
    if masks is not None:
        variables["masks"] = masks
    apply = jax.jit(lambda v, x: model.apply(v, x, return_source=True)[1])
    source = np.asarray(apply(variables, jnp.asarray(images, jnp.float32)))  # [B, T', N]
    groups = np.argmax(source, axis=1)  # [B, N]: the token holding each input token
    return groups[:, 1:]  # drop the class token's column


def _boundaries(groups: np.ndarray, grid: int, patch: int) -> list[list[tuple[float, float]]]:
    """Line segments (pixel coordinates) between neighbouring patches of different groups."""
    g = groups.reshape(grid, grid)
    segments = []
    for i in range(grid):
        for j in range(grid):
            if j + 1 < grid and g[i, j] != g[i, j + 1]:
                x = (j + 1) * patch - 0.5
                segments.append([(x, i * patch - 0.5), (x, (i + 1) * patch - 0.5)])
            if i + 1 < grid and g[i, j] != g[i + 1, j]:
                y = (i + 1) * patch - 0.5
                segments.append([(j * patch - 0.5, y), ((j + 1) * patch - 0.5, y)])
    return segments


def _to_display(images: np.ndarray) -> np.ndarray:
    """[B, H, W, C] -> float [0, 1], RGB (grayscale repeated) for drawing."""
    x = np.asarray(images, np.float32)
    if np.issubdtype(np.asarray(images).dtype, np.integer):
        x = x / 255.0
    else:
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-6)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.clip(x[..., :3], 0.0, 1.0)


def draw_merges(images: np.ndarray, groups: np.ndarray, patch_size: int,
                title: str | None = None) -> Figure:
    """The two-row figure (tinted groups, mean colour per token) for images [B, H, W, C].

    ``groups`` [B, num_patches] from :func:`merge_groups`; images in display units (uint8, or
    float, rescaled per image).
    """
    disp = _to_display(images)
    num, height, width, _ = disp.shape
    grid, p = height // patch_size, patch_size
    if grid * grid != groups.shape[1] or width != height:
        raise ValueError(f"{groups.shape[1]} patches do not tile {height}x{width} images "
                         f"with patch {patch_size}")
    cmap = matplotlib.colormaps["tab20"]
    # The object-oriented API (no pyplot): no global backend or figure state is touched, so
    # this runs headless and in a notebook alike.
    fig = Figure(figsize=(1.6 * num + 0.4, 3.6))
    axes = fig.subplots(2, num, squeeze=False)
    for b in range(num):
        g = groups[b]
        ids, counts = np.unique(g, return_counts=True)
        multi = {int(t): k for k, t in enumerate(ids[counts > 1])}
        per_pixel = np.kron(g.reshape(grid, grid), np.ones((p, p), int))  # [H, W] token id
        tint = np.zeros((height, width, 4), np.float32)
        mean_img = np.zeros_like(disp[b])
        for t in ids:
            where = per_pixel == t
            mean_img[where] = disp[b][where].mean(axis=0)
            if int(t) in multi:
                tint[where] = (*cmap(multi[int(t)] % 20)[:3], 0.5)
        segments = _boundaries(g, grid, p)
        for row, (ax, img) in enumerate(((axes[0, b], disp[b]), (axes[1, b], mean_img))):
            ax.imshow(img, interpolation="nearest")
            if row == 0:
                ax.imshow(tint, interpolation="nearest")
            ax.add_collection(LineCollection(segments, colors="yellow" if row else "white",
                                             linewidths=1.2))
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        # The class token is never merged: it is the one token more than the patch groups.
        axes[0, b].set_title(f"{len(ids) + 1} tokens\n{len(multi)} merged groups", fontsize=8)
    axes[0, 0].set_ylabel("merged groups", fontsize=8)
    axes[1, 0].set_ylabel("mean per token", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_merges(model: model_lib.ViT, params: PyTree, masks: PyTree | None,
                images: np.ndarray, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, merge_r: Sequence[int] | None = None,
                out: str | os.PathLike | None = None,
                title: str | None = None) -> Figure:
    """Draws which patches ``model`` merges for ``images`` and optionally saves a PNG.

    Args:
      model, params, masks: the ViT (e.g. ``model.build_model(config, n)``) and a train
        state's ``params`` and ``masks``.
      images: uint8 [B, H, W, C] dataset images (normalised here with ``mean``/``std``, the
        dataset's, as the train step does), or float images already normalised (then
        ``mean``/``std`` are not needed).
      merge_r: override of the model's merge schedule (default: the model's own).
      out: PNG path to write (the figure is also returned).
    """
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        if mean is None or std is None:
            raise ValueError("uint8 images need the dataset's mean and std to be normalised")
        inputs = data_lib.normalize(images, mean, std)
    else:
        inputs = jnp.asarray(images, jnp.float32)
    groups = merge_groups(model, params, masks, inputs, merge_r)
    if title is None:
        schedule = tuple(model.merge_r) if merge_r is None else tuple(merge_r)
        title = f"token merging, r per block {list(schedule)}"
    fig = draw_merges(images, groups, model.patch_size, title)
    if out is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        epath.Path(out).write_bytes(buf.getvalue())
    return fig


def _update(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if key not in node:
            warnings.warn(f"config.json key {prefix}{key} is not in the current schema; ignored",
                          stacklevel=3)
        elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _update(node[key], value, f"{prefix}{key}.")
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) else value


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir``: its config.json, plus the changes recorded in
    config_changes.jsonl since, on top of the current defaults."""
    from nbjax import config as config_lib
    from nbjax.train import workdir as workdir_lib

    path = epath.Path(workdir) / workdir_lib.CONFIG_NAME
    if not path.exists():
        raise errors.NotFoundError(f"{workdir} has no {workdir_lib.CONFIG_NAME}",
                               "give the --workdir of a run started by python -m nbjax.main")
    config = config_lib.base_config()
    _update(config, json.loads(path.read_text()))
    stored = workdir_lib.stored_config(epath.Path(workdir)) or {}
    schema = config_lib.flat_items(config)
    for key, value in stored.items():
        if key in schema and value != schema[key]:  # a change recorded after config.json
            config_lib.set_value(config, key,
                                 tuple(value) if isinstance(schema[key], tuple) else value)
    return config_lib.lock(config)


def restore_run(workdir: str | os.PathLike,
                config: ml_collections.ConfigDict | None = None) -> tuple[Any, Any]:
    """``(run, state)``: the built run (:func:`nbjax.train.loop.build`) and its newest good
    checkpoint (a damaged newer one is skipped with a warning)."""
    import sys

    from nbjax.train import checkpoint as checkpoint_lib
    from nbjax.train import loop

    config = load_run_config(workdir) if config is None else config
    run = loop.build(config)
    ckpt = checkpoint_lib.Checkpointer(epath.Path(workdir) / "checkpoints")
    try:
        restored = ckpt.restore_latest_good(checkpoint_lib.abstract_like(run.state),
                                            lambda line: print(line, file=sys.stderr),
                                            set_aside=False)
    finally:
        ckpt.close()
    if restored is None:
        raise errors.NotFoundError(f"{workdir} has no checkpoint yet",
                               "train it first (python -m nbjax.main ... --workdir WORKDIR)")
    return run, restored[0]


def main(argv: Sequence[str] | None = None) -> str:
    """CLI: restores a run and writes its merge picture; returns the PNG path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nbjax.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (config.json, "
                        "checkpoints/)")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/merges.png)")
    parser.add_argument("--keep_ratio", type=float, default=None,
                        help="draw a single-pass merge at this keep ratio instead of the "
                             "run's own schedule (e.g. for a run trained without merging)")
    args = parser.parse_args(argv)

    run, state = restore_run(args.workdir)
    model = model_build.build_model(run.config, run.dataset.num_classes)
    merge_r = None
    if args.keep_ratio is not None:
        from nbjax.tome import merge as tome

        r = tome.single_pass_r(model_build.num_input_tokens(run.config), args.keep_ratio)
        merge_r = [r] + [0] * (len(model.merge_r) - 1)
    elif not any(model.merge_r):
        warnings.warn("this run does not merge tokens (mode off): every patch is its own "
                      "token; pass --keep_ratio to see what single-pass merging would do",
                      stacklevel=1)
    images = run.dataset.test_images[: args.num_images]
    params, masks = jax.device_get((state.params, state.masks))
    out = args.out or os.fspath(epath.Path(args.workdir) / "merges.png")
    plot_merges(model, params, masks, images, mean=run.dataset.mean, std=run.dataset.std,
                merge_r=merge_r, out=out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    errors.run_cli(main)
