"""The benchmark command and the performance options (nothing here is timed).

That k steps in one compiled call (``lax.scan``) equal k single steps is checked by
``tests/test_train.py::test_scan_of_k_steps_equals_k_single_steps`` (params and losses).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config, smoke_dataset

from nbjax.bench import report as bench_report
from nbjax.bench import runner as bench
from nbjax.bench import torch_ref as bench_torch
from nbjax.bench import variants as bench_variants
from nbjax.model import vit as model_lib
from nbjax.parallel.mesh import make_mesh
from nbjax.pruning import make_pruner
from nbjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_command_writes_json_with_expected_keys(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["NBJAX_COMPILATION_CACHE"] = jax.config.jax_compilation_cache_dir or ""
    cmd = [sys.executable, "-m", "nbjax.bench", "--config", str(ROOT / "configs" / "smoke.py"),
           "--variants", "dense,gmp+burden", "--steps", "16", "--warmup", "1",
           "--config.pruning.update_every=8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gmp+burden" in proc.stdout and "img/s" in proc.stdout
    result = json.loads(out.read_text())
    for key in bench.JSON_KEYS:
        assert key in result, key
    assert set(result["variants"]) == {"dense", "gmp+burden"}
    assert result["overrides"] == ["--config.pruning.update_every=8"]
    assert result["steps"] == 16 and result["steps_per_call"] == 4
    for name, r in result["variants"].items():
        for key in bench.VARIANT_KEYS:
            assert key in r, (name, key)
        assert r["step_s"] > 0 and r["img_s"] > 0 and r["compile_s"] > 0
        assert r["model_flops_per_step"] > 0 and r["flops_per_step"] > 0
    assert result["variants"]["dense"]["update"] is None
    update = result["variants"]["gmp+burden"]["update"]
    assert update["every"] == 8 and update["num_update_calls"] >= 1
    assert update["window_ratio"] > 0
    assert "gmp+burden/dense" in result["ratios"]


def test_run_bench_in_process_plain_jax_and_masked():
    config = smoke_config()
    lines = []
    result = bench.run_bench(config, ["plain_jax", "rigl"], steps=8, warmup=1,
                             print_fn=lines.append)
    assert set(result["variants"]) == {"plain_jax", "rigl"}
    assert result["variants"]["plain_jax"]["num_devices"] == 1
    assert result["variants"]["rigl"]["num_devices"] == jax.device_count()
    # The plain step's compiled FLOPs are one fwd+bwd: near the model FLOPs (3x forward).
    plain = result["variants"]["plain_jax"]
    assert 0.5 < plain["flops_per_step"] / plain["model_flops_per_step"] < 2.0
    assert "rigl/plain_jax" in result["ratios"]
    assert any("rigl" in line for line in lines)
    json.dumps(result)  # JSON-able


def test_variant_names_parse_and_reject_typos():
    v = bench_variants.Variant.parse("rigl+burden+tome")
    assert (v.head, v.burden, v.tome, v.bf16, v.masked) == ("rigl", True, True, False, True)
    assert not bench_variants.Variant.parse("dense").masked
    for bad in ("rigel", "gmp+burdn", "plain_jax+burden"):
        with pytest.raises(ValueError):
            bench_variants.Variant.parse(bad)


def test_variant_configs():
    base = smoke_config()
    dense = bench_variants.variant_config(base, bench_variants.Variant.parse("dense"))
    assert dense.pruning.method == "none" and not dense.burden.enabled
    assert dense.mitigation.token_merging.mode == "off"
    full = bench_variants.variant_config(base, bench_variants.Variant.parse("gmp+burden+tome+bf16"))
    assert full.pruning.method == "gmp" and full.burden.enabled
    assert full.mitigation.token_merging.mode == "single_pass"
    assert full.model.dtype == "bfloat16"


def test_unmasked_variant_has_no_masks():
    config = bench_variants.variant_config(smoke_config(), bench_variants.Variant.parse("dense"))
    run = loop.build(config, smoke_dataset(), mesh=make_mesh(jax.devices()[:1]),
                     pruner=bench_variants.unmasked_pruner())
    assert run.state.masks == {} and run.state.pruning == {}


def test_first_update_step_and_peak_table():
    first = lambda config: make_pruner(config, 40).first_update
    assert first(smoke_config(**{"pruning.method": "gmp"})) == 4  # start_frac 0.1 of 40 steps
    assert first(smoke_config(**{"pruning.method": "rigl"})) == 4
    assert first(smoke_config()) is None
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert bench.peak_flops("TPU v5 lite", "float32") == 197e12
    assert bench.peak_flops("cpu", "float32") is None
    assert bench.scan_flops_factor() in (1, 2)


def _result(step_ms: float, window: float | None = None) -> dict:
    update = None if window is None else {"window_ratio": window}
    return {"step_s": step_ms / 1e3, "img_s": 128 / (step_ms / 1e3), "update": update}


def test_report_ratios_and_targets_compare_like_with_like():
    variants = {"dense": _result(20.0), "dense+bf16": _result(10.0),
                "gmp+burden": _result(23.0, 1.05), "gmp+burden+bf16": _result(10.5, 1.20)}
    out = {"variants": variants, "torch": {"step_s": 0.025, "img_s": 128 / 0.025}}
    ratios = bench_report.ratios(variants, out["torch"])
    assert ratios["gmp+burden/dense"] == pytest.approx(1.15)
    assert ratios["gmp+burden_vs_torch_img_s"] == pytest.approx(25 / 23)
    lines = bench_report.target_lines(out)
    # bf16 is held to the bf16 dense step, not the float32 one (10.5 / 10 = 1.05, met)
    assert "target: gmp+burden / dense = 1.150 (<= 1.10: NOT met)" in lines
    assert "target: gmp+burden+bf16 / dense+bf16 = 1.050 (<= 1.10: met)" in lines
    assert "target: gmp+burden+bf16 mask-update window / plain step = 1.200 (<= 1.15: NOT met)" \
        in lines
    assert "target: gmp+burden 5565 img/s vs torch eager 5120 img/s (met)" in lines


@pytest.mark.skipif(not bench_torch.available(), reason="torch is not installed")
def test_torch_reference_step_runs():
    shape = bench_torch.TorchShape(image_size=8, patch_size=2, hidden_dim=16, depth=2,
                                   num_heads=2, mlp_dim=32, num_classes=4, batch_size=16)
    step = bench_torch.TorchStep(shape, num_examples=64)
    assert step.run(3) > 0
    assert np.isfinite(step.losses[-1])
    for weight, mask in step.masked:  # pruned weights stay zero after AdamW
        assert float((weight.detach() * (1 - mask)).abs().sum()) == 0.0
        assert 0.8 < 1 - float(mask.mean()) < 1.0


def test_bf16_compute_trains_smoke_config_with_fp32_state():
    config = smoke_config(**{"model.dtype": "bfloat16"})
    run = loop.build(config, smoke_dataset(), mesh=make_mesh(jax.devices()[:1]))
    model = model_lib.build_model(config, run.dataset.num_classes)
    assert model.dtype == jnp.bfloat16
    images = jnp.zeros((2, *run.dataset.image_shape), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p, "masks": run.state.masks},
                                                     images))(run.state.params))
    assert "bf16" in jaxpr  # the matmuls really run in bfloat16
    order = loop.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                            config.seed)
    k = config.train.steps_per_call
    state, losses = run.state, []
    for c in range(10):
        idx = jax.device_put(order.block(c * k, k))
        state, metrics = run.train_chunk(state, run.train_images, run.train_labels, idx)
        losses.append(np.asarray(metrics["train/loss"]))
    assert np.all(np.isfinite(np.concatenate(losses)))
    assert np.mean(losses[-1]) < 0.5 * losses[0][0], (losses[0][0], np.mean(losses[-1]))
    # Params and optimizer moments stay float32.
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
