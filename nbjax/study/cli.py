"""The command line of ``python -m nbjax.study`` (``docs/study.md``).

    python -m nbjax.study --config configs/study_mnist.py --workdir DIR [--records STORE]
    python -m nbjax.study --config configs/study_mnist.py --workdir DIR --dry-run
    python -m nbjax.study --config configs/study_cifar10.py --workdir DIR --population_size 8
    python -m nbjax.study --status --config configs/study_mnist.py [--records STORE]
    python -m nbjax.study --status STORE_OR_STUDY_DIR [--workdir DIR]
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nbjax import errors

FLAGS = flags.FLAGS
_NAMES = ("config", "workdir", "dry_run", "status", "records", "population_size")


def define_flags() -> None:
    """Defines the study's flags (at run time, so importing this module defines nothing)."""
    config_flags.DEFINE_config_file("config", None, "Study config (.py file).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (the run directories).")
    flags.DEFINE_bool("dry_run", False, "List the cells and estimated times only.")
    flags.DEFINE_bool("status", False, "Print the done / running / missing cells.")
    flags.DEFINE_string("records", None, "Records store (overrides records_dir).")
    flags.DEFINE_integer("population_size", None,
                         "Cells of one program trained together, at most this many (overrides "
                         "the config's population_size; 1: every cell alone; 0: auto, 1 on a "
                         "CPU, what fits the accelerator's memory up to 64).")
    for name in _NAMES:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def rewrite_argv(argv: list[str]) -> list[str]:
    """``--dry-run`` is absl's ``--dry_run``; ``--status DIR`` is ``--status --records=DIR``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = "--dry_run" if argv[i] == "--dry-run" else argv[i]
        if arg == "--status" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += ["--status", f"--records={argv[i + 1]}"]
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _run(args: list[str]) -> None:
    from nbjax.study import runner

    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    logging.set_verbosity(logging.WARNING)
    study, workdir, records = FLAGS.config, FLAGS.workdir, FLAGS.records
    if FLAGS.status:
        print(runner.print_status(study, records, workdir))
        return
    if study is None or workdir is None:
        raise app.UsageError("--config and --workdir are required (except with --status)")
    from nbjax.parallel import runtime

    runtime.enable_compilation_cache()
    status = runner.run_study(study, workdir, records=records, dry_run=FLAGS.dry_run,
                              population_size_override=FLAGS.population_size)
    if not FLAGS.dry_run:
        counts: dict[str, int] = {}
        for s in status.values():
            counts[s] = counts.get(s, 0) + 1
        print(json.dumps(counts, indent=2))
        print(f"report: python -m nbjax.report {runner.report_target(study, records)}")


def run(args: list[str]) -> None:
    """absl's main: a bad grid or config value exits with its message."""
    try:
        _run(args)
    except ValueError as err:
        raise errors.UserError(str(err)) from err


def main(argv: list[str] | None = None) -> None:
    """Parses the flags and runs the study, its dry run or its status."""
    from nbjax.parallel import mesh as sharding

    sharding.use_all_cpu_cores()
    define_flags()
    errors.run_cli(lambda: app.run(run, argv=rewrite_argv(sys.argv if argv is None else argv)))
