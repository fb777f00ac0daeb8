"""``nbjax.eval`` and ``nbjax.export`` on one short smoke run: persistent gmp to 90 % with
single-pass token merging, so the state keeps non-zero pruned weights (the export must store
W ⊙ M) and the FLOPs report has a merged count."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from helpers import smoke_config, smoke_dataset

from nbjax import eval as eval_lib
from nbjax import export
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.pruning import masks as masks_lib
from nbjax.train import loop

# The smoke ViT (configs/smoke.py): patch 2 on 8x8x1 images, width 16, 2 heads, MLP 32, depth
# 2, 4 classes. Prunable kernels: patch_embed 2*2*1*16 = 64; per block query, key, value
# 16*2*8 = 256 and out 2*8*16 = 256, fc1 16*32 = 512 and fc2 32*16 = 512: 64 + 2 * 2048 = 4160.
# Never pruned: patch_embed bias 16, cls 16, pos_embed 17*16 = 272, per block 2 layer norms
# 2*32, q/k/v biases 3*16, out bias 16, fc1 bias 32, fc2 bias 16 (176), ln_final 32, head
# 16*4 + 4 = 68: 16 + 16 + 272 + 2 * 176 + 32 + 68 = 756. Total 4916.
# At 90 % each kernel of n entries keeps floor(0.1 n + 0.5): 6, 26 (attention), 51 (MLP).
TOTAL, PRUNABLE = 4916, 4160
KEPT = {"patch_embed": 6, "attn": 26, "fc": 51}
PRUNABLE_KEPT = 6 + 2 * (4 * 26 + 2 * 51)  # 418


def kept_of(path):
    return KEPT["patch_embed" if path.startswith("patch_embed") else
                "attn" if "/attn/" in path else "fc"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = smoke_config(**{"pruning.method": "gmp", "mitigation.persistent": True,
                             "mitigation.token_merging.mode": "single_pass",
                             "train.num_steps": 24, "train.checkpoint_every": 8})
    path = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(config, str(path))
    return path


@pytest.fixture(scope="module")
def evaluated(workdir):
    return eval_lib.evaluate_run(workdir)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """``(path, summary)`` of the run's export through the CLI."""
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    return path, export.main(["--workdir", str(workdir), "--out", str(path)])


def test_eval_reproduces_the_runs_final_metrics_with_per_class_counts(workdir, evaluated):
    result = evaluated
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert result["step"] == 24
    assert result["test/accuracy"] == final["test/accuracy"]
    assert result["test/loss"] == pytest.approx(final["test/loss"], rel=1e-5)
    labels = smoke_dataset().test_labels
    assert [c["count"] for c in result["per_class"]] == np.bincount(labels, minlength=4).tolist()
    assert sum(c["correct"] for c in result["per_class"]) == round(final["test/accuracy"] * 200)


def test_eval_reports_sparsity_parameters_and_flops(evaluated):
    result = evaluated
    assert {p: layer["kept"] for p, layer in result["layers"].items()} == {
        p: kept_of(p) for p in result["layers"]}
    assert len(result["layers"]) == 13
    assert result["parameters"] == {"total": TOTAL, "prunable": PRUNABLE,
                                    "prunable_kept": PRUNABLE_KEPT,
                                    "kept": TOTAL - PRUNABLE + PRUNABLE_KEPT}
    assert result["prunable_sparsity"] == pytest.approx(1 - 418 / 4160)
    assert result["overall_sparsity"] == pytest.approx(1 - 1174 / 4916)
    flops = result["flops"]
    # Single-pass merging at keep ratio 0.5 of 17 tokens merges 8 in block 0.
    assert flops["merge_r"] == [8, 0]
    assert flops["analytic_merged"] < flops["analytic_unmerged"]
    assert flops["compiled_merged"] < flops["compiled_unmerged"]


def test_eval_cli_with_an_older_step_and_a_data_override_writes_json(workdir, tmp_path,
                                                                      capsys):
    out = tmp_path / "eval.json"
    eval_lib.main(["--workdir", str(workdir), "--step", "16", "--config.data.test_limit=50",
                   "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["step"], result["num_examples"]) == (16, 50)
    labels = smoke_dataset().test_labels[:50]
    assert [c["count"] for c in result["per_class"]] == np.bincount(labels, minlength=4).tolist()
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--step", "5"], "saved steps: [16, 24]"),
    (["--config.model.depth=3"], "only --config.data.KEY=VALUE"),
    (["--config.data.no_such_key=1"], "not a data field"),
    (["--config.data.synthetic_image_size=16"], "the model takes (8, 8, 1)"),
])
def test_eval_cli_rejects_what_it_cannot_evaluate(workdir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_lib.main(["--workdir", str(workdir), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_export_round_trip_gives_identical_logits(workdir, exported):
    path, _ = exported
    run, state, _ = eval_lib.restore(workdir)
    params, masks = jax.device_get((state.params, state.masks))
    flat_params, flat_masks = masks_lib.flatten(params), masks_lib.flatten(masks)
    # persistent: the state keeps non-zero pruned weights, which the export must drop
    assert any(np.any(np.asarray(flat_params[p])[~np.asarray(m)] != 0)
               for p, m in flat_masks.items())
    model = model_build.build_model(run.config, run.dataset.num_classes)
    images = run.dataset.test_images
    reference = np.asarray(jax.jit(model.apply)(
        {"params": params, "masks": masks},
        data_lib.normalize(images, run.dataset.mean, run.dataset.std)))
    loaded = export.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.logits(images)), reference)
    np.testing.assert_array_equal(np.asarray(loaded.logits(images, with_masks=False)),
                                  reference)
    assert (loaded.num_classes, loaded.image_shape, loaded.step) == (4, (8, 8, 1), 24)


def test_export_file_holds_the_config_and_only_kept_values(workdir, exported):
    path, summary = exported
    data = path.read_bytes()
    metadata = export.read_metadata(data)
    assert json.loads(metadata["config"]) == json.loads((workdir / "config.json").read_text())
    tensors = safetensors.numpy.load(data)
    for name, tensor in tensors.items():
        if name.startswith("kept/"):
            assert tensor.shape == (kept_of(name.removeprefix("kept/")),)
    # Masks of 256 and 64 entries: kept indices as uint8 (26 and 6 bytes) beat bits (32, 8);
    # of 512: bits (64 bytes) beat uint16 indices (102).
    assert summary["encodings"] == {p: "bits" if "/fc" in p else "indices"
                                    for p in summary["encodings"]}
    payload = sum(t.nbytes for t in tensors.values())
    assert payload == 4 * (TOTAL - PRUNABLE + PRUNABLE_KEPT) + 8 * 26 + 6 + 4 * 64


@pytest.mark.parametrize("size, dtype", [(256, np.uint8), (257, np.uint16),
                                         (65536, np.uint16), (65537, np.uint32)])
def test_index_dtype_is_the_smallest_that_holds_the_last_index(size, dtype):
    assert export.index_dtype(size) == dtype


@pytest.mark.parametrize("size, kept, kind, nbytes", [
    (1000, 5, "indices", 10),  # uint16 indices 10 bytes < bits 125
    (200, 20, "indices", 20),  # uint8 indices 20 < bits 25
    (300, 150, "bits", 38),  # bits ceil(300 / 8) = 38 < uint16 indices 300
    (40, 0, "indices", 0),
    (40, 40, "bits", 5),
])
def test_mask_encoding_picks_the_smaller_form_and_round_trips(size, kept, kind, nbytes):
    rng = np.random.default_rng(size + kept)
    mask = np.zeros(size, bool)
    mask[rng.choice(size, kept, replace=False)] = True
    mask = mask.reshape(-1, 4) if size % 4 == 0 else mask
    got_kind, data = export.encode_mask(mask)
    assert (got_kind, data.nbytes) == (kind, nbytes)
    np.testing.assert_array_equal(export.decode_mask(got_kind, data, mask.shape), mask)


def test_load_rejects_a_file_that_is_not_an_nbjax_export(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(safetensors.numpy.save({"w": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="not an nbjax export"):
        export.load(path)
