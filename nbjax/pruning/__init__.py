"""Pruning-during-training methods behind one registry: ``make_pruner(config, total_steps)``.

Methods (one module each, registered on import): ``none`` and ``static``
(:mod:`nbjax.pruning.static`), ``gmp`` and ``pdwp`` (:mod:`nbjax.pruning.gmp`), ``set`` and
``rigl`` (:mod:`nbjax.pruning.dst`). See ``docs/pruning.md``.
"""

from nbjax.pruning import dst, gmp, static  # noqa: F401  (registers the methods)
from nbjax.pruning.base import (
    Method,
    PruneContext,
    Pruner,
    PruneResult,
    check_config,
    make_pruner,
    method,
    register,
    registered,
    schedule_steps,
)

__all__ = ["Method", "PruneContext", "PruneResult", "Pruner", "check_config", "make_pruner",
           "method", "register", "registered", "schedule_steps"]
