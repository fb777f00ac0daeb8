"""The study: its grid, the smoke study end to end with its records store, resume, status,
populations (grouping, claims, equality with one run per cell, the GPU script's dry run),
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
from nbjax.population import members as population_members
from nbjax.study import claims, cli, estimate, findings, progress, records, store
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


# ------------------------------------------------------------------------- populations

POPULATION_GRID = dict(methods=("gmp",), sparsities=(0.5, 0.9), mitigations=("none",),
                       dense=False)


def test_populations_group_by_program_in_grid_order(tmp_path):
    specs = study.expand(smoke_study())
    units = study.plan_units(specs, str(tmp_path), str(tmp_path / "cells"), 3)
    # One program per method × mitigation: sparsity is a per-member value, so the two
    # sparsities of each pruned arm share a population; dense and dense+tome stay alone.
    assert [[s.name for s in u] for u in units] == [
        ["dense_none_seed0"], ["dense_tome_seed0"],
        ["gmp_s0.5_none_seed0", "gmp_s0.9_none_seed0"],
        ["gmp_s0.5_tome_seed0", "gmp_s0.9_tome_seed0"],
        ["static_s0.5_none_seed0", "static_s0.9_none_seed0"],
        ["static_s0.5_tome_seed0", "static_s0.9_tome_seed0"]]
    assert study.plan_units(specs, str(tmp_path), str(tmp_path / "cells"), 1) == \
        [[s] for s in specs]


def test_populations_never_mix_programs_and_skip_recorded_cells(tmp_path):
    specs = study.expand(load_config_file(ROOT / "configs" / "study_mnist.py"))
    cells, workdir = str(tmp_path / "cells"), str(tmp_path / "work")
    recorded = specs[5]
    store.write_record(cells, {"schema": records.SCHEMA_VERSION, "cell": recorded.name})
    half_trained = specs[7]  # its own checkpoints: it resumes alone
    os.makedirs(os.path.join(study.run_dir(workdir, half_trained), "checkpoints"))
    units = study.plan_units(specs, workdir, cells, 4)
    names = [s.name for u in units for s in u]
    assert sorted(names) == sorted(s.name for s in specs if s is not recorded)
    assert [half_trained] in units
    for unit in units:
        assert 1 <= len(unit) <= 4
        keys = {population_members.program_key(s.config) for s in unit}
        assert len(keys) == 1, [s.name for s in unit]
        assert len({(s.method, s.arm) for s in unit}) == 1
    # 15 programs: dense and dense+tome (3 seeds each), and 13 pruned arms (gmp, rigl, set ×
    # none / tome / both; static, pdwp × none / tome) of 9 cells (3 sparsities × 3 seeds),
    # in populations of 4, 4 and 1. dense+tome lost its recorded seed, gmp none its
    # half-trained cell, which runs alone: 26 fours, 13 ones.
    sizes = [len(u) for u in units]
    assert {n: sizes.count(n) for n in set(sizes)} == {4: 26, 3: 1, 2: 1, 1: 13}


def test_population_size_auto_and_memory_rule():
    # The largest power of two <= 64 whose members fit: 8 × 100 <= 1000 < 16 × 100.
    assert estimate.population_size_for(100, 1000) == 8
    assert estimate.population_size_for(100, 50) == 1
    assert estimate.population_size_for(1, 10**12) == 64
    config = smoke_study().base
    assert estimate.auto_population_size([config], None) == 1  # a CPU backend
    assert study.population_size(smoke_study(), [], "unused") == 1
    with pytest.raises(ValueError, match="population_size"):
        study.population_size(smoke_study(), [], "unused", requested=-1)
    # Activations: batch × depth × tokens × (4 × hidden + mlp + heads × tokens) floats,
    # × 4 bytes × 2; smoke: 17 tokens, hidden 16, mlp 32, 2 heads, depth 2.
    from nbjax.data import pipeline as data_lib

    dataset = data_lib.load_dataset(config.data)
    wide = config.copy_and_resolve_references()
    wide.train.batch_size = 64
    assert estimate.member_bytes(wide, dataset) - estimate.member_bytes(config, dataset) == \
        32 * 2 * 17 * (4 * 16 + 32 + 2 * 17) * 4 * 2


def _close(single, member, path=""):
    """Every number of ``member`` within 2e-5 relative of ``single`` (float32 rounding
    amplified by Adam: about 3e-7 measured, and trajectories keep six digits); sparsities,
    steps and every non-float value equal."""
    if isinstance(single, dict):
        assert set(single) == set(member), path
        for key in single:
            _close(single[key], member[key], f"{path}/{key}")
    elif isinstance(single, list):
        assert len(single) == len(member), path
        for i, (a, b) in enumerate(zip(single, member, strict=True)):
            _close(a, b, f"{path}[{i}]")
    elif isinstance(single, float) and "sparsity" not in path:
        assert member == pytest.approx(single, rel=2e-5, abs=1e-9), path
    else:
        assert member == single, path


def test_population_study_equals_one_run_per_cell(finished_study, tmp_path, monkeypatch):
    _, single_store, _ = finished_study
    config = smoke_study()
    config.grid.update(POPULATION_GRID)
    workdir, cells = str(tmp_path / "work"), str(tmp_path / "cells")
    status = study.run_study(config, workdir, records=cells, log=lambda *_: None,
                             population_size_override=2)
    names = ["gmp_s0.5_none_seed0", "gmp_s0.9_none_seed0"]
    assert status == {n: "ran in a population" for n in names}
    specs = study.expand(config)
    assert os.listdir(os.path.join(workdir, "populations")) == [
        os.path.basename(study.population_dir(workdir, specs))]
    walls = []
    for name in names:
        with open(store.record_path(single_store, name)) as f:
            single = json.load(f)
        with open(store.record_path(cells, name)) as f:
            member = json.load(f)
        assert member["population_size"] == 2 and "population_size" not in single
        assert member["config"] == single["config"]
        # Test accuracy: at most one of the 200 test images classified otherwise.
        assert abs(member["final"].pop("test/accuracy")
                   - single["final"].pop("test/accuracy")) <= 1 / 200
        for key in ("final", "end_of_pruning", "end_of_training", "trajectories"):
            _close(single[key], member[key], key)
        walls.append(member["wall_time_s"])
    assert walls[0] == walls[1] > 0  # the population's wall time, shared out evenly
    from nbjax.population import loop as population_loop

    def never(*args, **kwargs):
        raise AssertionError("a recorded population trained again")

    monkeypatch.setattr(population_loop, "train_population", never)
    again = study.run_study(config, workdir, records=cells, log=lambda *_: None,
                            population_size_override=2)
    assert again == {n: "skipped (recorded)" for n in names}


def _fake_training(finished_workdir, calls):
    """A stand-in for train_population that copies the smoke study's finished run of the
    same sparsity into each member's directory (no training: the claims are under test)."""
    def train_population(configs, workdirs, directory, dataset=None, mesh=None):
        calls.append(([os.path.basename(w) for w in workdirs], os.path.basename(directory)))
        for config, workdir in zip(configs, workdirs, strict=True):
            source = os.path.join(finished_workdir, "runs",
                                  f"gmp_s{config.pruning.sparsity:g}_none_seed0")
            for name in ("config.json", "metrics.jsonl", "final_metrics.json"):
                shutil.copy(os.path.join(source, name), workdir)
        return []
    return train_population


def test_population_claims_leave_other_processes_cells(finished_study, tmp_path,
                                                      monkeypatch):
    from nbjax.population import loop as population_loop

    calls = []
    monkeypatch.setattr(population_loop, "train_population",
                        _fake_training(finished_study[0], calls))
    config = smoke_study()
    config.grid.update(POPULATION_GRID, seeds=(0, 1, 2))
    workdir, cells = str(tmp_path / "work"), str(tmp_path / "cells")
    specs = study.expand(config)
    names = [s.name for s in specs]  # s0.5 seeds 0-2, then s0.9 seeds 0-2: populations 4, 2
    other = {"host": "another-host", "pid": 1}
    held = [study.run_dir(workdir, specs[1]), study.population_dir(workdir, specs[4:])]
    for path in held:
        os.makedirs(path)
        with open(os.path.join(path, claims.CLAIM), "w") as f:
            json.dump(other, f)
    status = study.run_study(config, workdir, records=cells, log=lambda *_: None,
                             population_size_override=4)
    trained = [names[0], names[2], names[3]]
    assert calls == [(trained, os.path.basename(study.population_dir(workdir, [
        specs[0], specs[2], specs[3]])))]
    assert status == {n: "ran in a population" if n in trained else
                      "skipped (claimed by another process)" for n in names}
    for name in trained:
        with open(store.record_path(cells, name)) as f:
            assert json.load(f)["population_size"] == 3
    assert not any(os.path.exists(os.path.join(study.run_dir(workdir, s), claims.CLAIM))
                   for s in specs if study.run_dir(workdir, s) not in held)
    for path in held:  # the other processes are gone: a second pass runs the rest
        claims.release(path)
    status = study.run_study(config, workdir, records=cells, log=lambda *_: None,
                             population_size_override=4)
    assert calls[1][0] == [names[1], names[4], names[5]]
    assert [status[n] for n in trained] == ["skipped (recorded)"] * 3
    assert len(store.load_records(cells)) == 6


def _device_study(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "scripts" / "device_study.sh"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _estimate_minutes(out):
    return float(re.search(r"to do in 9 populations .*?\((\d+) min;", out).group(1))


def test_device_study_dry_run_prints_populations_and_fits(tmp_path):
    out = tmp_path / "out"
    proc = _device_study(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "study cifar10_gpu_e3: --config.base.train.num_epochs=3" in text
    heads = re.findall(r"^population (\d+)/9: (\d+) members", text, re.M)
    # dense: 3 seeds; each other program (gmp, rigl, set × none / both; static, pdwp × none):
    # 3 sparsities × 3 seeds.
    assert [int(n) for _, n in heads] == [3] + [9] * 8
    member_lines = re.findall(r"^  (\S+) +todo$", text, re.M)
    assert len(member_lines) == len(set(member_lines)) == 75
    assert "rigl_s0.98_both_seed2" in member_lines and "pdwp_s0.5_both_seed0" not in text
    assert "75 cells, 75 to do in 9 populations (at most 16 members)" in text
    assert "single-run estimate" in text and "docs/performance.md" in text
    assert _estimate_minutes(text) <= 10  # the default fits about 10 min of one H200
    assert not out.exists()  # a dry run writes nothing
    full = _device_study(str(out), "--full", "--dry-run")
    assert full.returncode == 0 and "study cifar10_gpu: the full grid, 100 epochs" in full.stdout
    assert _estimate_minutes(full.stdout) > 60  # why the default is reduced


def test_device_study_help_and_shellcheck():
    proc = _device_study("--help")
    assert proc.returncode == 0 and "REDUCED grid" in proc.stdout and "--full" in proc.stdout
    assert _device_study().returncode == 2  # no OUTDIR
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-x", str(ROOT / "scripts" / "device_study.sh")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


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
        "| (a) | set | test accuracy (%) | **no verdict (<3 sparsities)** | 2 sparsities; a trend "
        "needs 3 in one seed |",
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
        # over the 11 (method, sparsity) means (gmp, static, rigl at 3 sparsities; set at 2)
        "| (e) | method × sparsity means | compensation index | **supported** | "
        "r = +1.00 [+1.00, +1.00] (n=11) |",
        # (f) 0.98, 1.0, 1.02: s = 0.02 -> 4.302653 · 0.02 / √3 = 0.0497
        "| (f) | static s=0.9 | selection index | **CI contains 1** | 1.000 ± 0.050 (n=3) |",
        "| (a) accuracy falls as sparsity grows (mean per-seed slope < 0; no mitigation) "
        "| 1 | 0 | 1 | 2 |",
    ]
    for row in expected_rows:
        assert row in text, row
    assert "(c) | gmp s=0.5" not in text  # claim (c) is about sparsity >= 0.9 only
    assert "wall time: 0.65 h over 39 cells" in text  # 39 cells × 60 s


def test_decomposition_needs_two_methods_at_a_sparsity():
    cells = [findings.cell_of(r) for r in synthetic_records()]
    only_gmp = [c for c in cells if c.method in ("none", "gmp")]
    rows = findings.decomposition(only_gmp)
    assert [(r.metric, r.verdict) for r in rows] == [
        ("compensation index", "no verdict (<2 methods at one sparsity)"),
        ("burden index", "no verdict (<2 methods at one sparsity)")]  # gmp logs no selection
    # rigl (seed 0 only) joins gmp at every sparsity: 9 + 3 cells, r = 1 as in the full report
    with_rigl = [c for c in cells if c.method in ("none", "gmp", "rigl")]
    compensation = findings.decomposition(with_rigl)[0]
    assert compensation.verdict == "supported" and compensation.effect.endswith("(n=12)")


def test_decomposition_over_cells_and_over_method_means_by_hand():
    """Three methods at two sparsities, two seeds. The (method, sparsity) means of the
    compensation x and the drop y, residuals after each sparsity's mean: x (-1, 0, 1), y (-1, 1,
    0) at both, so r = 2 / √(4 · 4) = 0.5 over n = 6 means. The seeds sit at (-0.5, +0.5) and
    (+0.5, -0.5) around each mean, so over the 12 cells Σ rx·ry = 2·2 - 12·0.25 = 1 and
    Σ rx² = Σ ry² = 2·4 + 12·0.25 = 11: r = 1/11. Fisher z, k = 1: se = 1/√2 and 1/√8."""
    def cell(method, sparsity, seed, x, drop):
        return findings.Cell(f"{method}{sparsity}{seed}", "d", method, sparsity, "none", seed,
                             100.0 - drop, None, None, x, None)
    cells = [cell("none", 0.0, seed, None, 0.0) for seed in (0, 1)]
    for sparsity, offset in ((0.5, 0.0), (0.9, 10.0)):
        for method, x, y in (("gmp", 1, 1), ("rigl", 2, 3), ("static", 3, 2)):
            cells += [cell(method, sparsity, 0, x - 0.5, offset + y + 0.5),
                      cell(method, sparsity, 1, x + 0.5, offset + y - 0.5)]
    over_cells, over_means = findings.decomposition(cells)
    # z = atanh(1/11) = 0.091161, half = 1.959964 / √8 = 0.692953: tanh(-0.601792), tanh(0.784114)
    assert (over_cells.subject, over_cells.verdict) == ("all methods", "inconclusive")
    assert over_cells.effect == "r = +0.09 [-0.54, +0.66] (n=12)"
    # z = atanh(0.5) = 0.549306, half = 1.959964 / √2 = 1.385904: tanh(-0.836598), tanh(1.93521)
    assert (over_means.subject, over_means.verdict) == ("method × sparsity means",
                                                        "inconclusive")
    assert over_means.effect == "r = +0.50 [-0.68, +0.96] (n=6)"


def test_missing_cells_are_listed_with_their_seeds_together():
    expected = [{"cell": f"gmp_s0.9_tome_seed{s}", "seed": s} for s in (0, 1, 2)]
    expected += [{"cell": f"set_s0.5_none_seed{s}", "seed": s} for s in (0, 1)]
    expected += [{"cell": "custom_cell", "seed": 0}]
    records = [{"cell": "gmp_s0.9_tome_seed1"}, {"cell": "set_s0.5_none_seed0"}]
    assert study_report.status_lines(records, expected) == [
        "**Unfinished study**: 2 of 6 cells recorded. Missing (4): "
        "`gmp_s0.9_tome_seed{0,2}`, `set_s0.5_none_seed1`, `custom_cell`."]


def test_dry_run_warns_when_the_cpus_are_busy(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 0.0, 0.0))
    assert estimate.busy_note() == ""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))  # half of the 2 cores
    assert estimate.busy_note() == ("; the CPUs were busy (load average 1.0 on 2 cores), so "
                                    "these estimates run long")
