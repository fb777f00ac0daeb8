"""The ViT: shapes, parameter layout, and how masks enter the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from nbjax.model.vit import ViT


def tiny(**kw) -> ViT:
    return ViT(num_classes=5, patch_size=2, hidden_dim=16, depth=2, num_heads=2, mlp_dim=32, **kw)


def init(model: ViT, batch: int = 3):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 8, 8, 1))
    return model.init(jax.random.PRNGKey(0), x)["params"], x


def test_shapes_and_param_layout():
    model = tiny()
    params, x = init(model)
    assert model.apply({"params": params}, x).shape == (3, 5)
    assert params["patch_embed"]["kernel"].shape == (2, 2, 1, 16)
    assert params["cls"].shape == (1, 1, 16)
    assert params["pos_embed"].shape == (1, 17, 16)
    attn = params["block_0"]["attn"]
    assert attn["query"]["kernel"].shape == (16, 2, 8)
    assert attn["out"]["kernel"].shape == (2, 8, 16)
    assert params["block_1"]["fc1"]["kernel"].shape == (16, 32)
    assert params["block_1"]["fc2"]["kernel"].shape == (32, 16)
    assert params["head"]["kernel"].shape == (16, 5)


def test_mask_multiplies_kernel_and_blocks_its_gradient():
    model = tiny()
    params, x = init(model)
    mask = np.ones((16, 32), bool)
    mask[:, ::2] = False
    masks = {"block_0": {"fc1": {"kernel": jnp.asarray(mask)}}}
    by_hand = jax.tree.map(lambda p: p, params)
    by_hand["block_0"]["fc1"]["kernel"] = params["block_0"]["fc1"]["kernel"] * mask
    out_masked = model.apply({"params": params, "masks": masks}, x)
    out_hand = model.apply({"params": by_hand}, x)
    np.testing.assert_allclose(out_masked, out_hand, rtol=1e-6, atol=1e-6)

    def loss(p):
        return jnp.sum(model.apply({"params": p, "masks": masks}, x) ** 2)

    grad = jax.grad(loss)(params)["block_0"]["fc1"]["kernel"]
    assert np.all(np.asarray(grad)[~mask] == 0)
    assert np.any(np.asarray(grad)[mask] != 0)


def test_straight_through_mask_passes_gradient_to_pruned_weights():
    model = tiny(mask_mode="straight_through")
    params, x = init(model)
    mask = np.zeros((16, 32), bool)
    mask[:, :4] = True
    masks = {"block_0": {"fc1": {"kernel": jnp.asarray(mask)}}}
    plain = tiny()
    np.testing.assert_allclose(model.apply({"params": params, "masks": masks}, x),
                               plain.apply({"params": params, "masks": masks}, x), rtol=1e-6)

    def loss(p):
        return jnp.sum(model.apply({"params": p, "masks": masks}, x) ** 2)

    grad = np.asarray(jax.grad(loss)(params)["block_0"]["fc1"]["kernel"])
    assert np.any(grad[~mask] != 0)


def test_stats_are_per_feature_reductions():
    model = tiny(collect_stats=True)
    params, x = init(model)
    _, aux = model.apply({"params": params}, x, mutable=["stats"])
    stats = aux["stats"]
    (fc2_in,) = stats["block_0"]["fc2"]["in_abs_mean"]
    assert fc2_in.shape == (32,)
    (out_in,) = stats["block_1"]["attn"]["out"]["in_abs_mean"]
    assert out_in.shape == (2, 8)
    (patch_in,) = stats["patch_embed"]["in_abs_mean"]
    assert patch_in.shape == (2, 2, 1)
    np.testing.assert_allclose(
        patch_in[0, 0, 0],
        np.mean(np.abs(np.asarray(x)[:, ::2, ::2, 0])), rtol=1e-6)


def test_mean_pool_and_merging_shapes():
    model = tiny(pool="mean", merge_r=(8, 0))
    params, x = init(model)
    logits, source = model.apply({"params": params}, x, return_source=True)
    assert logits.shape == (3, 5)
    assert source.shape == (3, 9, 17)
    np.testing.assert_allclose(np.asarray(source).sum(axis=(1, 2)), 17)
