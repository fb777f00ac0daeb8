"""Every mistake a user can make is one line, ``error: <what> — <how to fix>``, and exit 2.

Each row runs ``python -m nbjax.main`` in a subprocess (all rows started together, a few at a
time, by one fixture) and checks the exit status, that exactly one error line and no
traceback is printed, the words the line must contain, and that the work directory was left
as it was. The data files' own errors are also checked in-process, file by file.
"""

import gzip
import pickle
import struct
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import error_lines, run_nbjax, snapshot

from nbjax import errors
from nbjax.data import pipeline as data

BAD_FILE_CONFIG = '''from nbjax.config import base_config


def get_config():
    config = base_config()
    config.pruning.methd = "gmp"
    return config
'''


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_dir(root: Path) -> Path:
    root.mkdir()
    for prefix, n in (("train", 6), ("t10k", 3)):
        _idx(root / f"{prefix}-images-idx3-ubyte", np.zeros((n, 8, 8)))
        _idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 2)
    return root


def _rows(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments after --config configs/smoke.py, words the error line must hold)."""
    (tmp / "bad_key.py").write_text(BAD_FILE_CONFIG)
    (tmp / "bad_syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp / "a_file").write_text("not a directory")
    truncated = _idx_dir(tmp / "truncated")
    images = truncated / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    tfds_dir = tmp / "tfds" / "mnist" / "3.0.1"
    tfds_dir.mkdir(parents=True)
    (tfds_dir / "dataset_info.json").write_text('{"name": "mnist", ')
    mnist = ["--config.data.source=idx", "--config.model.image_size=8"]
    return {
        "unknown key flag": (["--config.does_not_exist=1"],
                             ["unknown config key 'does_not_exist'", "closest valid keys"]),
        "misspelt key flag": (["--config.pruning.methd=gmp"],
                              ["'pruning.methd'", "closest valid keys: pruning.method"]),
        "unknown key in file": (["--config", str(tmp / "bad_key.py")],
                                ["bad_key.py line 6", "'methd'", "pruning.method"]),
        "missing config file": (["--config", "configs/nope.py"],
                                ["configs/nope.py does not exist", "mnist_vit4.py"]),
        "config syntax error": (["--config", str(tmp / "bad_syntax.py")],
                                ["bad_syntax.py line 1", "syntax"]),
        "workdir is a file": (["--workdir", str(tmp / "a_file")], ["is a file"]),
        "batch vs devices": (["--config.train.batch_size=33"],
                             ["batch_size=33 is not a multiple of the 2 devices"]),
        "batch vs train set": (["--config.train.batch_size=1024"],
                               ["batch_size=1024 is larger than the 512 training examples"]),
        "infinite learning rate": (["--config.train.learning_rate=inf"],
                                   ["learning_rate=inf", "finite"]),
        "merge more than tokens": (["--config.mitigation.token_merging.mode=single_pass",
                                    "--config.mitigation.token_merging.r=9"],
                                   ["token_merging.r=9", "17 tokens", "at most 8"]),
        "value of wrong type": (["--config.train.batch_size=abc"], ["batch_size=abc"]),
        "misspelt flag": (["--workdirr=x"], ["workdirr", "Did you mean: workdir"]),
        "missing data dir": ([*mnist, f"--config.data.path={tmp}/nowhere"],
                             ["nowhere, which does not exist", "train-images-idx3-ubyte"]),
        "truncated idx": ([*mnist, f"--config.data.path={truncated}"],
                          [str(images), "header says", "truncated"]),
        "corrupt tfds info": (["--config.data.source=tfds", "--config.data.tfds_name=mnist",
                               f"--config.data.tfds_data_dir={tmp / 'tfds'}"],
                              [str(tfds_dir / "dataset_info.json"), "not valid JSON"]),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    rows = _rows(tmp)

    def attempt(item):
        name, (args, _) = item
        workdir = tmp / f"run_{name.replace(' ', '_')}"
        if "--workdir" not in args:
            args = ["--workdir", str(workdir), *args]
        return name, run_nbjax(*args, "--config.train.progress=False"), workdir

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(attempt, rows.items()))
    return {name: (proc, workdir, rows[name][1]) for name, proc, workdir in done}


ROW_NAMES = ["unknown key flag", "misspelt key flag", "unknown key in file",
             "missing config file", "config syntax error", "workdir is a file",
             "batch vs devices", "batch vs train set", "infinite learning rate",
             "merge more than tokens", "value of wrong type", "misspelt flag",
             "missing data dir", "truncated idx", "corrupt tfds info"]


@pytest.mark.parametrize("name", ROW_NAMES)
def test_each_mistake_is_one_line_and_exit_2(outcomes, name):
    proc, workdir, words = outcomes[name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert " — " in line  # what is wrong — how to fix it
    for word in words:
        assert word in line
    # Nothing was trained or written: at most an empty work directory.
    assert not workdir.exists() or snapshot(workdir) == {}


def test_verbose_adds_the_traceback(tmp_path):
    proc = run_nbjax("--workdir", str(tmp_path), "--config.does_not_exist=1", "--verbose")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "error: --config.does_not_exist: unknown config key" in proc.stderr


def test_help_lists_every_config_key_with_its_value():
    defaults = run_nbjax("--help", config=None)
    assert defaults.returncode == 0, defaults.stderr[-2000:]
    assert "  train.batch_size = 128\n" in defaults.stdout
    assert "  pruning.method = 'none'  (one of gmp, none, pdwp, rigl, set, static)" in \
        defaults.stdout
    assert "--allow_config_change" in defaults.stdout and "--verbose" in defaults.stdout
    smoke = run_nbjax("--help")  # with --config: that file's values
    assert "  train.batch_size = 32\n" in smoke.stdout


# ----------------------------------------------------------------------------- data files


def _cfg(tmp_path: Path, **kw):
    config = data.default_data_config()
    config.cache_dir = str(tmp_path / "cache")
    config.update(kw)
    return config


def _one_line_naming(err: Exception, *words: str) -> None:
    assert isinstance(err, errors.UserError)
    text = str(err)
    assert "\n" not in text and " — " in text
    for word in words:
        assert word in text, text


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:6], ["the IDX header is cut short"]),
    (lambda raw: gzip.compress(raw)[:-9], ["damaged or truncated gzip"]),
    (lambda raw: b"\x01\x02" + raw[2:], ["not an IDX file"]),
])
def test_damaged_idx_names_the_file(tmp_path, damage, words):
    root = _idx_dir(tmp_path / "idx")
    labels = root / "t10k-labels-idx1-ubyte"
    labels.write_bytes(damage(labels.read_bytes()))
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset(_cfg(tmp_path, source="idx", path=str(root)))
    _one_line_naming(caught.value, str(labels), *words)


def _cifar_dir(root: Path, batch_of: dict) -> Path:
    root.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(batch_of.get(name, good)))
    return root


@pytest.mark.parametrize("bad, words", [
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, ["(2, 1024)", "[N, 3072]"]),
    ([1, 2, 3], ["holds a list, not a CIFAR-10 batch"]),
    ({b"pixels": 1}, ["not a CIFAR-10 batch"]),
])
def test_wrong_cifar_batch_names_the_file(tmp_path, bad, words):
    root = _cifar_dir(tmp_path / "cifar", {"data_batch_3": bad})
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset(_cfg(tmp_path, source="cifar10_python", path=str(root)))
    _one_line_naming(caught.value, str(root / "data_batch_3"), *words)


def test_truncated_cifar_pickle_and_archive_name_the_file(tmp_path):
    root = _cifar_dir(tmp_path / "cifar", {})
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    blob = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset(_cfg(tmp_path, source="cifar10_python", path=str(root)))
    _one_line_naming(caught.value, str(root / "test_batch"), "not a readable pickle")
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset(_cfg(tmp_path, source="cifar10_python", path=str(archive)))
    _one_line_naming(caught.value, str(archive), "damaged or truncated archive")


def test_unreadable_image_names_the_file(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
    (tmp_path / "images" / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "images")))
    _one_line_naming(caught.value, "0.png", "not a readable image")


def test_run_cli_maps_errors_to_one_line_and_status(tmp_path):
    """The wrapper itself, as another CLI would use it (one line, the right status)."""
    script = tmp_path / "cli.py"
    script.write_text(
        "import sys\nfrom nbjax import errors\n"
        "kind = sys.argv[1]\n"
        "def main():\n"
        "    if kind == 'user': raise errors.UserError('bad input', 'fix it')\n"
        "    if kind == 'nan': raise errors.NonFiniteError('loss is nan', 'lower the rate')\n"
        "    if kind == 'path': open('/proc/nbjax-no-such-dir/x', 'w')\n"
        "    if kind == 'stop': raise errors.Stopped('stopped by SIGTERM at step 3', 15)\n"
        "    print('ok')\n"
        "errors.run_cli(main)\n")
    expected = {"user": (2, "error: bad input — fix it"), "nan": (1, "error: loss is nan"),
                "path": (2, "error: No such file or directory: /proc/nbjax-no-such-dir/x"),
                "stop": (143, "stopped by SIGTERM at step 3"), "fine": (0, "")}
    for kind, (status, start) in expected.items():
        proc = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == status, (kind, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith(start) and proc.stderr.count("\n") <= 1

