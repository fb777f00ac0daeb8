"""The command line of the benchmark: flags in, :func:`nbjax.bench.runner.run_bench`, ``--json``
out (``python -m nbjax.bench``, or ``nbjax-bench`` once installed)."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from nbjax import config as config_lib
from nbjax import errors
from nbjax.bench import report as bench_report
from nbjax.bench.runner import run_bench
from nbjax.bench.variants import DEFAULT_VARIANTS
from nbjax.parallel import mesh as sharding_lib
from nbjax.parallel import runtime


def main(argv: list[str]) -> None:
    """absl entry: validates the config, runs :func:`run_bench`, writes ``--json``."""
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    runtime.enable_compilation_cache()
    f = flags.FLAGS
    config = f.config
    try:
        config_lib.validate(config)
    except ValueError as err:
        raise errors.UserError(str(err)) from err
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    sizes = population_sizes(f.population)
    # With --population alone, the single run of the member variant is the only variant.
    variants = [f.population_variant] if sizes and not f["variants"].present else f.variants
    out = run_bench(config, variants, f.steps, f.warmup, f.torch, f.real_data, f.devices,
                    torch_threads=f.torch_threads,
                    config_path=f["config"].config_filename, overrides=overrides,
                    population=sizes, population_variant=f.population_variant)
    if f.json:
        bench_report.write_json(out, f.json)
        print(f"wrote {f.json}")


def population_sizes(values: list[str]) -> list[int]:
    """``--population 1,2,4`` -> [1, 2, 4]; UserError on anything but positive integers."""
    try:
        sizes = [int(v) for v in values]
    except ValueError as err:
        raise errors.UserError(f"--population {','.join(values)}: {err}") from err
    if any(n < 1 for n in sizes):
        raise errors.UserError(f"--population {','.join(values)}: sizes must be >= 1")
    return sizes


def define_flags() -> None:
    """Defines the benchmark's flags, as key flags of the program, so ``--help`` lists them."""
    config_flags.DEFINE_config_file("config", "configs/mnist_vit4.py",
                                    "Experiment config (.py file).", lock_config=True)
    flags.DEFINE_list("variants", list(DEFAULT_VARIANTS), "Variants to time, comma-separated: "
                      "plain_jax, dense or a pruning method, each with optional +burden, "
                      "+tome, +bf16.")
    flags.DEFINE_integer("steps", 200, "Timed steps per variant (whole calls).")
    flags.DEFINE_integer("warmup", 2, "Untimed calls per variant after compiling.")
    flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
    flags.DEFINE_bool("torch", False, "Also time the PyTorch eager step (if importable).")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for --torch (0: torch's "
                         "default, one per core).")
    flags.DEFINE_bool("real_data", False, "Use the config's dataset, not synthetic data.")
    flags.DEFINE_integer("devices", 0, "Use only the first N devices (0 = all).")
    flags.DEFINE_list("population", [], "Population sizes N, comma-separated (e.g. 1,2,4,8): "
                      "each N members of --population_variant trained as one vmapped program, "
                      "timed beside that variant's single run.")
    flags.DEFINE_string("population_variant", "gmp+burden", "The members' variant (default: "
                        "nbjax's full step); with --population and no --variants, the only "
                        "variant timed on its own.")
    for name in ("config", "variants", "steps", "warmup", "json", "torch", "torch_threads",
                 "real_data", "devices", "population", "population_variant"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def run() -> None:
    """Console entry: one XLA device per CPU core (before JAX starts), then the benchmark."""
    sharding_lib.use_all_cpu_cores()
    define_flags()
    errors.run_cli(lambda: app.run(main))
