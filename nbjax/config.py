"""The one schema of an nbjax run: every field, its default, and what values it accepts.

Experiment files in ``configs/`` start from :func:`base_config` and change what they need. The
returned ConfigDict is locked, so a misspelt key (in a file or a ``--config.key=value`` flag)
fails at once instead of being silently ignored, and :func:`validate` checks every value before
anything is compiled, naming the key and the allowed values.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from nbjax import pruning
from nbjax.data import pipeline as data
from nbjax.parallel import mesh as sharding
from nbjax.pruning import masks

CHOICES: dict[str, tuple[Any, ...]] = {
    "data.source": data.SOURCES,
    "data.augment": data.AUGMENTS,
    "data.augment_pad_mode": data.PAD_MODES,
    "model.pool": ("cls", "mean"),
    "model.dtype": ("float32", "bfloat16"),
    "pruning.method": tuple(pruning.registered()),
    "pruning.distribution": masks.DISTRIBUTIONS,
    "pruning.scope": masks.SCOPES,
    "mitigation.token_merging.mode": ("off", "single_pass", "every_layer"),
    "sharding.mode": ("replicated", "fsdp"),
    "sharding.grad_reduce": sharding.GRAD_REDUCE_MODES,
}


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run with its default (a dense depth-4 ViT on real MNIST)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data.default_data_config()

    c.model = ml_collections.ConfigDict()
    c.model.image_size = 28
    c.model.patch_size = 7
    c.model.hidden_dim = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.pool = "cls"
    c.model.dtype = "float32"  # compute dtype; params and optimizer moments stay float32

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, over all devices and hosts
    c.train.num_epochs = 10.0
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 500
    c.train.end_lr_factor = 0.0  # cosine decays to learning_rate * end_lr_factor
    c.train.weight_decay = 0.05
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip_norm = 1.0  # 0 disables
    c.train.label_smoothing = 0.0
    c.train.steps_per_call = 10  # train steps fused into one compiled call (lax.scan)
    c.train.log_every = 100  # steps
    c.train.eval_every = 0  # steps; 0 = at the end only
    c.train.eval_batch_size = 1000
    c.train.checkpoint_every = 1000  # steps
    c.train.keep_checkpoints = 2
    c.train.progress = True

    c.pruning = ml_collections.ConfigDict()
    c.pruning.method = "none"
    c.pruning.sparsity = 0.9  # final (gmp, pdwp) or constant (set, rigl, static) sparsity
    c.pruning.initial_sparsity = 0.0
    c.pruning.start_frac = 0.1  # gmp/pdwp schedule start, as a fraction of training
    c.pruning.end_frac = 0.7
    c.pruning.exponent = 3.0
    c.pruning.update_every = 100  # ΔT, steps between mask updates
    c.pruning.distribution = "uniform"
    c.pruning.scope = "layerwise"
    c.pruning.include = r".*kernel$"
    c.pruning.exclude = r"^head/"
    c.pruning.drop_fraction = 0.3  # set/rigl: initial fraction of kept weights dropped per update
    c.pruning.drop_end_frac = 0.75  # set/rigl: drop fraction decays to 0 here (cosine)
    c.pruning.erk_power_scale = 1.0
    # Persistent gmp/pdwp: keep recomputing the mask every ΔT at the final sparsity until this
    # fraction of training (1.0 = to the end, as DPF; <= end_frac freezes the mask at end_frac).
    c.pruning.persistent_end_frac = 1.0
    # Persistent gmp/pdwp: steps between re-rankings of the mask (DPF's 16); the sparsity
    # target itself still changes every update_every steps (docs/pruning.md says why).
    c.pruning.persistent_update_every = 16

    c.mitigation = ml_collections.ConfigDict()
    c.mitigation.persistent = False
    c.mitigation.token_merging = ml_collections.ConfigDict()
    c.mitigation.token_merging.mode = "off"
    c.mitigation.token_merging.r = 0  # tokens merged (per block for every_layer); 0 = keep_ratio
    c.mitigation.token_merging.keep_ratio = 0.5  # single_pass: share of tokens kept

    c.burden = ml_collections.ConfigDict()
    c.burden.enabled = True
    c.burden.every = 100  # costly metrics (sorting, second matmul) every this many steps
    c.burden.kappa = 2.0  # overload threshold on a_i / mean(a)
    c.burden.tau = 0.1  # dormant threshold on a_i / mean(a)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mode = "replicated"
    c.sharding.fsdp_min_size = 2**18  # fsdp: shard state leaves with at least this many entries
    # How the gradient is summed over the batch shards: 'flat' (one buffer, shard_map),
    # 'compiler' (XLA's all-reduces), 'auto' (flat on a CPU host: parallel.mesh.flat_grad_reduce)
    c.sharding.grad_reduce = "auto"
    return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config so unknown keys raise, and returns it."""
    config.lock()
    return config


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key and allowed values for any invalid field."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not valid; allowed: {list(allowed)}")

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"config.{key}={_get(config, key)!r} is not valid: {rule}")

    m, t, p = config.model, config.train, config.pruning
    check(m.image_size % m.patch_size == 0, "model.patch_size", "must divide model.image_size")
    check(m.hidden_dim % m.num_heads == 0, "model.num_heads", "must divide model.hidden_dim")
    for key in ("model.depth", "model.hidden_dim", "model.mlp_dim", "train.batch_size",
                "train.steps_per_call", "train.log_every", "train.eval_batch_size",
                "train.checkpoint_every", "pruning.update_every",
                "pruning.persistent_update_every", "burden.every"):
        check(_get(config, key) > 0, key, "must be > 0")
    check(t.num_steps > 0 or t.num_epochs > 0, "train.num_epochs",
          "must be > 0 (or set train.num_steps)")
    check(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    for key in ("pruning.sparsity", "pruning.initial_sparsity"):
        check(0.0 <= _get(config, key) < 1.0, key, "must be in [0, 1)")
    check(0.0 <= p.start_frac < p.end_frac <= 1.0, "pruning.end_frac",
          "need 0 <= pruning.start_frac < pruning.end_frac <= 1")
    check(0.0 <= p.drop_fraction < 1.0, "pruning.drop_fraction", "must be in [0, 1)")
    check(0.0 < p.drop_end_frac <= 1.0, "pruning.drop_end_frac", "must be in (0, 1]")
    check(0.0 <= p.persistent_end_frac <= 1.0, "pruning.persistent_end_frac",
          "must be in [0, 1]")
    check(p.erk_power_scale >= 0, "pruning.erk_power_scale", "must be >= 0")
    check(p.exponent > 0, "pruning.exponent", "must be > 0")
    check(p.scope != "global" or p.distribution == "uniform", "pruning.distribution",
          "scope='global' takes its per-leaf sparsities from one top-k over all leaves, so "
          "a distribution cannot also be imposed: use 'uniform' (or scope='layerwise')")
    pruning.check_config(config)
    check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    tm = config.mitigation.token_merging
    check(tm.r >= 0, "mitigation.token_merging.r", "must be >= 0")
    check(0.0 < tm.keep_ratio <= 1.0, "mitigation.token_merging.keep_ratio", "must be in (0, 1]")
    check(tm.mode != "every_layer" or tm.r > 0, "mitigation.token_merging.r",
          "every_layer mode needs r > 0")
    check(config.burden.tau < config.burden.kappa, "burden.tau", "must be < burden.kappa")


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (written beside every run)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, e.g. one experiment config built on another."""
    spec = importlib.util.spec_from_file_location(f"nbjax_config_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
