"""Sources decoded once and cached as arrays: the decode cache, image folders, TFDS.

Decoding a folder of JPEGs or a TFDS dataset takes minutes; the arrays are stored once as .npz
under ``data.cache_dir`` and reused while the source files are unchanged. The loaders follow
the contract of :mod:`nbjax.data.sources` (which holds the other sources and the registry):
a missing dataset is a `FileNotFoundError` saying where it looked, an unreadable file a
`ValueError` naming it, both one-line `nbjax.errors.UserError`s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from nbjax.errors import DataError, DataNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FETCH_AGAIN = "download or copy that file again"
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning, so old caches are ignored
_Arrays = dict[str, np.ndarray]


def cached(c: dict[str, Any], kind: str, key: Any, build: Callable[[], _Arrays]) -> _Arrays:
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


def stat_key(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


# ----------------------------------------------------------------------------- image folders


def _split_source(root: Path, split: str) -> Path:
    for cand in (root / split, root / f"{split}.tar.gz", root / f"{split}.tgz",
                 root / f"{split}.tar"):
        if cand.exists():
            return cand
    raise DataNotFoundError(
        f"data.source='image_folder': found neither {root / split}/<class>/*.jpg|png nor "
        f"{root / split}.tar.gz under {root}",
        f"expected layout: {root}/train/<class>/<image> and {root}/test/<class>/<image>, or "
        "train.tar.gz and test.tar.gz holding that layout")


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
    try:
        with tarfile.open(src, "r|*") as tar:  # stream mode: one sequential pass over the gzip
            for m in tar:
                p = PurePosixPath(m.name)
                if m.isfile() and _is_image(p.name) and len(p.parts) >= 2:
                    yield p.parent.name, m.name, tar.extractfile(m).read()  # type: ignore
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{src} is a damaged or truncated archive ({e})", FETCH_AGAIN) from e


def _decode_split(src: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Decodes every image of one split with Pillow: grayscale stays 1 channel, the rest RGB."""
    from PIL import Image
    from tqdm import tqdm

    total = sum(1 for f in src.rglob("*") if _is_image(f.name)) if src.is_dir() else None
    images, classes, names = [], [], []
    members = _folder_members(src)
    for cls, name, blob in tqdm(members, total=total, unit="img", desc=f"decoding {src.name}",
                                mininterval=1.0):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                arr = np.asarray(im.convert("L" if gray else "RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a damaged image
            raise DataError(f"image_folder: {name} is not a readable image ({e})",
                            "replace or remove that file") from e
        if images and arr.shape[:2] != images[0].shape[:2]:
            raise DataError(
                f"image_folder: all images must have the same size, but {names[0]} is "
                f"{images[0].shape[:2]} and {name} is {arr.shape[:2]} (H, W)",
                "resize the images to one size")
        images.append(arr if arr.ndim == 3 else arr[..., None])
        classes.append(cls)
        names.append(name)
    if not images:
        raise DataNotFoundError(f"image_folder: no {IMAGE_SUFFIXES} images in {src}/<class>/",
                                "put each class's images in its own sub-folder")
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
            raise DataError(f"image_folder: {split} classes {sorted(unknown)} not in train",
                            "every test class needs a train folder of the same name")
        # Sort by (class, file) for a reproducible order, then apply a fixed permutation, so
        # that data.train_limit takes a class-balanced prefix instead of the first class only.
        order = sorted(range(len(names)), key=lambda i: (classes[i], names[i]))
        order = [order[i] for i in np.random.default_rng(0).permutation(len(order))]
        shape = (*images[0].shape[:2], channels)  # gray images are repeated into RGB
        out[f"{split}_images"] = np.stack([np.broadcast_to(images[i], shape) for i in order])
        out[f"{split}_labels"] = np.asarray([index[classes[i]] for i in order], np.int32)
    return out


def load_image_folder(c: dict[str, Any]) -> _Arrays:
    root = Path(c["path"]).expanduser().resolve()
    sources = {split: _split_source(root, split) for split in ("train", "test")}
    files: list[Path] = []
    for src in sources.values():
        files += sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
    return cached(c, "image_folder", (str(root), stat_key(files)),
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
        raise DataError(f"data.tfds_name={tfds_name!r} is ambiguous; prepared configs: "
                        f"{sorted(str(d.parent.relative_to(data_dir)) for d in found)}",
                        "name one of them in --config.data.tfds_name")
    if not found:
        raise DataNotFoundError(
            f"data.source='tfds': no prepared {tfds_name!r} under {data_dir / base} (looked for "
            "<version>/dataset_info.json; nbjax never downloads)",
            f"prepare it on a machine with internet: tfds build {base} --data_dir {data_dir} "
            "--file_format array_record, then copy that directory here and set "
            "data.tfds_data_dir")
    return max(found, key=lambda d: tuple(int(v) for v in d.name.split(".")))


def _build_tfds(version_dir: Path) -> _Arrays:
    import tensorflow_datasets as tfds  # slow import: only for this source
    from tqdm import tqdm

    builder = tfds.builder_from_directory(str(version_dir))
    try:
        sources = builder.as_data_source()
    except NotImplementedError as e:
        raise DataError(f"{version_dir} was not prepared with --file_format array_record, "
                        "which nbjax needs to read it without TensorFlow",
                        "prepare it again with tfds build ... --file_format array_record") from e
    out: _Arrays = dict(name=builder.info.name)
    for split in ("train", "test"):
        if split not in sources:
            raise DataError(f"{version_dir} has splits {list(sources)}, nbjax needs train, test",
                            "use a dataset with train and test splits")
        src, images, labels = sources[split], [], []
        for i in tqdm(range(0, len(src), 1024), desc=f"decoding {split}", mininterval=1.0):
            for ex in src.__getitems__(list(range(i, min(i + 1024, len(src))))):
                if not {"image", "label"} <= set(ex):
                    raise DataError(f"{version_dir}: examples have keys {sorted(ex)}; "
                                    "nbjax reads 'image' and 'label'",
                                    "use an image classification dataset")
                images.append(np.asarray(ex["image"], np.uint8))
                labels.append(int(ex["label"]))
        out[f"{split}_images"], out[f"{split}_labels"] = np.stack(images), np.asarray(labels)
    label = builder.info.features["label"]
    out.update(num_classes=label.num_classes, class_names=np.asarray(label.names, dtype=str))
    return out


def load_tfds(c: dict[str, Any]) -> _Arrays:
    default_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    data_dir = Path(c["tfds_data_dir"] or default_dir).expanduser().resolve()
    version_dir = _tfds_version_dir(data_dir, c["tfds_name"])
    info = version_dir / "dataset_info.json"
    try:
        json.loads(info.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{info} is not valid JSON ({e})",
                        "prepare the dataset again with tfds build, or copy it again") from e
    files = sorted(f for f in version_dir.iterdir() if f.is_file())
    return cached(c, "tfds", (str(version_dir), stat_key(files)),
                   lambda: _build_tfds(version_dir))
