"""Entry point: ``python -m nbjax.main --config configs/mnist_vit4.py --workdir DIR``.

Trains, prunes, logs and checkpoints one run; running the same command again in the same work
directory resumes from the latest checkpoint (or returns at once if the run had finished).
Any config field can be changed with ``--config.<key>=<value>``; ``--help`` lists them all.
An error the user can fix is one line (``--verbose`` adds the traceback); what nbjax
guarantees on signals, full disks and damaged checkpoints is in ``docs/reliability.md``.

Several processes (GPU hosts, CPU processes): add ``--coordinator_address HOST:PORT
--num_processes N --process_id I`` to each (or set ``NBJAX_COORDINATOR_ADDRESS``,
``NBJAX_NUM_PROCESSES``, ``NBJAX_PROCESS_ID``); on a Cloud TPU pod slice nothing is needed.
See :mod:`nbjax.parallel.distributed` and ``docs/scaling.md``.
"""

from __future__ import annotations

import json
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from nbjax import errors
from nbjax.parallel import distributed
from nbjax.parallel import mesh as sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results "
                                "(a local path or gs://...).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even though keys that change the training trajectory differ from the run's "
    "stored config; the change is recorded in WORKDIR/config_changes.jsonl.")
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
_OWN_FLAGS = (_CONFIG, _WORKDIR, _ALLOW_CONFIG_CHANGE, _COORDINATOR, _NUM_PROCESSES,
              _PROCESS_ID, _DISTRIBUTED)
_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
_USAGE = ("usage: python -m nbjax.main --config FILE --workdir DIR [--config.KEY=VALUE ...] "
          "[--allow_config_change] [--verbose]")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}",
                               "flags take the form --name=value; see --help")
    try:
        joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value, _DISTRIBUTED.value)
    except ValueError as err:
        raise errors.UserError(str(err), "check the multi-process flags (see --help)") from err
    import jax

    from nbjax.parallel import runtime

    runtime.enable_compilation_cache()
    if joined.call:
        print(f"nbjax: process {jax.process_index()} of {jax.process_count()} "
              f"({joined.reason}): {jax.local_device_count()} local of {jax.device_count()} "
              f"{jax.devices()[0].platform} devices", file=sys.stderr, flush=True)

    from nbjax.train import loop

    errors.quiet_library_logs()  # absl's flag parsing has set its own level
    final = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                    allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    if jax.process_index() == 0:
        print(json.dumps(final, indent=2))


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one given)."""
    value = None
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{name}", arg) and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            value = arg.split("=", 1)[1]
    return value


def _override_keys(argv: list[str]) -> list[str]:
    """The dotted keys of every ``--config.KEY=VALUE`` (or ``--noconfig.KEY``) in ``argv``."""
    return [m.group(1) for arg in argv
            if (m := re.match(r"--?(?:no)?config\.([^=]+)", arg))]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after checking what it would report as a traceback: the config
    file and every ``--config.KEY``. Every failure is a one-line UserError."""
    from nbjax import config as config_lib

    for name in ("config", "workdir"):
        if not _flag_value(argv, name):
            raise errors.UserError(f"--{name} is required",
                                   f"{_USAGE.removeprefix('usage: ')} (see --help)")
    config = config_lib.load_config_file(_flag_value(argv, "config") or "")
    config_lib.check_keys(config, _override_keys(argv))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        raise errors.UserError(errors.one_line(str(err).split("\n")[0]),
                               "see python -m nbjax.main --help") from err


def usage(argv: list[str]) -> str:
    """``--help``: the flags, then every config key with its value (from ``--config FILE``
    if given, else the defaults of ``base_config()``)."""
    from nbjax import config as config_lib

    lines = [_USAGE, "", __doc__.strip(), "", "flags:"]
    for holder in _OWN_FLAGS:
        lines.append(f"  --{holder.name}: {flags.FLAGS[holder.name].help}")
    lines.append("  --verbose: print the traceback of an error (or set NBJAX_VERBOSE=1)")
    path = _flag_value(argv, "config")
    try:
        config, source = config_lib.load_config_file(path), path
    except (errors.UserError, TypeError):
        config, source = config_lib.base_config(), "the defaults of nbjax/config.py"
    lines += ["", f"config keys (--config.KEY=VALUE), with their values in {source}:"]
    return "\n".join(lines + config_lib.describe(config))


def _run() -> None:
    if any(arg in _HELP_ARGS for arg in sys.argv[1:]):
        print(usage(sys.argv))
        return
    sharding.use_all_cpu_cores()
    app.run(main, flags_parser=_parse_flags)


def run() -> None:
    """Console-script entry (``nbjax-train``): errors are one line (see :mod:`nbjax.errors`)."""
    errors.run_cli(_run)


if __name__ == "__main__":
    run()
