"""The study: its grid, the smoke study end to end with its records store, resume, status,
and a report with known statistics built from synthetic records."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from nbjax.config import load_config_file
from nbjax.study import claims, cli, progress, records, store
from nbjax.study import report as study_report
from nbjax.study import runner as study
from nbjax.tome import cost
from nbjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def smoke_study():
    config = load_config_file(ROOT / "configs" / "study_smoke.py")
    config.base.train.progress = False
    return config


def test_grid_order_seeds_innermost_methods_in_grid_order():
    specs = study.expand(load_config_file(ROOT / "configs" / "study_mnist.py"))
    # Per seed: dense and dense+tome (2), gmp/rigl/set 3 sparsities × none/tome/both (9 each),
    # static and pdwp 3 × none/tome (6 each; no separate "both"): 41; three seeds: 123.
    assert len(specs) == 123
    assert [s.seed for s in specs] == [0, 1, 2] * 41
    cells = [s.name.rsplit("_seed", 1)[0] for s in specs[::3]]
    assert cells[:5] == ["dense_none", "dense_tome", "gmp_s0.5_none", "gmp_s0.5_tome",
                         "gmp_s0.5_both"]
    methods = list(dict.fromkeys(s.method for s in specs))
    assert methods == ["none", "gmp", "static", "rigl", "set", "pdwp"]
    assert "static_s0.9_both" not in cells and "pdwp_s0.9_both" not in cells
    both = next(s.config for s in specs if s.name == "rigl_s0.98_both_seed2")
    assert both.mitigation.persistent and both.mitigation.token_merging.mode == "single_pass"
    assert both.seed == 2 and both.pruning.sparsity == 0.98


def test_variants_and_equal_compute_cells():
    config = smoke_study()
    config.grid.update(dict(methods=("gmp",), sparsities=(0.9,), mitigations=("none", "tome"),
                            dense=False, tome_variants=("keep0.75", "keep0.5", "every_r2"),
                            equal_compute=("keep0.5",), variant_sparsities=(0.9,)))
    specs = study.expand(config)
    # keep0.5 is the grid's own tome cell, so it is not repeated.
    assert [s.name for s in specs] == [
        "gmp_s0.9_none_seed0", "gmp_s0.9_tome_seed0", "gmp_s0.9_tome-keep0.75_seed0",
        "gmp_s0.9_tome-every_r2_seed0", "gmp_s0.9_tome-keep0.5-eqflops_seed0"]
    every = specs[3].config.mitigation.token_merging
    assert (every.mode, every.r) == ("every_layer", 2)
    assert specs[2].config.mitigation.token_merging.keep_ratio == 0.75
    equal = specs[4]
    report = cost.cost_report(specs[1].config, 4, (8, 8, 1), compiled=False)
    factor = report.analytic_unmerged / report.analytic_merged
    assert factor > 1.2
    assert equal.variant == {"tome": "keep0.5", "equal_compute": True, "train_factor": factor}
    assert equal.config.train.num_steps == round(24 * factor)
    assert specs[1].config.train.num_steps == 24


def test_bad_grid_values_are_named():
    config = smoke_study()
    config.grid.mitigations = ("none", "tomee")
    with pytest.raises(ValueError, match="grid.mitigations"):
        study.expand(config)
    config = smoke_study()
    config.grid.tome_variants = ("half",)
    with pytest.raises(ValueError, match="keep<ratio>"):
        study.expand(config)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    store_dir = str(tmp_path_factory.mktemp("store") / "cells")
    status = study.run_study(smoke_study(), workdir, records=store_dir, log=lambda *_: None)
    return workdir, store_dir, status


def test_smoke_study_writes_one_record_per_cell(finished_study):
    workdir, store_dir, status = finished_study
    specs = study.expand(smoke_study())
    assert status == {s.name: "ran" for s in specs}
    assert [c["cell"] for c in store.read_manifest(store_dir)["cells"]] == [s.name for s in specs]
    for spec in specs:
        with open(store.record_path(store_dir, spec.name)) as f:
            record = json.load(f)
        with open(os.path.join(study.run_dir(workdir, spec), "final_metrics.json")) as f:
            assert record["final"] == json.load(f)
        assert record["wall_time_s"] > 0 and record["machine"]["device_count"] >= 1
        assert (record["arm"], record["seed"], record["study"]) == (spec.arm, 0, "smoke")
        # The record holds what its run directory holds (machine and code aside).
        rebuilt = records.from_run_dir(study.run_dir(workdir, spec),
                                       {"study": "smoke", **spec.fields()})
        assert rebuilt | {"machine": record["machine"], "code": record["code"]} == record


def test_report_from_records_alone_equals_report_with_run_dirs(finished_study, tmp_path):
    workdir, store_dir, _ = finished_study
    with_runs = study_report.write_study_report(workdir, str(tmp_path / "with_runs"))
    alone = str(tmp_path / "copied" / "cells")
    shutil.copytree(store_dir, alone)  # no run directory anywhere near it
    from_records = study_report.write_study_report(str(tmp_path / "copied"))
    assert [os.path.basename(p) for p in from_records] == [os.path.basename(p)
                                                           for p in with_runs]
    assert os.path.dirname(from_records[-1]) == str(tmp_path / "copied")
    text = pathlib.Path(from_records[-1]).read_text()
    assert text == pathlib.Path(with_runs[-1]).read_text()
    assert "Complete: all 10 cells of the grid are recorded." in text
    assert "| gmp | 0.9 |" in text and "no verdict (<3 sparsities)" in text
    for png in from_records[:-1]:
        assert os.path.getsize(png) > 1000 and f"]({os.path.basename(png)})" in text


def test_rerun_skips_recorded_cells_and_runs_missing(finished_study, monkeypatch):
    workdir, store_dir, _ = finished_study
    ran = []
    real = loop.train_and_evaluate

    def counting(config, path, dataset=None):
        ran.append(os.path.basename(path))
        return real(config, path, dataset)

    monkeypatch.setattr(loop, "train_and_evaluate", counting)
    os.remove(store.record_path(store_dir, "gmp_s0.5_none_seed0"))  # run dir kept: re-recorded
    os.remove(store.record_path(store_dir, "static_s0.9_tome_seed0"))  # and its run: retrained
    shutil.rmtree(os.path.join(workdir, "runs", "static_s0.9_tome_seed0"))
    status = study.run_study(smoke_study(), workdir, records=store_dir, log=lambda *_: None)
    assert ran == ["static_s0.9_tome_seed0"]
    assert status["gmp_s0.5_none_seed0"] == "recorded (finished run)"
    assert status["static_s0.9_tome_seed0"] == "ran"
    assert sum(v == "skipped (recorded)" for v in status.values()) == 8
    assert len(store.load_records(store_dir)) == 10


def test_status_table_and_command(finished_study, tmp_path):
    _, store_dir, _ = finished_study
    partial = str(tmp_path / "cells")
    shutil.copytree(store_dir, partial)
    os.remove(store.record_path(partial, "gmp_s0.9_tome_seed0"))
    os.remove(store.record_path(partial, "static_s0.5_none_seed0"))
    workdir = str(tmp_path / "work")
    assert claims.claim(os.path.join(workdir, "runs", "gmp_s0.9_tome_seed0"))  # a live claim
    table = study.print_status(smoke_study(), partial, workdir)
    assert re.search(r"^gmp_s0.9_tome +running$", table, re.M)
    assert re.search(r"^static_s0.5_none +missing$", table, re.M)
    assert re.search(r"^dense_none +done$", table, re.M)
    assert table.splitlines()[-1] == "10 cells: 8 done, 1 running, 1 missing"
    out = subprocess.run([sys.executable, "-m", "nbjax.study", "--status", partial],
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "10 cells: 8 done, 0 running, 2 missing"


def test_dry_run_lists_cells_and_trains_nothing(tmp_path):
    workdir, store_dir = tmp_path / "study", tmp_path / "cells"
    out = subprocess.run(
        [sys.executable, "-m", "nbjax.study", "--config", str(ROOT / "configs" /
                                                              "study_smoke.py"),
         "--workdir", str(workdir), "--records", str(store_dir), "--dry-run"],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=600).stdout
    specs = study.expand(smoke_study())
    assert all(f"{spec.name} " in out for spec in specs)
    assert f"{len(specs)} cells, {len(specs)} to do" in out
    assert not workdir.exists() and not store_dir.exists()


def test_argv_spellings():
    assert cli.rewrite_argv(["p", "--dry-run", "--status", "DIR", "--workdir", "W"]) == [
        "p", "--dry_run", "--status", "--records=DIR", "--workdir", "W"]
    assert cli.rewrite_argv(["p", "--status", "--config", "c.py"]) == [
        "p", "--status", "--config", "c.py"]


def test_claims_are_respected_by_other_processes(tmp_path):
    path = str(tmp_path / "run")
    assert claims.claim(path)
    with open(os.path.join(path, ".claim"), "w") as f:
        json.dump({"host": "another-host", "pid": 1}, f)
    assert not claims.claim(path) and claims.holder(path)["host"] == "another-host"
    with open(os.path.join(path, ".claim"), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345}, f)  # dead pid here
    assert claims.holder(path) is None
    assert claims.claim(path)
    claims.release(path)
    assert not os.path.exists(os.path.join(path, ".claim"))


def test_progress_eta_from_records_then_from_cells_run_here(tmp_path):
    cells = str(tmp_path)
    for name, seconds in (("a", 100.0), ("b", 300.0), ("other", 9999.0)):
        store.write_record(cells, {"schema": records.SCHEMA_VERSION, "cell": name,
                                   "wall_time_s": seconds})
    lines = []
    bar = progress.Progress(["a", "b", "c", "d"], cells, lines.append)
    # 2 of 4 recorded; 200 s per cell from the records of this grid ("other" is not in it).
    assert bar.line(None) == "study 2/4 cells done | ETA 7 min (3 min/cell over 2 in the records)"
    bar.start("c")
    bar.finish(60.0)  # 1 cell left at 60 s measured here
    assert lines == ["study 2/4 cells done | running c | ETA 7 min (3 min/cell over 2 in the "
                     "records)"]
    assert bar.line(None) == "study 3/4 cells done | ETA 1 min (1 min/cell over 1 run here)"


# ------------------------------------------------------- a report from synthetic records

SEEDS = (0, 1, 2)
DENSE_ACC = (99.0, 98.0, 97.0)  # percent, per seed


def _record(method, sparsity, arm, seed, acc, index=None, selection=None, compensation=None):
    name = ("dense" if method == "none" else f"{method}_s{sparsity:g}") + f"_{arm}_seed{seed}"
    return {"schema": records.SCHEMA_VERSION, "cell": name, "method": method,
            "sparsity": sparsity, "mitigation": arm, "arm": arm, "seed": seed, "variant": {},
            "config": {"data": {"source": "mnist"}}, "final": {"test/accuracy": acc / 100},
            "end_of_pruning": {"burden/index": index, "burden/selection_index": selection,
                               "burden/compensation_index": compensation},
            "wall_time_s": 60.0, "machine": None, "code": None}


def _pruned(method, seeds, sparsities, acc, index, selection=lambda s, p: None):
    """Plain cells; compensation = drop / 100 + sparsity, so within a sparsity it is a
    straight line in the drop (partial correlation 1)."""
    out = []
    for s in seeds:
        for p in sparsities:
            a = acc(s, p)
            out.append(_record(method, p, "none", s, a, index(s, p), selection(s, p),
                               (DENSE_ACC[s] - a) / 100 + p))
    return out


def synthetic_records():
    recs = [_record("none", 0.0, "none", s, DENSE_ACC[s], 1.0) for s in SEEDS]
    gmp = _pruned("gmp", SEEDS, (0.5, 0.9, 0.98), lambda s, p: 98 - (10, 12, 14)[s] * p,
                  lambda s, p: 1 + (1, 2, 3)[s] * p)
    gain = {0.5: (0, 0, 0), 0.9: (1, 2, 3), 0.98: (2, 3, 4)}
    for r in gmp:  # tome: accuracy + gain, burden index - 0.1 (s + 1), compensation - 0.05
        s, p = r["seed"], r["sparsity"]
        recs.append(_record("gmp", p, "tome", s, 100 * r["final"]["test/accuracy"] + gain[p][s],
                            r["end_of_pruning"]["burden/index"] - 0.1 * (s + 1), None,
                            r["end_of_pruning"]["burden/compensation_index"] - 0.05))
    recs += gmp
    recs += _pruned("static", SEEDS, (0.5, 0.9, 0.98), lambda s, p: 90 + (5, 10, 15)[s] * p,
                    lambda s, p: 1 - (0.3, 0.4, 0.5)[s] * p, lambda s, p: (0.98, 1.0, 1.02)[s])
    recs += _pruned("rigl", (0,), (0.5, 0.9, 0.98), lambda s, p: 95 - 5 * p, lambda s, p: 1 + p)
    recs += _pruned("set", SEEDS, (0.5, 0.9), lambda s, p: 96 - 3 * p, lambda s, p: 1 + p)
    return recs


def test_report_from_synthetic_records(tmp_path):
    cells = str(tmp_path / "cells")
    recs = synthetic_records()
    for r in reversed(recs):  # the report's order must not depend on the records'
        store.write_record(cells, r)
    fields = [{k: r[k] for k in ("cell", "method", "sparsity", "arm", "seed")} for r in recs]
    store.write_manifest(cells, "synthetic", fields + [{**fields[-1], "cell": "set_s0.98_x"}])
    text = pathlib.Path(study_report.write_study_report(str(tmp_path))[-1]).read_text()
    assert "**Unfinished study**: 39 of 40 cells recorded. Missing (1): `set_s0.98_x`." in text
    # t_{.975,2} = 4.302653; half-width = 4.302653 · s / √3: s = 1 -> 2.48, s = 2 -> 4.97.
    expected_rows = [
        "| dense | 0 | 98.00 ± 2.48 (n=3) |",  # 99, 98, 97
        "| gmp | 0.5 | 92.00 ± 2.48 (n=3) | 92.00 ± 2.48 (n=3) |",  # 98 - (10,12,14)·0.5
        "| rigl | 0.5 | 92.50 (n=1, no CI) |",
        # (a) slopes -10, -12, -14: mean -12, s = 2
        "| (a) | gmp | test accuracy (%) | **supported** | -12.00 ± 4.97 (n=3) points per "
        "unit sparsity; 3 sparsities |",
        # slopes 5, 10, 15: s = 5 -> 4.302653 · 5 / √3 = 12.42; CI [-2.42, 22.42]
        "| (a) | static | test accuracy (%) | **inconclusive** | +10.00 ± 12.42 (n=3)",
        "| (a) | rigl | test accuracy (%) | **no verdict (n<2)** | -5.00 (n=1, no CI)",
        "| (a) | set | test accuracy (%) | **no verdict (<3 sparsities)** |",
        # (b) slopes 1, 2, 3: 2 ± 2.484 holds 0; static -0.3, -0.4, -0.5: -0.4 ± 0.248 < 0
        "| (b) | gmp | burden index | **inconclusive** | +2.000 ± 2.484 (n=3)",
        "| (b) | static | burden index | **contradicted** | -0.400 ± 0.248 (n=3)",
        # (c) gains 1, 2, 3 at 0.9 (CI holds 0) and 2, 3, 4 at 0.98 (CI [0.52, 5.48])
        "| (c) | gmp s=0.9 tome | test accuracy (%) | **inconclusive** | +2.00 ± 2.48 (n=3) |",
        "| (c) | gmp s=0.98 tome | test accuracy (%) | **supported** | +3.00 ± 2.48 (n=3) |",
        # (d) burden index -0.1, -0.2, -0.3; compensation -0.05 for every seed (s = 0)
        "| (d) | gmp s=0.5 tome | burden index | **inconclusive** | -0.200 ± 0.248 (n=3) |",
        "| (d) | gmp s=0.98 tome | compensation index | **supported** | -0.050 ± 0.000 (n=3) |",
        # (e) compensation - sparsity = drop / 100 within each sparsity: r = 1; n = 9+9+3+6
        "| (e) | all methods | compensation index | **supported** | r = +1.00 [+1.00, +1.00] "
        "(n=27) |",
        # (f) 0.98, 1.0, 1.02: s = 0.02 -> 4.302653 · 0.02 / √3 = 0.0497
        "| (f) | static s=0.9 | selection index | **CI contains 1** | 1.000 ± 0.050 (n=3) |",
        "| (a) accuracy falls as sparsity grows (mean per-seed slope < 0; no mitigation) "
        "| 1 | 0 | 1 | 2 |",
    ]
    for row in expected_rows:
        assert row in text, row
    assert "(c) | gmp s=0.5" not in text  # claim (c) is about sparsity >= 0.9 only
    assert "wall time: 0.65 h over 39 cells" in text  # 39 cells × 60 s
