"""The benchmark's variants: what ``dense``, ``gmp+burden`` or ``rigl+burden+tome+bf16`` mean.

A variant is a name: a head (``plain_jax``, ``dense`` or a pruning method) and optional
``+burden``, ``+tome`` and ``+bf16`` parts (docs/performance.md says what each runs).
:func:`variant_config` turns the user's config into that variant's config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from nbjax import config as config_lib
from nbjax import pruning
from nbjax.pruning import Pruner, PruneResult

DEFAULT_VARIANTS = ("plain_jax", "dense", "gmp", "rigl", "gmp+burden", "rigl+burden",
                    "gmp+burden+tome")
FLAGS_OF_VARIANT = ("burden", "tome", "bf16")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmark variant, parsed from its name (see the module docstring)."""

    name: str
    head: str  # 'plain_jax', 'dense' or a pruning method
    burden: bool = False
    tome: bool = False
    bf16: bool = False

    @staticmethod
    def parse(name: str) -> Variant:
        """``'rigl+burden+tome'`` -> Variant(head='rigl', burden=True, tome=True)."""
        head, *rest = name.strip().split("+")
        heads = ("plain_jax", "dense", *pruning.registered())
        if head not in heads:
            raise ValueError(f"variant {name!r}: {head!r} is not one of {list(heads)}")
        unknown = [f for f in rest if f not in FLAGS_OF_VARIANT]
        if unknown:
            raise ValueError(f"variant {name!r}: unknown part(s) {unknown}; allowed: "
                             f"{list(FLAGS_OF_VARIANT)}")
        if head == "plain_jax" and set(rest) - {"bf16"}:
            raise ValueError(f"variant {name!r}: plain_jax takes only +bf16")
        return Variant(name.strip(), head, "burden" in rest, "tome" in rest, "bf16" in rest)

    @property
    def plain(self) -> bool:
        """Whether the variant is the plain-JAX reference step, not nbjax's train call."""
        return self.head == "plain_jax"

    @property
    def masked(self) -> bool:
        """Whether the variant's state holds masks."""
        return self.head not in ("plain_jax", "dense")


def unmasked_pruner() -> Any:
    """A pruner with no masks and no pruning state: nbjax's step with nothing masked."""
    return Pruner("unmasked", persistent=False, init=lambda params, rng: ({}, {}),
                  update=PruneResult.unchanged)


def variant_config(base: Any, variant: Variant) -> Any:
    """A locked copy of ``base`` set up for ``variant``."""
    config = ml_collections.ConfigDict(base.to_dict())
    # The unmasked heads run method "none"; ``dense`` also replaces its pruner.
    config.pruning.method = variant.head if variant.masked else "none"
    config.burden.enabled = variant.burden
    tm = config.mitigation.token_merging
    if not variant.tome:
        tm.mode = "off"
    elif tm.mode == "off":
        tm.mode, tm.keep_ratio, tm.r = "single_pass", 0.5, 0
    if variant.bf16:
        config.model.dtype = "bfloat16"
    if not pruning.method(config.pruning.method).persistent_variant:
        config.mitigation.persistent = False
    config.train.progress = False
    return config_lib.lock(config)
