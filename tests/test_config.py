"""Config errors fail before anything compiles, naming the key and what is allowed."""

import pathlib
import subprocess
import sys

import pytest
from helpers import smoke_config

from nbjax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key, value, message", [
    ("pruning.method", "magnitude", r"config.pruning.method='magnitude' is not valid; allowed: "
                                    r"\['gmp', 'none', 'pdwp', 'rigl', 'set', 'static'\]"),
    ("model.pool", "max", r"config.model.pool='max'.*\['cls', 'mean'\]"),
    ("mitigation.token_merging.mode", "twice", r"token_merging.mode='twice'.*single_pass"),
    ("pruning.sparsity", 1.0, r"config.pruning.sparsity=1.0 is not valid: must be in \[0, 1\)"),
    ("model.patch_size", 3, r"config.model.patch_size=3.*must divide model.image_size"),
    ("train.batch_size", 0, r"config.train.batch_size=0.*must be > 0"),
])
def test_invalid_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(smoke_config(**{key: value}))


def test_every_shipped_config_is_valid():
    for path in sorted((ROOT / "configs").glob("*.py")):
        config = config_lib.load_config_file(path)
        if "grid" in config:
            config = config.base
        config_lib.validate(config)


def test_unknown_key_is_rejected():
    config = smoke_config()
    with pytest.raises(AttributeError, match="prunning"):
        config.prunning = 1


def test_set_value_sets_an_existing_dotted_key_and_refuses_a_new_one():
    config = config_lib.base_config()
    config_lib.set_value(config, "train.learning_rate", 0.25)
    config_lib.set_value(config, "seed", 7)
    assert config.train.learning_rate == 0.25 and config.seed == 7
    for typo in ("train.learning_rat", "trian.learning_rate", "seed.value"):
        with pytest.raises((KeyError, AttributeError)):
            config_lib.set_value(config, typo, 1.0)
    assert "learning_rat" not in config.train


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nbjax.main", "--config",
                           str(ROOT / "configs" / "smoke.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_rejects_misspelt_key_and_bad_value(tmp_path):
    bad_key = cli("--workdir", str(tmp_path / "a"), "--config.pruning.methd=gmp")
    assert bad_key.returncode != 0
    assert "methd" in bad_key.stderr
    bad_value = cli("--workdir", str(tmp_path / "b"), "--config.pruning.method=magnitude")
    assert bad_value.returncode != 0
    assert "config.pruning.method='magnitude' is not valid" in bad_value.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()  # failed before building anything
