"""The masked ViT of the PyTorch reference, as a PyTorch user would write nbjax's ViT.

Imports ``torch`` at the top: only :mod:`nbjax.bench.torch_ref` imports it, and only once
torch is known to be importable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from nbjax.bench.torch_ref import TorchShape


class MaskedLinear(nn.Linear):
    """A linear layer whose weight carries a fixed random mask at ``sparsity``: W * M."""

    def __init__(self, fan_in: int, fan_out: int, sparsity: float) -> None:
        super().__init__(fan_in, fan_out)
        mask = torch.rand(fan_out, fan_in) >= sparsity
        self.register_buffer("mask", mask.to(torch.float32))
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class Block(nn.Module):
    """Pre-LayerNorm block: fused-q/k/v multi-head attention, then a GELU MLP."""

    def __init__(self, shape: TorchShape) -> None:
        super().__init__()
        d, s = shape.hidden_dim, shape.sparsity
        self.num_heads = shape.num_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = MaskedLinear(d, 3 * d, s)
        self.out = MaskedLinear(d, d, s)
        self.fc1 = MaskedLinear(d, shape.mlp_dim, s)
        self.fc2 = MaskedLinear(shape.mlp_dim, d, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Patch embedding (a linear map of the flattened patch), class token, learned position
    embedding, the blocks, a final LayerNorm and the head on the class token."""

    def __init__(self, shape: TorchShape) -> None:
        super().__init__()
        p, d = shape.patch_size, shape.hidden_dim
        self.patch_size = p
        tokens = (shape.image_size // p) ** 2 + 1
        self.embed = nn.Linear(p * p * shape.channels, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.depth))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, shape.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = images.shape
        p = self.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)  # [b, c, H/p, W/p, p, p]
        patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, p * p * c)
        x = self.embed(patches)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, 0])


def build(shape: TorchShape, seed: int, device: str = "cpu"
          ) -> tuple[ViT, torch.optim.AdamW, list[tuple[Any, Any]]]:
    """(model, AdamW, [(weight, mask)]) for ``shape``, on ``device``; weight decay on the 2-D
    weights only. The weights and masks are drawn on the CPU, so every device starts from the
    same ones."""
    torch.manual_seed(seed)
    model = ViT(shape).to(device)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim == 2)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": shape.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=shape.learning_rate)
    masked = [(m.weight, m.mask) for m in model.modules() if isinstance(m, MaskedLinear)]
    return model, optimizer, masked
