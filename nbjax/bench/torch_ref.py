"""The PyTorch eager reference of the benchmark: the same masked ViT train step, in PyTorch.

``python -m nbjax.bench --torch`` times it side by side with the nbjax variants. PyTorch is
*not* a dependency of nbjax (``pip install -e '.[bench]'`` adds it): this module imports
``torch`` only inside its functions, and the model (:mod:`nbjax.bench.torch_vit`) only once
torch is known to be importable. Every block kernel carries a fixed random mask at
``sparsity``, and the pruned weights are zeroed again after each AdamW step, as nbjax's
non-persistent methods do. One step: gather a batch by index from the dataset tensor,
forward, cross-entropy, backward, AdamW, re-mask.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from nbjax.bench.timing import Timed

NAME = "torch_eager"  # the reference's name in the printed table and while timing


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


class TorchStep:
    """One PyTorch eager train step of the masked ViT on ``shape``; call ``run(k)`` to take k.

    The dataset is ``num_examples`` random images held as one float tensor; every step
    gathers a random batch from it by index, as nbjax gathers from its on-device dataset.
    """

    def __init__(self, shape: TorchShape, num_examples: int = 4096, seed: int = 0,
                 device: str = "cpu") -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        from nbjax.bench import torch_vit

        self.shape = shape
        self.device = torch.device(device)
        self.model, self.optimizer, self.masked = torch_vit.build(shape, seed, device)
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


def torch_device() -> str:
    """'cuda' when JAX runs on a GPU and torch sees one too, else 'cpu': the reference runs
    on the same kind of device as the nbjax variants."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def prepare(base: Any, dataset: Any, threads: int = 0) -> Timed:
    """The step of ``base``'s model and batch, ready to time as ``torch_eager``; ``threads``:
    torch's intra-op threads (0: torch's default, one per core)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    m, t = base.model, base.train
    shape = TorchShape(
        image_size=int(m.image_size), channels=int(dataset.image_shape[-1]),
        patch_size=int(m.patch_size), hidden_dim=int(m.hidden_dim), depth=int(m.depth),
        num_heads=int(m.num_heads), mlp_dim=int(m.mlp_dim), num_classes=dataset.num_classes,
        batch_size=int(t.batch_size), sparsity=float(base.pruning.sparsity),
        learning_rate=float(t.learning_rate), weight_decay=float(t.weight_decay))
    step = TorchStep(shape, device=torch_device())
    k = int(t.steps_per_call)
    info = {"name": NAME, "flops_per_step": None, "model_flops_per_step": None,
            "memory": None, "num_devices": None, **step.describe()}
    return Timed(NAME, lambda: (step.run(k), False), k, shape.batch_size, info)
