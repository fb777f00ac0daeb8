"""Entry point: ``python -m nbjax.main --config configs/mnist_vit4.py --workdir DIR``.

Trains, prunes, logs and checkpoints one run; running the same command again in the same work
directory resumes from the latest checkpoint (or returns at once if the run had finished).
Any config field can be changed with ``--config.<key>=<value>``.

Several processes (GPU hosts, CPU processes): add ``--coordinator_address HOST:PORT
--num_processes N --process_id I`` to each (or set ``NBJAX_COORDINATOR_ADDRESS``,
``NBJAX_NUM_PROCESSES``, ``NBJAX_PROCESS_ID``); on a Cloud TPU pod slice nothing is needed.
See :mod:`nbjax.parallel.distributed` and ``docs/scaling.md``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nbjax.parallel import distributed
from nbjax.parallel import mesh as sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results "
                                "(a local path or gs://...).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0 (env NBJAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: number of processes (env NBJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's index (env NBJAX_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", None, list(distributed.MODES),
    "When to call jax.distributed.initialize(): auto (explicit settings or a Cloud TPU VM), "
    "on (always; JAX auto-detects SLURM/Open MPI/TPU), off (env NBJAX_DISTRIBUTED; "
    "default auto).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value, _DISTRIBUTED.value)
    except ValueError as err:
        sys.exit(f"error: {err}")
    import jax

    from nbjax.parallel import runtime

    runtime.enable_compilation_cache()
    if joined.call:
        print(f"nbjax: process {jax.process_index()} of {jax.process_count()} "
              f"({joined.reason}): {jax.local_device_count()} local of {jax.device_count()} "
              f"{jax.devices()[0].platform} devices", file=sys.stderr, flush=True)

    from nbjax import config as config_lib
    from nbjax.train import loop

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except ValueError as err:
        sys.exit(f"error: {err}")
    final = loop.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(final, indent=2))


def run() -> None:
    """Console-script entry (``nbjax-train``)."""
    sharding.use_all_cpu_cores()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
