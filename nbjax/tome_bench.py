"""Training throughput with and without token merging, measured interleaved.

    python -m nbjax.tome_bench --config configs/mnist_vit4.py --reps 15

Builds the config's run once with ``mitigation.token_merging.mode=off`` and once with
``single_pass`` at ``--keep_ratio`` (default 0.5), on synthetic data of the config's image
shape (throughput does not depend on the pixels; ``--real_data`` uses the config's dataset),
compiles both, then times them alternately (ABAB..., so a shared, noisy machine slows both
alike) and reports the median over ``--reps`` of:

* ``step``: one compiled train call (``train.steps_per_call`` full train steps: augmentation,
  forward, backward, optimizer, pruning update, metrics), as images/s;
* ``fwd+bwd``: ``value_and_grad`` of the loss alone on one batch, as images/s.

Extra ``--set key=value`` arguments change the config for both runs (e.g.
``--set model.patch_size=4``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbjax import config as config_lib
from nbjax import data as data_lib
from nbjax import loop, train
from nbjax import model as model_lib


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else (
        str(value).lower() in ("1", "true", "yes"))


def _variant(base: ml_collections.ConfigDict, mode: str, keep_ratio: float
             ) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.mitigation.token_merging.mode = mode
    config.mitigation.token_merging.keep_ratio = keep_ratio
    config.mitigation.token_merging.r = 0
    config.train.progress = False
    return config_lib.lock(config)


def _fwd_bwd(run: loop.Run) -> tuple[Any, tuple[Any, ...]]:
    """A jitted value_and_grad of the loss on one fixed batch, and its arguments."""
    model = model_lib.build_model(run.config, run.dataset.num_classes)
    batch = run.config.train.batch_size
    images = data_lib.normalize(run.dataset.train_images[:batch], run.dataset.mean,
                                run.dataset.std)
    labels = jnp.asarray(run.dataset.train_labels[:batch])

    def loss(params, masks, x, y):
        logits, _ = model.apply({"params": params, "masks": masks}, x, mutable=["stats"])
        return train.cross_entropy(logits, y, run.dataset.num_classes)

    # Copies: the train calls donate (and so delete) the run's state buffers.
    params, masks = jax.tree.map(jnp.copy, (run.state.params, run.state.masks))
    return jax.jit(jax.value_and_grad(loss)), (params, masks, images, labels)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m nbjax.tome_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vit4.py")
    parser.add_argument("--keep_ratio", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--real_data", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    base = load_config_file(args.config)
    for item in args.set:
        key, value = item.split("=", 1)
        _set(base, key, value)
    if not args.real_data:
        size = base.model.image_size
        base.data.source = "synthetic"
        base.data.synthetic_image_size = size
        base.data.synthetic_num_train = max(4 * base.train.batch_size, 1024)
        base.data.synthetic_num_test = base.train.eval_batch_size
    dataset = data_lib.load_dataset(base.data)
    names = ("off", "single_pass")
    runs = {n: loop.build(_variant(base, n, args.keep_ratio), dataset) for n in names}
    k, batch = base.train.steps_per_call, base.train.batch_size
    order = loop.BatchOrder(len(dataset.train_labels), batch, base.seed)
    idx = jax.device_put(order.block(0, k))
    fb = {n: _fwd_bwd(runs[n]) for n in names}
    states = {n: runs[n].state for n in names}

    def time_step(n: str) -> float:
        r = runs[n]
        t0 = time.perf_counter()
        states[n], m = r.train_chunk(states[n], r.train_images, r.train_labels, idx)
        jax.block_until_ready((states[n], m))
        return time.perf_counter() - t0

    def time_fb(n: str) -> float:
        f, a = fb[n]
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        return time.perf_counter() - t0

    for n in names:  # compile and warm up
        for _ in range(2):
            time_step(n)
            time_fb(n)
    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "fwd+bwd": []} for n in names}
    for rep in range(args.reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            times[n]["step"].append(time_step(n))
            times[n]["fwd+bwd"].append(time_fb(n))
    result = {n: {"step_img_s": k * batch / statistics.median(times[n]["step"]),
                  "fwd_bwd_img_s": batch / statistics.median(times[n]["fwd+bwd"])}
              for n in names}
    tokens = model_lib.num_input_tokens(base)
    print(f"config {args.config} {' '.join(args.set)}: {tokens} tokens, batch {batch}, "
          f"{k} steps/call, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"median of {args.reps} interleaved reps")
    print(f"{'mode':<14}{'train img/s':>14}{'fwd+bwd img/s':>16}")
    for n in names:
        print(f"{n:<14}{result[n]['step_img_s']:>14.0f}{result[n]['fwd_bwd_img_s']:>16.0f}")
    speed = {key: result["single_pass"][key] / result["off"][key] for key in result["off"]}
    print(f"{'speedup':<14}{speed['step_img_s']:>13.2f}x{speed['fwd_bwd_img_s']:>15.2f}x")
    spread = {n: np.percentile(times[n]["step"], [25, 75]) for n in names}
    print("step time IQR (s): " + ", ".join(f"{n} {a:.4f}-{b:.4f}"
                                            for n, (a, b) in spread.items()))
    result["speedup"] = speed
    return result


if __name__ == "__main__":
    main()
