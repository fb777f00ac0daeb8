"""The PyTorch eager reference of the benchmark: the same masked ViT train step, in PyTorch.

``python -m nbjax.bench --torch`` times it side by side with the nbjax variants (see
:mod:`nbjax.bench.runner`). PyTorch is *not* a dependency of nbjax: this module imports ``torch``
only inside :func:`available` and :class:`TorchStep`, and ``pip install torch`` (a CPU wheel
is enough) is the user's choice (``pip install -e '.[bench]'``).

The model is what a PyTorch user would write for the nbjax ViT (SPEC.md, "Model"): patch
embedding (a linear map of the flattened patch), class token, learned position embedding,
``depth`` pre-LayerNorm blocks with multi-head self-attention (one fused q/k/v projection,
``F.scaled_dot_product_attention``) and a GELU MLP, final LayerNorm, head on the class
token. Every block kernel (q/k/v, attention output, fc1, fc2) carries a fixed random mask at
``sparsity`` (90 % by default), applied as ``W * M`` in the forward pass; after each AdamW
step the pruned weights are zeroed again, as nbjax's non-persistent methods do. One step is:
gather a batch by index from the (synthetic) dataset tensor, forward, cross-entropy,
backward, AdamW, re-mask.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


def available() -> bool:
    """Whether ``torch`` can be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TorchShape:
    """The ViT and batch of one benchmark shape (the fields of ``config.model``)."""

    image_size: int = 28
    channels: int = 1
    patch_size: int = 7
    hidden_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 256
    num_classes: int = 10
    batch_size: int = 128
    sparsity: float = 0.9
    learning_rate: float = 1e-3
    weight_decay: float = 0.05


def _build(shape: TorchShape, seed: int, device: str = "cpu"
           ) -> tuple[Any, Any, list[tuple[Any, Any]]]:
    """(model, optimizer, [(weight, mask)]) for ``shape``, on ``device``.

    The weights and masks are drawn on the CPU, so every device starts from the same ones.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    torch.manual_seed(seed)

    class MaskedLinear(nn.Linear):
        def __init__(self, fan_in: int, fan_out: int, sparsity: float) -> None:
            super().__init__(fan_in, fan_out)
            mask = torch.rand(fan_out, fan_in) >= sparsity
            self.register_buffer("mask", mask.to(torch.float32))
            with torch.no_grad():
                self.weight.mul_(self.mask)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight * self.mask, self.bias)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, s = shape.hidden_dim, shape.sparsity
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv = MaskedLinear(d, 3 * d, s)
            self.out = MaskedLinear(d, d, s)
            self.fc1 = MaskedLinear(d, shape.mlp_dim, s)
            self.fc2 = MaskedLinear(shape.mlp_dim, d, s)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            h = shape.num_heads
            qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            p, d = shape.patch_size, shape.hidden_dim
            tokens = (shape.image_size // p) ** 2 + 1
            self.embed = nn.Linear(p * p * shape.channels, d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(shape.depth))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, shape.num_classes)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            b, c, hh, ww = images.shape
            p = shape.patch_size
            patches = images.unfold(2, p, p).unfold(3, p, p)  # [b, c, H/p, W/p, p, p]
            patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, p * p * c)
            x = self.embed(patches)
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x)[:, 0])

    model = ViT().to(device)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim == 2)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": shape.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=shape.learning_rate)
    masked = [(m.weight, m.mask) for m in model.modules() if isinstance(m, MaskedLinear)]
    return model, optimizer, masked


class TorchStep:
    """One PyTorch eager train step of the masked ViT on ``shape``; call ``run(k)`` to take k.

    The dataset is ``num_examples`` random images held as one float tensor; every step
    gathers a random batch from it by index, as nbjax gathers from its on-device dataset.
    """

    def __init__(self, shape: TorchShape, num_examples: int = 4096, seed: int = 0,
                 device: str = "cpu") -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        self.shape = shape
        self.device = torch.device(device)
        self.model, self.optimizer, self.masked = _build(shape, seed, device)
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(num_examples, shape.channels, shape.image_size,
                             shape.image_size, generator=generator)
        labels = torch.randint(0, shape.num_classes, (num_examples,), generator=generator)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        # The batch indices are drawn where the data lives.
        self.generator = (generator if self.device.type == "cpu"
                          else torch.Generator(device=self.device).manual_seed(seed))
        self._torch, self._f = torch, F
        self.losses: list[float] = []

    def step(self) -> Any:
        """One train step; returns the loss tensor (not synchronised to a float)."""
        torch = self._torch
        idx = torch.randint(0, self.images.shape[0], (self.shape.batch_size,),
                            generator=self.generator, device=self.device)
        logits = self.model(self.images[idx])
        loss = self._f.cross_entropy(logits, self.labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.mul_(mask)
        return loss

    def run(self, num_steps: int) -> float:
        """Takes ``num_steps`` steps; returns their wall time in seconds.

        On the CPU eager steps are synchronous; on CUDA the kernels are queued, so the clock
        stops only after ``torch.cuda.synchronize()``.
        """
        start = time.perf_counter()
        loss = None
        for _ in range(num_steps):
            loss = self.step()
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if loss is not None:
            self.losses.append(float(loss.detach()))
        return elapsed

    def describe(self) -> dict[str, Any]:
        """Version, threads and the shape, for the benchmark's JSON."""
        return {"torch_version": self._torch.__version__,
                "device": str(self.device),
                "num_threads": self._torch.get_num_threads(),
                "shape": dataclasses.asdict(self.shape)}
