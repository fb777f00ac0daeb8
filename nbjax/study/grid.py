"""The cells of a study: methods × sparsities × mitigations × seeds, dense runs, and the
token-merging variants (sensitivity settings and equal-compute training).

A study config has ``name``, ``records_dir`` (empty: ``docs/results/<name>/cells``), ``base``
(a full run config), ``grid`` (what varies, :func:`grid_config`) and ``population_size``.
:func:`expand` turns it into :class:`RunSpec` cells in run order: dense cells first, then
each method in the grid's order, its sparsities, its mitigations and variants, and the seeds
innermost, so the seeds of one cell run one after another.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Any

import ml_collections

MITIGATIONS = ("none", "tome", "persistent", "both")
PERSISTENT_MITIGATIONS = ("persistent", "both")
DENSE = "none"  # the method name of the dense runs
EQUAL_COMPUTE = "eqflops"  # the arm suffix of an equal-compute cell
_SETTING = re.compile(r"^(?:keep(?P<keep>[0-9.]+)|every_r(?P<r>[0-9]+))$")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid (one seed) and the config that runs it.

    ``arm`` is the mitigation with its variant (``tome-keep0.75``, ``tome-keep0.5-eqflops``);
    ``variant`` holds the variant's fields (empty for the grid's plain cells).
    """

    name: str
    method: str
    sparsity: float
    mitigation: str
    seed: int
    arm: str
    variant: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False,
                                                          default=None)

    def fields(self) -> dict[str, Any]:
        """The cell's identity as a JSON-able dict (what a record and the manifest hold)."""
        return {"cell": self.name, "method": self.method, "sparsity": self.sparsity,
                "mitigation": self.mitigation, "arm": self.arm, "seed": self.seed,
                "variant": dict(self.variant)}


def grid_config(methods=("gmp", "set", "rigl", "static", "pdwp"),
                sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), mitigations=MITIGATIONS,
                seeds=(0,), dense=True, tome_keep_ratio: float = 0.5, tome_variants=(),
                equal_compute=(), variant_sparsities=()) -> ml_collections.ConfigDict:
    """The ``grid`` part of a study config.

    ``tome_variants``: token-merging settings (``keep0.75``: single pass keeping that share
    of the tokens; ``every_r2``: every block merges 2) run as extra ``tome`` cells at
    ``variant_sparsities``; ``equal_compute``: settings whose cells there also train for more
    epochs, so that their training FLOPs equal the unmerged cell's.
    """
    return ml_collections.ConfigDict(dict(
        methods=tuple(methods), sparsities=tuple(sparsities), mitigations=tuple(mitigations),
        seeds=tuple(seeds), dense=dense, tome_keep_ratio=tome_keep_ratio,
        tome_variants=tuple(tome_variants), equal_compute=tuple(equal_compute),
        variant_sparsities=tuple(variant_sparsities)))


def study_config(name: str, base: ml_collections.ConfigDict, grid: ml_collections.ConfigDict,
                 records_dir: str = "", population_size: int = 0) -> ml_collections.ConfigDict:
    """A whole study config: its name, records directory, base run config and grid.

    ``population_size``: cells of one program train together as populations of at most this
    many members; 0 chooses by the backend (``nbjax.study.estimate.auto_population_size``).
    """
    study = ml_collections.ConfigDict()
    study.name, study.records_dir, study.base, study.grid = name, records_dir, base, grid
    study.population_size = int(population_size)
    return study


def records_dir(study: ml_collections.ConfigDict) -> str:
    """``study.records_dir``, or ``docs/results/<name>/cells`` (relative to the cwd)."""
    if study.get("records_dir"):
        return study.records_dir
    if not study.get("name"):
        raise ValueError("the study config has no name (build it with study_config(name, ...))")
    return os.path.join("docs", "results", study.name, "cells")


def parse_setting(setting: str) -> dict[str, Any]:
    """``keep0.75`` / ``every_r2`` -> the token-merging fields it sets."""
    match = _SETTING.match(setting)
    if not match:
        raise ValueError(f"token-merging setting {setting!r} is not valid: use keep<ratio> "
                         "(e.g. keep0.75) or every_r<r> (e.g. every_r2)")
    if match["keep"] is not None:
        return {"mode": "single_pass", "keep_ratio": float(match["keep"]), "r": 0}
    return {"mode": "every_layer", "r": int(match["r"])}


def _apply(config: ml_collections.ConfigDict, mitigation: str, setting: str) -> None:
    tm = config.mitigation.token_merging
    if mitigation in ("tome", "both"):
        for key, value in parse_setting(setting).items():
            tm[key] = value
    if mitigation in PERSISTENT_MITIGATIONS:
        config.mitigation.persistent = True


def _check(g: ml_collections.ConfigDict) -> None:
    from nbjax import pruning

    for m in g.mitigations:
        if m not in MITIGATIONS:
            raise ValueError(f"grid.mitigations has {m!r}; allowed: {list(MITIGATIONS)}")
    prunes = [m for m in pruning.registered() if m != DENSE]
    for m in g.methods:
        if m not in prunes:
            raise ValueError(f"grid.methods has {m!r}; allowed: {prunes}")
    for s in (*g.get("tome_variants", ()), *g.get("equal_compute", ())):
        parse_setting(s)


def _mitigations_of(method: str, mitigations) -> list[str]:
    """The grid's mitigations that make a distinct run of ``method``."""
    from nbjax import pruning

    if method == DENSE:
        return [m for m in mitigations if m not in PERSISTENT_MITIGATIONS]
    info = pruning.method(method)
    skip = info.always_persistent or not info.persistent_variant
    return [m for m in mitigations if not (skip and m in PERSISTENT_MITIGATIONS)]


def _arms(g: ml_collections.ConfigDict, method: str, sparsity: float) -> list[tuple]:
    """(mitigation, tome setting, equal compute) of every arm of one (method, sparsity)."""
    default = f"keep{g.tome_keep_ratio:g}"
    arms = [(m, default, False) for m in _mitigations_of(method, g.mitigations)]
    if method != DENSE and any(abs(sparsity - v) < 1e-9 for v in g.get("variant_sparsities",
                                                                       ())):
        arms += [("tome", s, False) for s in g.get("tome_variants", ())]
        arms += [("tome", s, True) for s in g.get("equal_compute", ())]
    return arms


def _arm_name(mitigation: str, setting: str, default: str, equal: bool) -> tuple[str, dict]:
    if mitigation not in ("tome", "both") or (setting == default and not equal):
        return mitigation, {}
    variant: dict[str, Any] = {"tome": setting}
    arm = f"{mitigation}-{setting}"
    if equal:
        variant["equal_compute"] = True
        arm += f"-{EQUAL_COMPUTE}"
    return arm, variant


def cell_name(method: str, sparsity: float, arm: str, seed: int) -> str:
    """``gmp_s0.9_tome-keep0.75_seed0``; dense cells are ``dense_<arm>_seed<k>``."""
    head = "dense" if method == DENSE else f"{method}_s{sparsity:g}"
    return f"{head}_{arm}_seed{seed}"


def _spec(study, method: str, sparsity: float, arm_fields: tuple, seed: int, flops) -> RunSpec:
    mitigation, setting, equal = arm_fields
    arm, variant = _arm_name(mitigation, setting, f"keep{study.grid.tome_keep_ratio:g}", equal)
    config = copy.deepcopy(study.base)
    with config.unlocked():
        config.seed = int(seed)
        config.pruning.method = method
        if method != DENSE:
            config.pruning.sparsity = float(sparsity)
        _apply(config, mitigation, setting)
        if equal:
            variant["train_factor"] = flops.scale_training(config)
    return RunSpec(cell_name(method, sparsity, arm, int(seed)), method, float(sparsity),
                   mitigation, int(seed), arm, variant, config)


def expand(study: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every cell of the study in run order; a cell whose config repeats an earlier one's is
    dropped (pdwp × persistent, static × persistent, a variant equal to the plain tome)."""
    from nbjax import config as config_lib
    from nbjax.study import compute

    g = study.grid
    _check(g)
    flops = compute.FlopsScaler()
    groups = [(DENSE, 0.0)] if g.dense else []
    groups += [(m, float(s)) for m in g.methods for s in g.sparsities]
    groups += [(m, float(s)) for m in g.methods for s in g.get("variant_sparsities", ())
               if not any(abs(float(s) - x) < 1e-9 for x in g.sparsities)]
    groups.sort(key=lambda ms: ([DENSE, *g.methods].index(ms[0]), ms[1]))
    specs, seen = [], set()
    for method, sparsity in groups:
        for arm_fields in _arms(g, method, sparsity):
            for seed in g.seeds:
                spec = _spec(study, method, sparsity, arm_fields, seed, flops)
                key = json.dumps(spec.config.to_dict(), sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.add(key)
                config_lib.validate(spec.config)
                specs.append(spec)
    return specs
