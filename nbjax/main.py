"""Entry point: ``python -m nbjax.main --config configs/mnist_vit4.py --workdir DIR``.

Trains, prunes, logs and checkpoints one run; running the same command again in the same work
directory resumes from the latest checkpoint (or returns at once if the run had finished).
Any config field can be changed with ``--config.<key>=<value>``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from nbjax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nbjax import config as config_lib
    from nbjax import loop

    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except ValueError as err:
        sys.exit(f"error: {err}")
    final = loop.train_and_evaluate(config, _WORKDIR.value)
    print(json.dumps(final, indent=2))


def run() -> None:
    """Console-script entry (``nbjax-train``)."""
    sharding.use_all_cpu_cores()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
