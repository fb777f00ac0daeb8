"""The one schema of an nbjax run: every field, its default, and what values it accepts.

Experiment files in ``configs/`` start from :func:`base_config` and change what they need. The
returned ConfigDict is locked, so a misspelt key (in a file or a ``--config.key=value`` flag)
fails at once instead of being silently ignored, and :func:`validate` checks every value before
anything is compiled, naming the key and the allowed values.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_collections

from nbjax import pruning
from nbjax.data import mix
from nbjax.data import pipeline as data
from nbjax.errors import ConfigError, UserError
from nbjax.parallel import collectives
from nbjax.pruning import masks

CHOICES: dict[str, tuple[Any, ...]] = {
    "data.source": data.SOURCES,
    "data.augment": data.AUGMENTS,
    "data.augment_pad_mode": data.PAD_MODES,
    "data.mix": mix.MIXES,
    "model.pool": ("cls", "mean"),
    "model.dtype": ("float32", "bfloat16"),
    "pruning.method": tuple(pruning.registered()),
    "pruning.distribution": masks.DISTRIBUTIONS,
    "pruning.scope": masks.SCOPES,
    "mitigation.token_merging.mode": ("off", "single_pass", "every_layer"),
    "sharding.mode": ("replicated", "fsdp"),
    "sharding.grad_reduce": collectives.GRAD_REDUCE_MODES,
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

    c.train = _train_fields()
    c.pruning = _pruning_fields()

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
    # 'compiler' (XLA's all-reduces), 'auto' (flat on a CPU host: collectives.grad_reduce_mode)
    c.sharding.grad_reduce = "auto"
    return lock(c)


def _train_fields() -> ml_collections.ConfigDict:
    """``config.train``: the optimizer, the run's length and the loop's cadence."""
    t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.num_epochs = 10.0
    t.num_steps = 0  # > 0 overrides num_epochs
    t.learning_rate = 1e-3
    t.warmup_steps = 500
    t.end_lr_factor = 0.0  # cosine decays to learning_rate * end_lr_factor
    t.weight_decay = 0.05
    t.b1 = 0.9
    t.b2 = 0.999
    t.grad_clip_norm = 1.0  # 0 disables
    t.label_smoothing = 0.0
    t.steps_per_call = 10  # train steps fused into one compiled call (lax.scan)
    t.log_every = 100  # steps
    t.eval_every = 0  # steps; 0 = at the end only
    t.eval_batch_size = 1000
    t.checkpoint_every = 1000  # steps
    t.keep_checkpoints = 2
    t.progress = True
    t.tensorboard = True  # TensorBoard event files in the workdir (docs/tensorboard.md)
    return t


def _pruning_fields() -> ml_collections.ConfigDict:
    """``config.pruning``: the method, its schedule and the weights it may prune."""
    p = ml_collections.ConfigDict()
    p.method = "none"
    p.sparsity = 0.9  # final (gmp, pdwp) or constant (set, rigl, static) sparsity
    p.initial_sparsity = 0.0
    p.start_frac = 0.1  # gmp/pdwp schedule start, as a fraction of training
    p.end_frac = 0.7
    p.exponent = 3.0
    p.update_every = 100  # ΔT, steps between mask updates
    p.distribution = "uniform"
    p.scope = "layerwise"
    p.include = r".*kernel$"
    p.exclude = r"^head/"
    p.drop_fraction = 0.3  # set/rigl: initial fraction of kept weights dropped per update
    p.drop_end_frac = 0.75  # set/rigl: drop fraction decays to 0 here (cosine)
    p.erk_power_scale = 1.0
    # Persistent gmp/pdwp: keep recomputing the mask every ΔT at the final sparsity until this
    # fraction of training (1.0 = to the end, as DPF; <= end_frac freezes the mask at end_frac).
    p.persistent_end_frac = 1.0
    # Persistent gmp/pdwp: steps between re-rankings of the mask (DPF's 16); the sparsity
    # target itself still changes every update_every steps (docs/pruning.md says why).
    p.persistent_update_every = 16
    return p


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config so unknown keys raise, and returns it."""
    config.lock()
    return config


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of a dotted key ('train.learning_rate') of ``config``."""
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def set_value(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets the dotted key ('train.learning_rate') of ``config``; a KeyError if the key does
    not exist (a typo never adds a field), a TypeError if the value has the wrong type."""
    *parents, leaf = dotted.split(".")
    node = get(config, ".".join(parents)) if parents else config
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(dotted)
    node[leaf] = value


def flat_items(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of ``config`` by its dotted key, e.g. ``{"train.batch_size": 128, ...}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def closest_keys(key: str, keys: Iterable[str], count: int = 3) -> list[str]:
    """The ``count`` valid dotted keys most like ``key``, by the whole key or by its last part."""

    def likeness(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        last = difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1],
                                       candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, last)

    return sorted(keys, key=likeness, reverse=True)[:count]


def unknown_key_error(key: str, config: ml_collections.ConfigDict, where: str = "") -> ConfigError:
    """The error for a key ``config`` does not have, naming the closest valid keys."""
    near = ", ".join(closest_keys(key, flat_items(config)))
    return ConfigError(f"{where}unknown config key '{key}'",
                       f"closest valid keys: {near} (python -m nbjax.main --help lists all)")


def check_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises :func:`unknown_key_error` for the first dotted key that ``config`` lacks."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise unknown_key_error(key, config, f"--config.{key}: ")
            node = node[part]


def describe(config: ml_collections.ConfigDict) -> list[str]:
    """One line per key, ``key = value`` and the allowed values where there is a choice."""
    lines = []
    for key, value in flat_items(config).items():
        choice = f"  (one of {', '.join(map(str, CHOICES[key]))})" if key in CHOICES else ""
        lines.append(f"  {key} = {value!r}{choice}")
    return lines


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`~nbjax.errors.ConfigError` (a ValueError) naming the key and the allowed
    values of the first invalid field."""
    for key, allowed in CHOICES.items():
        value = get(config, key)
        if value not in allowed:
            raise ConfigError(f"config.{key}={value!r} is not valid; allowed: {list(allowed)}",
                              f"pick one with --config.{key}=...")

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config.{key}={get(config, key)!r} is not valid: {rule}",
                              f"change it in the config file or with --config.{key}=...")

    _check_model_and_train(config, check)
    _check_pruning(config, check)
    _check_mitigation_and_burden(config, check)


_Check = Callable[[bool, str, str], None]


def _check_model_and_train(config: ml_collections.ConfigDict, check: _Check) -> None:
    m, t = config.model, config.train
    check(m.image_size % m.patch_size == 0, "model.patch_size", "must divide model.image_size")
    check(m.hidden_dim % m.num_heads == 0, "model.num_heads", "must divide model.hidden_dim")
    for key in ("model.depth", "model.hidden_dim", "model.mlp_dim", "train.batch_size",
                "train.steps_per_call", "train.log_every", "train.eval_batch_size",
                "train.checkpoint_every", "pruning.update_every",
                "pruning.persistent_update_every", "burden.every"):
        check(get(config, key) > 0, key, "must be > 0")
    check(t.num_steps > 0 or t.num_epochs > 0, "train.num_epochs",
          "must be > 0 (or set train.num_steps)")
    check(math.isfinite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate",
          "must be finite and > 0")
    check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    alpha = config.data.mix_alpha
    check(math.isfinite(alpha) and alpha >= 0, "data.mix_alpha", "must be finite and >= 0")
    check(config.data.mix != "none" or alpha == 0, "data.mix_alpha",
          "mixes nothing while data.mix='none': set --config.data.mix=mixup (or cutmix, "
          "mixup_cutmix)")


def _check_pruning(config: ml_collections.ConfigDict, check: _Check) -> None:
    p = config.pruning
    for key in ("pruning.sparsity", "pruning.initial_sparsity"):
        check(0.0 <= get(config, key) < 1.0, key, "must be in [0, 1)")
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
    try:
        pruning.check_config(config)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise ConfigError(str(err), "change the pruning or mitigation settings") from err


def _check_mitigation_and_burden(config: ml_collections.ConfigDict, check: _Check) -> None:
    from nbjax.tome.merge import max_merge

    tm, m = config.mitigation.token_merging, config.model
    check(tm.r >= 0, "mitigation.token_merging.r", "must be >= 0")
    check(0.0 < tm.keep_ratio <= 1.0, "mitigation.token_merging.keep_ratio", "must be in (0, 1]")
    check(tm.mode != "every_layer" or tm.r > 0, "mitigation.token_merging.r",
          "every_layer mode needs r > 0")
    tokens = (m.image_size // m.patch_size) ** 2 + 1  # the patches and the class token
    most = max_merge(tokens)
    check(tm.mode == "off" or tm.r <= most, "mitigation.token_merging.r",
          f"block 0 gets {tokens} tokens, of which bipartite matching can merge at most {most}")
    check(config.burden.tau < config.burden.kappa, "burden.tau", "must be < burden.kappa")


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (written beside every run)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, e.g. one experiment config built on another.

    Every way the file can fail (missing, a syntax error, an unknown key set on the locked
    :func:`base_config`, an exception in ``get_config``) is a :class:`ConfigError` naming the
    file and, where it helps, the line.
    """
    path = Path(path)
    if not path.is_file():
        stems = sorted(p.stem for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
        near = difflib.get_close_matches(path.stem, stems, 3, 0.6) or stems[:12]
        hint = (f"existing configs there: {', '.join(n + '.py' for n in near)}" if near else
                "give the path of a .py file with get_config(), e.g. configs/mnist_vit4.py")
        raise ConfigError(f"config file {path} does not exist", hint)
    spec = importlib.util.spec_from_file_location(f"nbjax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path} is not a Python file", "give a .py config file")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"config file {path} has no get_config()",
                              "define get_config() returning the config (see configs/)")
        return module.get_config()
    except UserError:
        raise
    except SyntaxError as err:
        raise ConfigError(f"config file {err.filename or path} line {err.lineno}: "
                          f"{err.msg}", "fix the Python syntax there") from err
    except Exception as err:  # any error of the user's code, named with its line
        raise _config_file_error(path, err) from err


def _config_file_error(path: Path, err: Exception) -> ConfigError:
    """A ConfigError for ``err`` raised while running ``path``'s code, with its line."""
    lines = [lineno for frame, lineno in _walk_tb(err.__traceback__)
             if Path(frame.f_code.co_filename).resolve() == path.resolve()]
    where = f"config file {path}" + (f" line {lines[-1]}" if lines else "") + ": "
    unknown = re.search(r'Key "([^"]+)" does not exist|^"\'([^\']+)\'"$', str(err))
    if isinstance(err, (AttributeError, KeyError)) and unknown:
        return unknown_key_error(unknown.group(1) or unknown.group(2), base_config(), where)
    return ConfigError(f"{where}get_config() raised {type(err).__name__}: {err}",
                       "fix the config file")


def _walk_tb(tb: Any) -> Iterable[tuple[Any, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next

