"""The benchmark's ``plain_jax`` reference: the minimal dense ``jax.jit`` step of the same model.

No masks, no metrics, plain ``optax.adamw``, one device, one fixed batch and one step per
call: what the model costs without nbjax's step machinery.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nbjax.bench import measure
from nbjax.bench.timing import Timed
from nbjax.bench.variants import Variant, variant_config
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.tome import cost
from nbjax.train import step as train


def prepare(variant: Variant, base: Any, dataset: Any, device: Any, cache: measure.CacheHits,
            model_flops: measure.ModelFlops) -> Timed:
    """Builds and compiles the plain step of ``variant`` (``plain_jax`` or ``plain_jax+bf16``)
    on ``device``; a call takes ``train.steps_per_call`` steps, one dispatch each."""
    config = variant_config(base, variant)
    model = model_build.build_model(config, dataset.num_classes)
    t = config.train
    tx = optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
    batch, k = int(t.batch_size), int(t.steps_per_call)
    x = jax.device_put(data_lib.normalize(dataset.train_images[:batch], dataset.mean,
                                          dataset.std), device)
    y = jax.device_put(jnp.asarray(dataset.train_labels[:batch]), device)
    one = jax.sharding.SingleDeviceSharding(device)
    params = jax.jit(model.init, out_shardings=one)(jax.random.PRNGKey(0), x[:1])["params"]
    opt_state = jax.jit(tx.init, out_shardings=one)(params)
    step = jax.jit(_make_step(model, tx, dataset.num_classes), donate_argnums=(0, 1))
    compiled, compile_info = measure.compile_timed(step, (params, opt_state, x, y), cache)
    info = {"name": variant.name, **compile_info,
            "flops_per_step": cost.cost_analysis(compiled).get("flops"),
            "model_flops_per_step": model_flops.per_step(model, dataset.image_shape, batch),
            "memory": measure.memory_bytes(compiled), "num_devices": 1}
    return Timed(variant.name, _StepLoop(compiled, params, opt_state, x, y, k), k, batch, info,
                 peak_flops=measure.peak_flops(device.device_kind, config.model.dtype))


def _make_step(model: Any, tx: optax.GradientTransformation, num_classes: int) -> Any:
    """(params, opt_state, x, y) -> (params, opt_state, loss): cross-entropy, grad, AdamW."""

    def step(params, opt_state, x, y):
        def loss_fn(p):
            return train.cross_entropy(model.apply({"params": p}, x), y, num_classes)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class _StepLoop:
    """Calls the compiled step ``num_steps`` times on the fixed batch, carrying params and
    optimizer state; returns the seconds (and no mask update)."""

    def __init__(self, compiled: Any, params: Any, opt_state: Any, x: jax.Array, y: jax.Array,
                 num_steps: int) -> None:
        self.compiled, self.params, self.opt_state = compiled, params, opt_state
        self.x, self.y, self.num_steps = x, y, num_steps

    def __call__(self) -> tuple[float, bool]:
        start = time.perf_counter()
        p, o = self.params, self.opt_state
        for _ in range(self.num_steps):
            p, o, loss = self.compiled(p, o, self.x, self.y)
        jax.block_until_ready((p, o, loss))
        elapsed = time.perf_counter() - start
        self.params, self.opt_state = p, o
        return elapsed, False
