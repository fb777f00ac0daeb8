"""Cost accounting for token merging: tokens per block and forward FLOPs per image.

Two counts, side by side, for the run's model with its merge schedule and for the same model
without merging:

* **compiled**: XLA's own count, ``cost_analysis()["flops"]`` of the jit-compiled forward pass
  (batch :data:`COST_BATCH`, divided by the batch). It counts every operation XLA emits:
  matmuls (2 per multiply-add), layer norms, softmax, GELU, the matching and the merge.
* **analytic**: the matmuls only, from :func:`nbjax.tome.merge.block_flops` split into attention
  (on the tokens entering the block) and MLP (on the tokens left after the block's merge),
  plus the patch embedding, the matching's similarity matrix and the head.

The analytic count is a little below the compiled one (it leaves out the element-wise work);
tests/test_token_merging.py checks that they agree within :data:`ANALYTIC_TOLERANCE` on the
default MNIST ViT.
:func:`startup_report` prints the table at the start of a run and writes ``flops.json`` in
the work directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from nbjax.model import build as model_build
from nbjax.model import vit as model_lib
from nbjax.tome import merge as tome

COST_BATCH = 8  # batch of the compiled forward whose FLOPs are divided by it
# |compiled - analytic| / compiled: about 0.04 for the default MNIST ViT (width 64, MLP 256);
# narrower models have a larger element-wise share (the width-16 smoke ViT: about 0.2).
ANALYTIC_TOLERANCE = 0.10


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (``flops``, ``bytes accessed``, ...), or ``{}``
    where the backend has none. jax 0.10 returns a dict; older versions returned a list with
    one dict per device, of which the first is read."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return {}
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


def compiled_forward_flops(model: model_lib.ViT, image_shape: Sequence[int],
                           batch: int = COST_BATCH) -> float | None:
    """Forward FLOPs per image of ``model`` by XLA's cost analysis of the compiled forward.

    Nothing is run: parameters are abstract (``jax.eval_shape``), the forward is lowered and
    compiled for a ``[batch, *image_shape]`` float32 input. Statistics are switched off and no
    masks are passed, so the count is the model's own (a dense forward: masked weights cost
    the same FLOPs). None when the backend has no cost analysis.
    """
    model = model.clone(collect_stats=False, token_stats=False)
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    compiled = jax.jit(model.apply).lower(variables, x).compile()
    flops = cost_analysis(compiled).get("flops")
    return None if flops is None else flops / batch


def analytic_forward_flops(merge_r: Sequence[int], *, num_tokens: int, hidden_dim: int,
                           mlp_dim: int, num_heads: int, patch_size: int, channels: int,
                           num_classes: int) -> int:
    """Matmul FLOPs per image of the nbjax ViT's forward with ``merge_r[l]`` merged in block l.

    Block l runs attention on the tokens it receives and, after merging, its MLP on the tokens
    left; :func:`nbjax.tome.merge.block_flops` with ``mlp_ratio=0`` is the attention part. A merging
    block also computes the [A, B] cosine similarities of the keys (head dimension).
    """
    d = hidden_dim
    ratio = mlp_dim / hidden_dim
    head_dim = hidden_dim // num_heads
    flops = 2 * (num_tokens - 1) * patch_size * patch_size * channels * d  # patch embedding
    t = num_tokens
    after = tome.tokens_per_block(num_tokens, list(merge_r))
    for t_out in after:
        flops += tome.block_flops(t, d, mlp_ratio=0.0)  # qkv, scores, values, out projection
        if t_out < t:
            flops += 2 * ((t + 1) // 2) * (t // 2) * head_dim  # matching similarities
        flops += tome.block_flops(t_out, d, ratio) - tome.block_flops(t_out, d, 0.0)  # MLP
        t = t_out
    flops += 2 * d * num_classes  # head
    return int(flops)


@dataclasses.dataclass
class CostReport:
    """Tokens per block and forward FLOPs per image, with and without the merge schedule."""

    mode: str
    merge_r: list[int]
    tokens_in: int  # tokens entering block 0 (patches + class token)
    tokens_per_block: list[int]  # tokens each block hands on, after its merge
    compiled_merged: float | None
    compiled_unmerged: float | None
    analytic_merged: int
    analytic_unmerged: int

    @staticmethod
    def _saving(merged: float | None, unmerged: float | None) -> float | None:
        if merged is None or not unmerged:
            return None
        return 1.0 - merged / unmerged

    @property
    def compiled_saving(self) -> float | None:
        """Share of the compiled forward FLOPs that merging saves."""
        return self._saving(self.compiled_merged, self.compiled_unmerged)

    @property
    def analytic_saving(self) -> float:
        """Share of the analytic forward FLOPs that merging saves."""
        return self._saving(self.analytic_merged, self.analytic_unmerged) or 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what ``flops.json`` holds)."""
        out = dataclasses.asdict(self)
        out["compiled_saving"] = self.compiled_saving
        out["analytic_saving"] = self.analytic_saving
        return out

    def table(self) -> str:
        """A short human-readable table of the report."""
        depth = len(self.tokens_per_block)
        tokens_into = [self.tokens_in, *self.tokens_per_block[:-1]]
        rows = [
            f"token merging: mode={self.mode}, r per block {self.merge_r}",
            f"{'block':<22}" + "".join(f"{i:>6}" for i in range(depth)),
            f"{'tokens in (attention)':<22}" + "".join(f"{t:>6}" for t in tokens_into),
            f"{'tokens out (MLP)':<22}" + "".join(f"{t:>6}" for t in self.tokens_per_block),
            f"{'forward FLOPs/image':<22}{'compiled (XLA)':>16}{'analytic (matmuls)':>20}",
        ]

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value / 1e6:.3f} M"

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f} %"

        rows.append(f"{'  unmerged':<22}{fmt(self.compiled_unmerged):>16}"
                    f"{fmt(self.analytic_unmerged):>20}")
        if any(self.merge_r):
            rows.append(f"{'  merged':<22}{fmt(self.compiled_merged):>16}"
                        f"{fmt(self.analytic_merged):>20}")
            rows.append(f"{'  saving':<22}{pct(self.compiled_saving):>16}"
                        f"{pct(self.analytic_saving):>20}")
        return "\n".join(rows)


def cost_report(config: ml_collections.ConfigDict, num_classes: int,
                image_shape: Sequence[int], compiled: bool = True) -> CostReport:
    """The :class:`CostReport` of the model ``config`` describes (``compiled=False``: analytic
    only, nothing is compiled)."""
    model = model_build.build_model(config, num_classes)
    merge_r = [int(r) for r in model.merge_r]
    depth = len(merge_r)
    tokens_in = model_build.num_input_tokens(config)
    m = config.model
    kw = dict(num_tokens=tokens_in, hidden_dim=m.hidden_dim, mlp_dim=m.mlp_dim,
              num_heads=m.num_heads, patch_size=m.patch_size, channels=int(image_shape[-1]),
              num_classes=num_classes)
    merging = any(merge_r)
    c_unmerged = c_merged = None
    if compiled:
        c_unmerged = compiled_forward_flops(model.clone(merge_r=(0,) * depth), image_shape)
        c_merged = compiled_forward_flops(model, image_shape) if merging else c_unmerged
    a_unmerged = analytic_forward_flops([0] * depth, **kw)
    a_merged = analytic_forward_flops(merge_r, **kw) if merging else a_unmerged
    return CostReport(mode=config.mitigation.token_merging.mode, merge_r=merge_r,
                      tokens_in=tokens_in,
                      tokens_per_block=tome.tokens_per_block(tokens_in, merge_r),
                      compiled_merged=c_merged, compiled_unmerged=c_unmerged,
                      analytic_merged=a_merged, analytic_unmerged=a_unmerged)


def startup_report(config: ml_collections.ConfigDict, num_classes: int,
                   image_shape: Sequence[int], workdir: str | os.PathLike | None = None,
                   print_fn: Callable[[str], Any] | None = print) -> CostReport:
    """Computes the :class:`CostReport`, prints its table and writes ``workdir/flops.json``.

    Called once by :func:`nbjax.train.loop.train_and_evaluate` before training. A backend whose
    compiler has no cost analysis (or fails at it) gets the analytic count alone.
    """
    try:
        report = cost_report(config, num_classes, image_shape)
    except Exception as err:  # noqa: BLE001 - accounting must never stop a run
        report = cost_report(config, num_classes, image_shape, compiled=False)
        if print_fn is not None:
            print_fn(f"(no compiled cost analysis: {type(err).__name__}: {err})")
    if print_fn is not None:
        print_fn(report.table())
    if workdir is not None:
        path = epath.Path(workdir) / "flops.json"
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
        tmp.replace(path)
    return report
