"""The per-member settings: the scalar hyper-parameters the compiled step reads from the state.

A population trains members that differ in these values with one compiled program
(docs/population.md). A single run reads them from the same place, ``TrainState.hparams``,
so a member and the same run trained alone execute the same step. Every other config value
shapes the program and is shared by a population's members.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from nbjax import config as config_lib

Hparams = dict[str, jax.Array]

# name in TrainState.hparams -> the config key it comes from
PER_MEMBER: dict[str, str] = {
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "sparsity": "pruning.sparsity",
    "initial_sparsity": "pruning.initial_sparsity",
    "drop_fraction": "pruning.drop_fraction",
    "mix_alpha": "data.mix_alpha",
}

# Config keys that differ between members without changing the program: the seed (init,
# data order and augmentation) and the values above.
MEMBER_KEYS: tuple[str, ...] = ("seed", *PER_MEMBER.values())


def from_config(config: ml_collections.ConfigDict) -> Hparams:
    """The run's per-member values as float32 scalars (the state's ``hparams``)."""
    return {name: jnp.asarray(float(config_lib.get(config, key)), jnp.float32)
            for name, key in PER_MEMBER.items()}
