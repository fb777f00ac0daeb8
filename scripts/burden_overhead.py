"""Step time with the burden metrics on and off: the overhead of the every-step metrics.

    python scripts/burden_overhead.py --config configs/mnist_vit4.py --repeats 30

Builds the config's run twice (``burden.enabled`` True and False) on synthetic data of the
config's image shape (the data do not change the step time), compiles both, then times the
two compiled calls *interleaved* (off, on, off, on, ...; each call is
``train.steps_per_call`` steps, timed to ``block_until_ready``), so that a machine shared
with other work slows both alike. Prints the median time per step of each and the overhead
(on a CPU backend also the median CPU time per step, which other work on a shared host
disturbs less).
``burden.every`` is set beyond the run, so only the every-step metrics are timed; the probe
pass of ``pruned_signal`` (which runs every ``burden.every`` steps and at mask updates) is
timed on its own and its amortised cost per step is printed too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nbjax import burden as burden_lib  # noqa: E402
from nbjax import data as data_lib  # noqa: E402
from nbjax import loop  # noqa: E402
from nbjax.config import lock  # noqa: E402


def load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.progress = False
    for item in overrides:
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) \
            else value.lower() in ("1", "true", "yes")
    return config


def synthetic_like(config, num_train: int) -> data_lib.Dataset:
    cfg = data_lib.default_data_config()
    cfg.source = "synthetic"
    cfg.synthetic_num_train, cfg.synthetic_num_test = num_train, 256
    cfg.synthetic_image_size = config.model.image_size
    cfg.synthetic_channels = 3 if "cifar" in config.data.source else 1
    cfg.synthetic_num_classes = 10
    return data_lib.load_dataset(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vit4.py")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each variant")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args()

    base = load_config(args.config, args.set)
    k = base.train.steps_per_call
    dataset = synthetic_like(base, num_train=base.train.batch_size * k * (args.repeats + 4))
    runs = {}
    for enabled in (False, True):
        config = load_config(args.config, args.set)
        config.burden.enabled = enabled
        config.burden.every = 10**9  # no probe pass inside the timed calls
        config.train.num_steps = k * (args.repeats + 4)
        run = loop.build(lock(config), dataset)
        runs[enabled] = [run, run.state]
    order = loop.BatchOrder(len(dataset.train_labels), base.train.batch_size, base.seed)

    cpu_times: dict[bool, list[float]] = {False: [], True: []}

    def call(enabled: bool, c: int) -> float:
        run, state = runs[enabled]
        idx = jax.device_put(order.block(c * k, k))
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = run.train_chunk(state, run.train_images, run.train_labels, idx)
        jax.block_until_ready((state, metrics))
        runs[enabled][1] = state
        cpu_times[enabled].append((time.process_time() - cpu_start) / k)
        return (time.perf_counter() - start) / k

    for enabled in (False, True):  # compile and warm up
        call(enabled, 0)
        call(enabled, 1)
        cpu_times[enabled].clear()
    times: dict[bool, list[float]] = {False: [], True: []}
    for c in range(2, args.repeats + 2):
        for enabled in ((False, True) if c % 2 else (True, False)):
            times[enabled].append(call(enabled, c))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; "
          f"config {args.config} {' '.join(args.set)}; batch {base.train.batch_size}, "
          f"{k} steps per call, {args.repeats} calls each, interleaved")
    print(f"median step time, burden off: {off * 1e3:.2f} ms")
    print(f"median step time, burden on : {on * 1e3:.2f} ms")
    print(f"overhead of the every-step metrics: {100 * (on / off - 1):+.1f} %")
    ratios = [b / a for a, b in zip(times[False], times[True], strict=True)]
    print(f"per-pair ratio on/off: median {statistics.median(ratios):.3f}, "
          f"quartiles {np.quantile(ratios, 0.25):.3f} .. {np.quantile(ratios, 0.75):.3f}")
    if jax.default_backend() == "cpu":  # CPU time: the work done, whatever else the host runs
        c_off, c_on = statistics.median(cpu_times[False]), statistics.median(cpu_times[True])
        print(f"median CPU time per step: off {c_off * 1e3:.2f} ms, on {c_on * 1e3:.2f} ms, "
              f"overhead {100 * (c_on / c_off - 1):+.1f} %")

    # The probe pass of pruned_signal, alone: forward only, one extra matmul per layer.
    run, state = runs[True]
    tracker = burden_lib.make_tracker(run.config, loop.model_lib.build_model(
        run.config, dataset.num_classes), False, run.total_steps, dataset.image_shape)
    images = jnp.asarray(dataset.train_images[: base.train.batch_size], jnp.float32) / 255.0

    @jax.jit
    def probe(params, masks, images):
        _, aux = tracker.probe.apply({"params": params, "masks": masks}, images,
                                     mutable=["stats"])
        return aux

    jax.block_until_ready(probe(state.params, state.masks, images))
    probe_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(probe(state.params, state.masks, images))
        probe_times.append(time.perf_counter() - start)
    p = statistics.median(probe_times)
    every = load_config(args.config, args.set).burden.every
    print(f"probe pass (pruned_signal): {p * 1e3:.2f} ms when it runs; every {every} steps "
          f"that is {100 * p / every / off:.2f} % of a step")


if __name__ == "__main__":
    main()
