"""Which runs can be members of one population, and grouping runs into populations.

Members differ only in the seed and the per-member scalars of :mod:`nbjax.train.hparams`;
every other config value (the method, token merging, the model, the data, the schedule's
fractions, ...) shapes the compiled program and must be equal. Under a non-uniform
sparsity distribution the per-leaf targets are Python floats of the program, so there the
sparsities are shared too.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from nbjax import config as config_lib
from nbjax import errors
from nbjax.train import hparams as hparams_lib


def member_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The dotted config keys in which ``config``'s population may differ from it."""
    if config.pruning.distribution == "uniform":
        return hparams_lib.MEMBER_KEYS
    shared = {"pruning.sparsity", "pruning.initial_sparsity"}
    return tuple(k for k in hparams_lib.MEMBER_KEYS if k not in shared)


def program_key(config: ml_collections.ConfigDict) -> str:
    """A string equal for two configs exactly when they compile to the same program."""
    flat = config_lib.flat_items(config)
    for key in member_keys(config):
        flat.pop(key, None)
    return repr(sorted(flat.items()))


def check(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigError naming the first key in which a member differs from member 0 and
    that members may not differ in."""
    if not configs:
        raise errors.ConfigError("a population needs at least one member")
    first = config_lib.flat_items(configs[0])
    allowed = set(member_keys(configs[0]))
    for i, config in enumerate(configs[1:], start=1):
        flat = config_lib.flat_items(config)
        for key in sorted(set(first) | set(flat)):
            if key not in allowed and first.get(key) != flat.get(key):
                raise errors.ConfigError(
                    f"population member {i} has {key}={flat.get(key)!r} but member 0 has "
                    f"{first.get(key)!r}; members may differ only in {sorted(allowed)}",
                    "train them in separate populations (nbjax.population.members.group)")


def group(configs: Sequence[ml_collections.ConfigDict], size: int) -> list[list[int]]:
    """The indices of ``configs`` in populations of at most ``size`` members that share a
    program, in order of first appearance (each population's members in input order)."""
    if size < 1:
        raise errors.ConfigError(f"population size {size} is not valid", "use 1 or more")
    by_program: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        by_program.setdefault(program_key(config), []).append(i)
    return [members[start:start + size] for members in by_program.values()
            for start in range(0, len(members), size)]
