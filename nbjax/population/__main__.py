"""``python -m nbjax.population --config FILE --workdir DIR --members 'seed=0;seed=1,...'``

Trains the members of one population together (docs/population.md). ``--members`` lists one
spec per member, separated by ``;``; a spec is ``,``-separated dotted ``KEY=VALUE`` overrides
of the config (values are Python literals: numbers, True/False, quoted strings; anything else
is a string). Members may differ only in the seed and the per-member values of
nbjax/train/hparams.py. Member runs go to ``DIR/<name>`` (the name is made of its overrides,
e.g. ``seed1_sparsity0.8``), ordinary run directories that every run tool reads;
``DIR/population`` holds the population's checkpoint. ``--config.KEY=VALUE`` changes every
member. Running the same command again resumes; errors are one line (``--verbose`` adds the
traceback).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from nbjax import errors

_USAGE_FIX = "see python -m nbjax.population --help"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line through run_cli, not argparse's two
        raise errors.UserError(message, _USAGE_FIX)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``['seed=1', 'pruning.sparsity=0.8']`` -> ``{'seed': 1, 'pruning.sparsity': 0.8}``."""
    out = {}
    for item in items:
        key, sep, text = item.strip().partition("=")
        if not sep or not key.strip():
            raise errors.UserError(f"member setting {item!r} is not KEY=VALUE",
                                   "e.g. --members 'seed=0;seed=1,pruning.sparsity=0.8'")
        out[key.strip()] = _literal(text.strip())
    return out


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
    """Sets each dotted key of ``overrides`` in ``config``; a ConfigError names a key that
    does not exist or a value of the wrong type."""
    from nbjax import config as config_lib

    for key, value in overrides.items():
        try:
            config_lib.set_value(config, key, value)
        except (KeyError, AttributeError) as err:
            raise config_lib.unknown_key_error(key, config, where) from err
        except TypeError as err:
            raise errors.ConfigError(f"{where}{key}={value!r} is not valid: {err}",
                                     "give a value of the field's type") from err


def member_configs(base: ml_collections.ConfigDict,
                   members: str) -> tuple[list[ml_collections.ConfigDict], list[str]]:
    """The configs and run names of the ``;``-separated member specs of ``members``."""
    configs, names = [], []
    for spec in (s for s in members.split(";") if s.strip()):
        overrides = parse_overrides([item for item in spec.split(",") if item.strip()])
        name = "_".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in overrides.items())
        name = name.replace("/", "-") or f"member{len(names)}"
        if name in names:
            raise errors.UserError(f"two members are both {spec.strip()!r}",
                                   "give each member its own settings")
        config = copy.deepcopy(base)
        apply(config, overrides, f"member {name}: ")
        configs.append(config)
        names.append(name)
    if not configs:
        raise errors.UserError("--members names no member", _USAGE_FIX)
    return configs, names


def main(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Parses ``argv``, trains the population, returns ``{member name: final metrics}``."""
    parser = _Parser(prog="python -m nbjax.population", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config (.py file)")
    parser.add_argument("--workdir", required=True, help="the population's directory")
    parser.add_argument("--members", required=True, help="member specs, ';'-separated")
    args, extra = parser.parse_known_args(argv)
    shared = [arg.removeprefix("--config.") for arg in extra if arg.startswith("--config.")]
    if len(shared) != len(extra):
        raise errors.UserError(f"unexpected arguments: {' '.join(extra)}", _USAGE_FIX)

    from etils import epath

    from nbjax import config as config_lib
    from nbjax.population import loop as population_loop

    base = config_lib.load_config_file(args.config)
    apply(base, parse_overrides(shared), "--config.")
    configs, names = member_configs(base, args.members)
    workdir = epath.Path(args.workdir)
    finals = population_loop.train_population(configs, [workdir / name for name in names],
                                              workdir / "population")
    return dict(zip(names, finals, strict=True))


def _run() -> None:
    from nbjax.parallel import mesh as sharding

    sharding.use_all_cpu_cores()  # before JAX starts its backends
    import jax

    from nbjax.parallel import runtime

    runtime.enable_compilation_cache()
    finals = main(sys.argv[1:])
    if jax.process_index() == 0:
        print(json.dumps(finals, indent=2))


if __name__ == "__main__":
    errors.run_cli(_run)
