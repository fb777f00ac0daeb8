"""The study: the smoke grid end to end, resume of a half-finished study, an honest report."""

import json
import os
import pathlib

import pytest

from nbjax.config import load_config_file
from nbjax.study import report as study_report
from nbjax.study import runner as study
from nbjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def smoke_study():
    config = load_config_file(ROOT / "configs" / "study_smoke.py")
    config.base.train.progress = False
    return config


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    status = study.run_study(smoke_study(), workdir, log=lambda *_: None)
    return workdir, status


def test_grid_expansion_names_and_dedup():
    specs = study.expand(smoke_study())
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert names[:2] == ["dense_none_seed0", "dense_tome_seed0"]
    assert "gmp_s0.9_tome_seed0" in names and "static_s0.5_none_seed0" in names
    assert len(specs) == 2 + 2 * 2 * 2
    tome_cfg = next(s.config for s in specs if s.name == "gmp_s0.9_tome_seed0")
    assert tome_cfg.mitigation.token_merging.mode == "single_pass"
    assert tome_cfg.pruning.sparsity == 0.9

    full = load_config_file(ROOT / "configs" / "study_mnist.py")
    names = [s.name for s in study.expand(full)]
    assert "pdwp_s0.9_persistent_seed0" not in names  # pdwp is persistent already
    assert "static_s0.9_both_seed0" not in names


def test_bad_grid_value_is_named():
    config = smoke_study()
    config.grid.mitigations = ("none", "tomee")
    with pytest.raises(ValueError, match="grid.mitigations"):
        study.expand(config)


def test_smoke_study_runs_and_report_matches_logs(finished_study):
    workdir, status = finished_study
    assert set(status.values()) == {"ran"}
    report = study_report.write_study_report(workdir)
    text = pathlib.Path(report).read_text()
    for png in ("accuracy_vs_sparsity.png", "burden_vs_sparsity.png", "burden_vs_drop.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000
        assert f"]({png})" in text
    assert "| method | sparsity | none | tome |" in text
    assert "Accuracy falls as sparsity grows" in text
    # Every table cell equals the final metrics in the run's own log.
    summary = study_report.summarize(study_report.load_study(workdir))
    for spec in study.expand(smoke_study()):
        with open(os.path.join(workdir, "runs", spec.name, "metrics.jsonl")) as f:
            final = [json.loads(line) for line in f][-1]
        assert final["final"] is True
        if spec.method == "none":
            mean = summary.dense[spec.mitigation][0]
        else:
            mean = summary.accuracy[(spec.method, spec.sparsity, spec.mitigation)][0]
        assert mean == pytest.approx(final["test/accuracy"], abs=1e-12)
        assert f"{mean:.4f}" in text


def test_resume_runs_only_missing_runs(finished_study, tmp_path, monkeypatch):
    workdir, _ = finished_study
    for name in ("gmp_s0.5_none_seed0", "static_s0.9_tome_seed0"):
        os.remove(os.path.join(workdir, "runs", name, "final_metrics.json"))
    ran = []
    real = loop.train_and_evaluate

    def counting(config, path, dataset=None):
        ran.append(os.path.basename(path))
        return real(config, path, dataset)

    monkeypatch.setattr(loop, "train_and_evaluate", counting)
    status = study.run_study(smoke_study(), workdir, log=lambda *_: None)
    assert sorted(ran) == ["gmp_s0.5_none_seed0", "static_s0.9_tome_seed0"]
    assert sum(v == "ran" for v in status.values()) == 2


def test_claims_are_respected_by_other_processes(tmp_path):
    path = str(tmp_path / "run")
    assert study.claim(path)
    with open(os.path.join(path, ".claim"), "w") as f:
        json.dump({"host": "another-host", "pid": 1}, f)
    assert not study.claim(path)
    with open(os.path.join(path, ".claim"), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345}, f)  # dead pid here
    assert study.claim(path)
    study.release(path)
    assert not os.path.exists(os.path.join(path, ".claim"))


def test_dry_run_command_lists_runs_and_trains_nothing(tmp_path):
    """``--dry-run`` (and absl's ``--dry_run``) lists every run with an estimate, runs none."""
    import subprocess
    import sys

    workdir = tmp_path / "study"
    for flag in ("--dry-run", "--dry_run"):
        out = subprocess.run(
            [sys.executable, "-m", "nbjax.study", "--config",
             str(ROOT / "configs" / "study_smoke.py"), "--workdir", str(workdir), flag],
            capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
        specs = study.expand(smoke_study())
        assert specs and all(spec.name in out for spec in specs)
        assert f"{len(specs)} runs, {len(specs)} to do" in out
        assert not any(os.path.exists(study.run_dir(str(workdir), s)) for s in specs)
