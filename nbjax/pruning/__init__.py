"""Pruning-during-training methods behind one registry: ``make_pruner(config, total_steps)``."""

from nbjax.pruning.base import PruneContext, Pruner, make_pruner, register

__all__ = ["PruneContext", "Pruner", "make_pruner", "register"]
