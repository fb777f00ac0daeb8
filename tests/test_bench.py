"""The benchmark command and the performance options (nothing here is timed).

That k steps in one compiled call (``lax.scan``) equal k single steps is checked by
``tests/test_train.py::test_scan_of_k_steps_equals_k_single_steps`` (params and losses).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config, smoke_dataset

from nbjax.bench import measure
from nbjax.bench import population as bench_population
from nbjax.bench import report as bench_report
from nbjax.bench import runner as bench
from nbjax.bench import torch_ref as bench_torch
from nbjax.bench import variants as bench_variants
from nbjax.bench.timing import Timed
from nbjax.model import build as model_build
from nbjax.parallel.mesh import make_mesh
from nbjax.pruning import make_pruner
from nbjax.tome import cost
from nbjax.train import loop
from nbjax.train import order as order_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _check_figures(r: dict, batch: int, steps_per_call: int) -> None:
    """The relations docs/performance.md states between one variant's figures."""
    assert r["compile_s"] == pytest.approx(r["lower_s"] + r["xla_compile_s"])
    assert r["step_s"] > 0 and r["img_s"] == pytest.approx(batch / r["step_s"])
    assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"])
    assert r["model_flops_per_s"] == pytest.approx(r["model_flops_per_step"] / r["step_s"])
    assert r["mfu"] is None  # no peak FLOP/s is known for a CPU
    update = r["update"]
    if update is not None:
        assert update["plain_call_s"] == pytest.approx(r["step_s"] * steps_per_call)
        extra = (update["update_call_s"] - update["plain_call_s"]) / update["every"]
        assert update["window_step_s"] == pytest.approx(r["step_s"] + extra)
        assert update["window_ratio"] == pytest.approx(update["window_step_s"] / r["step_s"])


def test_bench_command_prints_and_writes_the_same_figures(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)  # with the tests' compilation cache (conftest)
    cmd = [sys.executable, "-m", "nbjax.bench", "--config", str(ROOT / "configs" / "smoke.py"),
           "--variants", "dense,gmp+burden", "--steps", "16", "--warmup", "1",
           "--config.pruning.update_every=8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert bench_report.format_table(result) in proc.stdout  # the table is the file's
    assert result["overrides"] == ["--config.pruning.update_every=8"]
    assert result["num_devices"] == jax.device_count()  # the test session's XLA_FLAGS
    assert (result["batch_size"], result["steps_per_call"], result["steps"]) == (32, 4, 16)
    assert list(result["variants"]) == ["dense", "gmp+burden"]
    model = model_build.build_model(smoke_config(), 4)
    forward = cost.compiled_forward_flops(model, (8, 8, 1))
    for r in result["variants"].values():
        assert r["num_calls"] == 4 and r["num_devices"] == jax.device_count()
        _check_figures(r, batch=32, steps_per_call=4)
        assert r["model_flops_per_step"] == pytest.approx(3 * forward * 32)
    dense, gmp = result["variants"]["dense"], result["variants"]["gmp+burden"]
    # Both cond branches are counted: the mask update and burden probe add FLOPs.
    assert gmp["flops_per_step"] > dense["flops_per_step"]
    assert dense["update"] is None
    # The timed range starts before gmp's first mask update; 16 steps at interval 8 hold two.
    assert gmp["update"]["every"] == 8 and gmp["update"]["num_update_calls"] == 2
    assert result["ratios"]["gmp+burden/dense"] == pytest.approx(
        gmp["step_s"] / dense["step_s"])


def test_bench_help_lists_the_bench_flags():
    proc = subprocess.run([sys.executable, "-m", "nbjax.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # absl's --help exits with 1
    for flag in ("--config", "--variants", "--steps", "--warmup", "--json", "--torch",
                 "--devices"):
        assert f"  {flag}" in proc.stdout, flag


def test_run_bench_in_process_plain_jax_and_masked():
    config = smoke_config()
    lines = []
    result = bench.run_bench(config, ["plain_jax", "rigl"], steps=8, warmup=1,
                             print_fn=lines.append)
    assert list(result["variants"]) == ["plain_jax", "rigl"]
    plain, rigl = result["variants"]["plain_jax"], result["variants"]["rigl"]
    assert plain["num_devices"] == 1
    assert rigl["num_devices"] == jax.device_count()
    for r in (plain, rigl):
        _check_figures(r, batch=32, steps_per_call=4)
    # The plain step's compiled FLOPs are one fwd+bwd: near the model FLOPs (3x forward).
    assert 0.5 < plain["flops_per_step"] / plain["model_flops_per_step"] < 2.0
    assert plain["update"] is None and plain["memory"]["temp_bytes"] > 0
    assert rigl["update"]["every"] == config.pruning.update_every
    assert result["ratios"]["rigl/plain_jax"] == pytest.approx(
        rigl["step_s"] / plain["step_s"])
    assert [line.split()[1] for line in lines[:2]] == ["plain_jax", "rigl"]  # compile lines
    assert lines[-1] == bench_report.format_table(result)
    json.dumps(result)  # JSON-able


def _timed(times, updated, update_every=None, peak=None):
    info = {"name": "v", "flops_per_step": 2e9, "model_flops_per_step": 1e9}
    timed = Timed("v", lambda: (times.pop(0), updated.pop(0)), steps=4, batch=32, info=info,
                  peak_flops=peak, update_every=update_every)
    for _ in range(len(times)):
        timed.record()
    return timed.summary()


def test_timed_summary_figures_by_hand():
    # Calls of 4 steps taking 40, 80 (with a mask update), 50 and 60 ms.
    r = _timed([0.04, 0.08, 0.05, 0.06], [False, True, False, False], update_every=8,
               peak=1e12)
    assert r["step_s"] == pytest.approx(0.05 / 4)  # median of the calls without an update
    assert r["img_s"] == pytest.approx(32 / 0.0125)
    assert r["mean_step_s"] == pytest.approx(0.23 / 16) and r["num_calls"] == 4
    assert r["flops_per_s"] == pytest.approx(2e9 / 0.0125)
    assert r["mfu"] == pytest.approx(1e9 / 0.0125 / 1e12)
    # One update of 80 ms instead of 50 ms every 8 steps: +3.75 ms per step on average.
    assert r["update"] == pytest.approx({
        "every": 8, "plain_call_s": 0.05, "num_update_calls": 1, "update_call_s": 0.08,
        "window_step_s": 0.0125 + 0.03 / 8, "window_ratio": 1.3})
    dense = _timed([0.02, 0.03, 0.01], [False, False, False])
    assert dense["step_s"] == pytest.approx(0.005) and dense["update"] is None
    assert dense["mfu"] is None  # no known peak


def test_cost_analysis_counts_a_matmul():
    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    assert cost.cost_analysis(compiled)["flops"] == 2 * 8**3  # a multiply-add is 2 FLOPs

    class NoAnalysis:
        def cost_analysis(self):
            raise NotImplementedError

    class PerDevice:
        def cost_analysis(self):
            return [{"flops": 5.0}, {"flops": 7.0}]

    assert cost.cost_analysis(NoAnalysis()) == {}
    assert cost.cost_analysis(PerDevice()) == {"flops": 5.0}
    # XLA counts a loop body once, so a scan's count is one step's (docs/performance.md).
    assert measure.scan_flops_factor() == 1


def test_bench_dataset_is_synthetic_of_the_config_image_shape():
    config = smoke_config(**{"data.synthetic_channels": 3})
    dataset = bench.bench_dataset(config)
    assert dataset.image_shape == (8, 8, 3) and dataset.num_classes == 4
    assert len(dataset.train_labels) == 4096  # at least 8 batches, at least 4096 images


def test_variant_names_parse_and_reject_typos():
    v = bench_variants.Variant.parse("rigl+burden+tome")
    assert (v.head, v.burden, v.tome, v.bf16, v.masked) == ("rigl", True, True, False, True)
    dense, plain = bench_variants.Variant.parse("dense"), bench_variants.Variant.parse(
        "plain_jax+bf16")
    assert (dense.masked, dense.plain, plain.masked, plain.plain) == (False, False, False, True)
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
    # The persistent mitigation stays on where the method has a persistent variant only.
    persistent = smoke_config(**{"mitigation.persistent": True})
    for head, kept in (("gmp", True), ("static", False)):
        config = bench_variants.variant_config(persistent, bench_variants.Variant.parse(head))
        assert config.mitigation.persistent is kept, head


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
    assert measure.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert measure.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert measure.peak_flops("TPU v5 lite", "float32") == 197e12
    assert measure.peak_flops("cpu", "float32") is None


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
    model = model_build.build_model(config, run.dataset.num_classes)
    assert model.dtype == jnp.bfloat16
    images = jnp.zeros((2, *run.dataset.image_shape), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p, "masks": run.state.masks},
                                                     images))(run.state.params))
    assert "bf16" in jaxpr  # the matmuls really run in bfloat16
    order = order_lib.BatchOrder(len(run.dataset.train_labels), config.train.batch_size,
                                 config.seed)
    k = config.train.steps_per_call
    state, losses = run.state, []
    for c in range(10):
        idx = jax.device_put(order.block(c * k, k))
        state, metrics = run.train_call(state, run.train_images, run.train_labels, idx)
        losses.append(np.asarray(metrics["train/loss"]))
    assert np.all(np.isfinite(np.concatenate(losses)))
    assert np.mean(losses[-1]) < 0.5 * losses[0][0], (losses[0][0], np.mean(losses[-1]))
    # Params and optimizer moments stay float32.
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype


def test_population_command_reports_consistent_figures(tmp_path):
    out = tmp_path / "population.json"
    env = dict(os.environ)  # with the tests' compilation cache (conftest)
    cmd = [sys.executable, "-m", "nbjax.bench", "--config", str(ROOT / "configs" / "smoke.py"),
           "--population", "2,1", "--steps", "8", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert bench_report.format_table(result) in proc.stdout
    # Without --variants, the member variant's single run is the only variant.
    assert list(result["variants"]) == ["gmp+burden"]
    population = result["population"]
    assert population["variant"] == "gmp+burden" and population["sizes"] == [1, 2]
    assert list(population["rows"]) == ["1", "2"]
    devices = jax.device_count()
    forward = cost.compiled_forward_flops(model_build.build_model(smoke_config(), 4), (8, 8, 1))
    for n, r in ((int(n), r) for n, r in population["rows"].items()):
        assert r["name"] == f"gmp+burden x{n}" and r["members"] == n
        assert r["member_batch"] == 32 and r["num_calls"] == 2  # 8 steps of 4 per call
        members_axis = math.gcd(n, devices)
        assert r["mesh_shape"] == {"member": members_axis, "data": devices // members_axis}
        # aggregate img/s: N members x batch 32 x 4 steps over the median call's seconds
        assert r["img_s"] == pytest.approx(n * 32 * 4 / (4 * r["step_s"]))
        assert r["per_member_step_s"] == pytest.approx(r["step_s"] / n)
        assert r["single_img_s"] == pytest.approx(32 / r["single_step_s"])
        assert r["sequence_step_s"] == pytest.approx(n * r["single_step_s"])
        assert r["population_vs_sequence"] == pytest.approx(r["step_s"] / r["sequence_step_s"])
        assert r["img_s_vs_single"] == pytest.approx(1 / r["population_vs_sequence"])
        assert r["model_flops_per_step"] == pytest.approx(n * 3 * forward * 32)
        assert r["model_flops_per_s"] == pytest.approx(r["model_flops_per_step"] / r["step_s"])
        assert r["mfu"] is None  # no peak FLOP/s is known for a CPU
        assert r["memory"]["temp_bytes"] > 0 and r["memory"]["device_peak_bytes"] is None
    two, one = population["rows"]["2"], population["rows"]["1"]
    assert two["memory"]["argument_bytes"] > one["memory"]["argument_bytes"]  # 2 states
    assert "gmp+burden x2" in proc.stdout and "pop/seq" in proc.stdout


def test_population_row_and_targets_by_hand():
    pop = {"name": "gmp+burden+bf16 x4", "members": 4, "step_s": 0.08, "img_s": 4 * 128 / 0.08,
           "memory": {"temp_bytes": 1}, "mfu": None}
    single = {"step_s": 0.025, "img_s": 128 / 0.025}
    row = bench_population.population_row(pop, single, peak=2**20)
    assert row["per_member_step_s"] == pytest.approx(0.02)
    assert row["sequence_step_s"] == pytest.approx(0.1)  # 4 runs of 25 ms one after another
    assert row["population_vs_sequence"] == pytest.approx(0.8)
    assert row["img_s_vs_single"] == pytest.approx(6400 / 5120)
    assert row["memory"] == {"temp_bytes": 1, "device_peak_bytes": 2**20}
    assert pop["memory"] == {"temp_bytes": 1}  # the summary is left as it was
    rows = {"32": {"name": "v x32", "img_s_vs_single": 9.5, "mfu": 0.12},
            "64": {"name": "v x64", "img_s_vs_single": 14.0, "mfu": 0.16}}
    lines = bench_report.population_target_lines({"variant": "gmp+burden+bf16", "rows": rows})
    assert lines == ["target: v x32 aggregate img/s = 9.50 x the single run (>= 10: NOT met)",
                     "target: best MFU 16.0 % at v x64 (>= 15 %: met)"]
    # The MFU target is a bf16 one; without N = 32 there is no img/s target.
    assert bench_report.population_target_lines(
        {"variant": "gmp+burden", "rows": {"64": rows["64"]}}) == []


def test_population_flag_rejects_bad_sizes():
    from nbjax import errors
    from nbjax.bench import cli

    assert cli.population_sizes(["1", "2", "8"]) == [1, 2, 8]
    for bad in (["0"], ["two"], ["4", "-1"]):
        with pytest.raises(errors.UserError):
            cli.population_sizes(bad)
    with pytest.raises(ValueError):
        bench.run_bench(smoke_config(), ["dense"], population=[2],
                        population_variant="plain_jax")


def test_population_members_differ_only_in_the_seed():
    members = bench_population.member_configs(smoke_config(), bench_variants.Variant.parse(
        "rigl+burden"), 3)
    assert [m.seed for m in members] == [0, 1, 2]
    assert all(m.pruning.method == "rigl" and m.burden.enabled for m in members)
    flat = [m.to_dict() for m in members]
    for m in flat:
        m.pop("seed")
    assert flat[0] == flat[1] == flat[2]
