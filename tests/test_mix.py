"""Mixup and CutMix (nbjax.data.mix): what each output row is made of, the weights' law, the
switch-off, and the train step with them (an α = 0 run is the unmixed run, bit for bit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_steps, smoke_config

from nbjax import errors
from nbjax.config import validate
from nbjax.data import mix as mix_lib
from nbjax.population import members

B, H, W, K = 6, 8, 8, 4


def _batch():
    """Image i is the constant i + 1 (so every output pixel names its source), label i % K."""
    images = jnp.broadcast_to(jnp.arange(1.0, B + 1)[:, None, None, None], (B, H, W, 1))
    return images, jax.nn.one_hot(jnp.arange(B) % K, K)


def _own_weight(targets, i):
    """The weight of example i's own label in its mixed target row."""
    own, partner = i % K, (B - 1 - i) % K
    assert own != partner  # holds for B=6, K=4: labels 0..3,0,1 against 1,0,3,2,1,0
    return float(targets[i, own])


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "mixup_cutmix"])
def test_alpha_zero_leaves_the_batch_as_it_is(kind):
    images, targets = _batch()
    out_images, out_targets = mix_lib.mix(images, targets, jax.random.key(3), kind, 0.0)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_targets, targets)


def test_mixup_rows_are_one_blend_of_each_image_and_its_reverse():
    images, targets = _batch()
    out_images, out_targets = jax.jit(mix_lib.mix, static_argnums=3)(
        images, targets, jax.random.key(0), "mixup", 0.8)
    np.testing.assert_allclose(out_targets.sum(1), 1.0, rtol=1e-6)
    lam = _own_weight(out_targets, 0)
    assert 0.0 < lam < 1.0
    for i in range(B):
        assert _own_weight(out_targets, i) == pytest.approx(lam, abs=1e-6)
        expected = lam * (i + 1) + (1 - lam) * (B - i)  # image B-1-i is the constant B - i
        np.testing.assert_allclose(out_images[i], expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_one_box_from_the_reverse_and_weights_targets_by_its_area(seed):
    images, targets = _batch()
    out_images, out_targets = mix_lib.mix(images, targets, jax.random.key(seed), "cutmix", 1.0)
    out = np.asarray(out_images)
    for i in range(B):
        from_partner = out[i, :, :, 0] == B - i
        assert np.all(from_partner | (out[i, :, :, 0] == i + 1))
        rows, cols = np.nonzero(from_partner)
        if rows.size:  # a rectangle: its bounding box is all partner
            assert from_partner[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        np.testing.assert_array_equal(from_partner, out[0, :, :, 0] == B)  # one box per batch
        kept = 1.0 - from_partner.mean()
        assert _own_weight(out_targets, i) == pytest.approx(kept, abs=1e-6)


def test_cutmix_box_sides_by_hand():
    # lam = 0.75: sides floor(8 * 0.5) = 4, i.e. [c - 2, c + 2) clipped to [0, 8)
    key = jax.random.key(11)
    box = np.asarray(mix_lib.cutmix_box(key, H, W, jnp.float32(0.75)))
    k_row, k_col = jax.random.split(key)
    for axis, k in ((0, k_row), (1, k_col)):
        c = int(jax.random.randint(k, (), 0, H))
        expected = np.zeros(H, bool)
        expected[max(c - 2, 0):c + 2] = True
        np.testing.assert_array_equal(box.any(axis=1 - axis), expected)
    assert not np.asarray(mix_lib.cutmix_box(key, H, W, jnp.float32(1.0))).any()


def test_mixing_weight_is_beta_alpha_alpha():
    alpha = 0.8
    keys = jax.random.split(jax.random.key(0), 4000)
    lam = np.asarray(jax.vmap(lambda k: mix_lib.mixing_weight(k, alpha))(keys))
    assert lam.min() > 0 and lam.max() < 1
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0962 for a = 0.8
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)
    assert float(mix_lib.mixing_weight(keys[0], 0.0)) == 1.0


def test_mixup_cutmix_picks_one_of_the_two_per_batch():
    images, targets = _batch()
    kinds = set()
    for seed in range(12):
        out, _ = mix_lib.mix(images, targets, jax.random.key(seed), "mixup_cutmix", 1.0)
        pure = np.isin(np.asarray(out[0]), [1.0, float(B)]).all()
        kinds.add("cutmix" if pure else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_a_run_with_alpha_zero_is_the_unmixed_run_and_alpha_changes_it():
    plain = run_steps(smoke_config(**{"pruning.method": "gmp"}), 3)[2]
    zero = run_steps(smoke_config(**{"pruning.method": "gmp", "data.mix": "mixup_cutmix"}), 3)[2]
    mixed = run_steps(smoke_config(**{"pruning.method": "gmp", "data.mix": "mixup_cutmix",
                                      "data.mix_alpha": 0.8}), 3)[2]
    for a, b in zip(plain, zero, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    losses = np.concatenate([m["train/loss"] for m in mixed])
    assert np.isfinite(losses).all()
    assert not np.array_equal(losses, np.concatenate([m["train/loss"] for m in plain]))


def test_config_refuses_a_negative_alpha_and_an_alpha_without_a_mix():
    with pytest.raises(errors.ConfigError, match="data.mix_alpha.*>= 0"):
        validate(smoke_config(**{"data.mix": "mixup", "data.mix_alpha": -0.1}))
    with pytest.raises(errors.ConfigError, match="data.mix_alpha.*data.mix='none'"):
        validate(smoke_config(**{"data.mix_alpha": 0.8}))
    with pytest.raises(errors.ConfigError, match="data.mix.*allowed"):
        validate(smoke_config(**{"data.mix": "manifold"}))


def test_population_members_may_differ_in_alpha_but_not_in_the_kind():
    mixup = {"data.mix": "mixup"}
    members.check([smoke_config(**mixup), smoke_config(**mixup, **{"data.mix_alpha": 0.4})])
    with pytest.raises(errors.ConfigError, match="data.mix"):
        members.check([smoke_config(**mixup), smoke_config(**{"data.mix": "cutmix"})])
