"""Token merging in the model, the train step, the cost accounting and the picture.

The matching and merging themselves are tested against a NumPy reference in test_tome.py;
here: the ViT with merging compiles once, the train step logs tokens per block and runs with
every registered pruning method and the burden metrics, the FLOPs accounting agrees with
XLA's, the visualisation writes a PNG, and the smoke config learns with merging.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_steps, smoke_config, smoke_dataset

from nbjax import config as config_lib
from nbjax import visualize
from nbjax.model import build as model_build
from nbjax.model import token_stats
from nbjax.model import vit as model_lib
from nbjax.pruning import base as pruning_base
from nbjax.tome import cost as flops
from nbjax.tome import merge as tome
from nbjax.train import loop

# Smoke model: 8x8 images, patch 2 -> 16 patches + class token = 17 tokens, depth 2.
SMOKE_TOKENS = 17
HALF = {"mitigation.token_merging.mode": "single_pass",
        "mitigation.token_merging.keep_ratio": 0.5}


@functools.lru_cache(maxsize=1)
def smoke_params():
    """Params of the smoke ViT (merging adds none, so every schedule shares them); the
    compiled init (random initialisers) is slow enough on a busy CPU to do only once."""
    model = model_build.build_model(smoke_config(), num_classes=4)
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]


def registered_methods() -> list[str]:
    return list(pruning_base.registered())


# ----------------------------------------------------------------------------- the model


def test_smoke_and_default_schedules():
    assert model_build.num_input_tokens(smoke_config()) == SMOKE_TOKENS
    assert model_build.tome_schedule(smoke_config(**HALF), SMOKE_TOKENS) == [8, 0]
    # The default MNIST model: patch 7 -> 17 tokens; half -> r = 8 (the most that can merge).
    config = config_lib.base_config()
    assert model_build.num_input_tokens(config) == 17
    config.mitigation.token_merging.mode = "single_pass"
    assert model_build.tome_schedule(config, 17) == [8, 0, 0, 0]
    config.mitigation.token_merging.mode = "every_layer"
    config.mitigation.token_merging.r = 2
    assert model_build.tome_schedule(config, 17) == [2, 2, 2, 2]


def test_jitted_model_with_merging_compiles_once():
    model = model_build.build_model(smoke_config(**HALF), num_classes=4)
    assert tuple(model.merge_r) == (8, 0)
    traces = {"n": 0}

    def forward(variables, x):
        traces["n"] += 1
        return model.apply(variables, x, return_source=True)

    f = jax.jit(forward)
    x = jnp.zeros((5, 8, 8, 1))
    variables = {"params": smoke_params()}
    for seed in range(4):  # new values, same shapes: different matchings, one trace
        xs = jax.random.normal(jax.random.PRNGKey(seed), x.shape)
        logits, source = f(variables, xs)
        assert logits.shape == (5, 4)
        assert source.shape == (5, 9, SMOKE_TOKENS)
        np.testing.assert_allclose(np.asarray(source).sum(axis=(1, 2)), SMOKE_TOKENS)
    assert traces["n"] == 1


def test_proportional_attention_sees_sizes_after_the_merge():
    """Block 1 of a single-pass model attends with log(size): feeding it the merged sizes
    must change its output compared with sizes of one (so the bias is really applied)."""
    model = model_build.build_model(smoke_config(**HALF), num_classes=4)
    params = smoke_params()
    block = model_lib.Block(model.num_heads, model.mlp_dim)
    tokens = jax.random.normal(jax.random.PRNGKey(4), (2, 9, model.hidden_dim))
    sizes = jnp.asarray([[1.0, 3, 1, 2, 2, 1, 4, 2, 1]] * 2)

    @jax.jit
    def run_block(size):
        return block.apply({"params": params["block_1"]}, tokens, size, None)[0]

    out_sized, out_ones = run_block(sizes), run_block(jnp.ones((2, 9)))
    out_plain, _, _ = jax.jit(lambda t: block.apply({"params": params["block_1"]}, t, None,
                                                    None))(tokens)
    np.testing.assert_allclose(out_ones, out_plain, atol=1e-6)
    assert np.max(np.abs(np.asarray(out_sized) - np.asarray(out_plain))) > 1e-3


def stats_of(config):
    """The model's ``'stats'`` of one forward pass (no jit, no train step)."""
    model = model_build.build_model(config, num_classes=4)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
    _, aux = jax.jit(lambda p: model.apply({"params": p}, x, mutable=["stats"]))(
        smoke_params())
    return aux.get("stats", {})


def test_every_layer_sows_tokens_per_block_without_burden():
    config = smoke_config(**{"mitigation.token_merging.mode": "every_layer",
                             "mitigation.token_merging.r": 3, "burden.enabled": False})
    m = token_stats.token_metrics(stats_of(config))
    assert sorted(m) == sorted(f"tokens/{k}block_{i}" for i in range(2)
                               for k in ("", "mean_size/", "max_size/"))
    assert [int(m[f"tokens/block_{i}"]) for i in range(2)] == \
        tome.tokens_per_block(SMOKE_TOKENS, [3, 3]) == [14, 11]
    np.testing.assert_allclose(m["tokens/mean_size/block_0"], SMOKE_TOKENS / 14, rtol=1e-6)
    np.testing.assert_allclose(m["tokens/mean_size/block_1"], SMOKE_TOKENS / 11, rtol=1e-6)


@pytest.mark.parametrize("burden", [True, False])
def test_no_token_metrics_without_merging(burden):
    assert token_stats.token_metrics(stats_of(smoke_config(**{"burden.enabled": burden}))) == {}


# ----------------------------------------------------------------------------- the train step


@pytest.fixture(scope="module")
def half_run():
    """Ten train calls (40 steps) of the smoke config, single-pass at half the tokens, dense,
    burden metrics on: compiled once, shared by the tests below."""
    config = smoke_config(**HALF, **{"burden.enabled": True})
    return run_steps(config, num_calls=10)


def test_single_pass_half_logs_expected_tokens_per_block(half_run):
    _, _, history = half_run
    for m in history:
        np.testing.assert_array_equal(m["tokens/block_0"], 9)
        np.testing.assert_array_equal(m["tokens/block_1"], 9)
        # Sizes add up to the 17 input tokens: the mean over the 9 tokens is 17 / 9.
        np.testing.assert_allclose(m["tokens/mean_size/block_0"], SMOKE_TOKENS / 9, rtol=1e-6)
        np.testing.assert_allclose(m["tokens/mean_size/block_1"], SMOKE_TOKENS / 9, rtol=1e-6)
        # Block 1 does not merge: the sizes it hands on are block 0's.
        np.testing.assert_array_equal(m["tokens/max_size/block_1"], m["tokens/max_size/block_0"])
        assert np.all(m["tokens/max_size/block_0"] >= 2)
        assert np.all(m["tokens/max_size/block_0"] <= 1 + 8)


def test_smoke_config_learns_with_merging(half_run):
    _, _, history = half_run
    first = history[0]["train/loss"][0]
    last = np.mean(history[-1]["train/loss"])
    assert last < 0.5 * first, (first, last)
    # The burden metrics come out of the same step as the token metrics.
    assert any(k.startswith("burden/") for k in history[-1]), sorted(history[-1])


@pytest.mark.parametrize("method", [m for m in pruning_base.registered() if m != "none"])
def test_train_step_with_merging_and_every_pruning_method(method):
    if method not in registered_methods():
        pytest.skip(f"pruning method {method!r} is not registered yet")
    # start_frac 0: gradual methods (gmp, pdwp) already prune at step 4 of these 8 steps.
    config = smoke_config(**HALF, **{"pruning.method": method, "burden.enabled": True,
                                     "pruning.sparsity": 0.5, "pruning.start_frac": 0.0})
    _, state, history = run_steps(config, num_calls=2)
    losses = np.concatenate([h["train/loss"] for h in history])
    assert np.all(np.isfinite(losses))
    assert np.all(history[-1]["tokens/block_1"] == 9)
    assert any(k.startswith("burden/") for k in history[-1]), sorted(history[-1])
    for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    kept = [np.mean(np.asarray(m)) for m in jax.tree.leaves(state.masks)]
    assert min(kept) < 1.0, f"{method}: no weight pruned after {len(losses)} steps"


# ----------------------------------------------------------------------------- FLOPs


def test_block_flops_splits_into_attention_and_mlp():
    t, d = 17, 64
    attn = tome.block_flops(t, d, mlp_ratio=0.0)
    assert attn == 2 * (4 * t * d * d + 2 * t * t * d)
    assert tome.block_flops(t, d, 4.0) - attn == 2 * 2 * t * d * 4 * d


@pytest.mark.parametrize("config_overrides", [
    HALF,
    {"mitigation.token_merging.mode": "every_layer", "mitigation.token_merging.r": 3},
])
def test_compiled_flops_drop_and_match_analytic_smoke(config_overrides):
    report = flops.cost_report(smoke_config(**config_overrides), 4, (8, 8, 1))
    assert report.compiled_merged < report.compiled_unmerged
    assert report.analytic_merged < report.analytic_unmerged
    for compiled, analytic in ((report.compiled_merged, report.analytic_merged),
                               (report.compiled_unmerged, report.analytic_unmerged)):
        # Width 16: layer norms, softmax, GELU and the merge are ~15-20 % of XLA's count.
        assert 0 < (compiled - analytic) / compiled < 0.25, report
    assert report.compiled_saving == pytest.approx(report.analytic_saving, abs=0.06)


def test_compiled_flops_default_mnist_single_pass_half():
    config = config_lib.base_config()
    config.mitigation.token_merging.mode = "single_pass"
    report = flops.cost_report(config, 10, (28, 28, 1))
    assert report.tokens_per_block == [9, 9, 9, 9]
    # Analytic (matmuls): 7.08 M -> 4.04 M FLOPs/image; XLA counts ~4 % more (element-wise).
    assert report.analytic_unmerged == pytest.approx(7.08e6, rel=0.01)
    assert report.analytic_saving == pytest.approx(0.43, abs=0.01)
    assert abs(report.compiled_merged - report.analytic_merged) / report.compiled_merged \
        < flops.ANALYTIC_TOLERANCE
    assert report.compiled_saving == pytest.approx(report.analytic_saving, abs=0.02)


def test_startup_report_prints_and_writes_json(tmp_path):
    lines = []
    report = flops.startup_report(smoke_config(**HALF), 4, (8, 8, 1), str(tmp_path),
                                  print_fn=lines.append)
    text = "\n".join(lines)
    assert "tokens out (MLP)" in text and "saving" in text
    saved = json.loads((tmp_path / "flops.json").read_text())
    assert saved["tokens_per_block"] == [9, 9] == report.tokens_per_block
    assert saved["compiled_saving"] == pytest.approx(report.compiled_saving)


# ----------------------------------------------------------------------------- the picture


def test_plot_merges_writes_png(tmp_path):
    config = smoke_config(**HALF)
    ds = smoke_dataset()
    model = model_build.build_model(config, ds.num_classes)
    params = smoke_params()
    images = ds.test_images[:3]
    groups = visualize.merge_groups(model, params, None,
                                    visualize.data_lib.normalize(images, ds.mean, ds.std))
    assert groups.shape == (3, 16)
    # 9 tokens after the merge: the class token alone, the 16 patches in 8 groups.
    assert all(len(np.unique(g)) == 8 for g in groups)
    out = tmp_path / "merges.png"
    visualize.plot_merges(model, params, None, images, mean=ds.mean, std=ds.std, out=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_run_logs_tokens_and_cli_draws_merges(tmp_path):
    config = smoke_config(**HALF, **{"train.num_steps": 16})
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir), dataset=smoke_dataset())
    assert json.loads((workdir / "flops.json").read_text())["tokens_per_block"] == [9, 9]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train_records = [r for r in records if "train/loss" in r]
    assert train_records and all(r["tokens/block_0"] == 9 for r in train_records)
    out = tmp_path / "merges.png"
    assert visualize.main(["--workdir", str(workdir), "--num_images", "4",
                           "--out", str(out)]) == str(out)
    assert out.read_bytes()[:4] == b"\x89PNG"
