"""Population training (nbjax.population): a member trains as its run alone would.

The reference of every member is its single run on one device (helpers.run_steps). The
populations run on 1, 2, 4 and 8 devices, laid out by population_mesh as member x data =
1x1, 2x1, 1x2, 2x2, 1x4 and 2x4, so both the member axis and a member's batch are split.
train_population and its CLI write ordinary run directories, resume bit for bit and keep the
single loop's guarantees (docs/reliability.md).
"""

import json
import os
import re
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import error_lines, run_nbjax, run_steps, smoke_config, smoke_dataset, snapshot

from nbjax import errors, report, visualize
from nbjax.parallel import mesh as mesh_lib
from nbjax.population import __main__ as population_main
from nbjax.population import build as build_lib
from nbjax.population import loop as population_loop
from nbjax.population import members as members_lib
from nbjax.study import records
from nbjax.train import loop, preemption
from nbjax.train import order as order_lib

CALLS = 6  # 24 steps of the smoke schedule (40 steps): mask updates every 4 steps from step 4
# With token merging the attention keys also choose the merges, and the key bias (see NOISE_NU)
# is moved by rounding noise, so later a near-tie of the matching can go the other way for an
# image; from then on a member and its run alone differ by whole merges (measured: the first
# such flip at steps 16-19). Token merging is compared over the 12 steps before.
TOME_CALLS = 3
# Members differ in the seed and in every per-member value the method reads.
DENSE = [{"seed": 0},
         {"seed": 1, "train.learning_rate": 3e-3, "train.weight_decay": 0.0}]
GRADUAL = [{"seed": 0},
           {"seed": 1, "pruning.sparsity": 0.8, "pruning.initial_sparsity": 0.2,
            "train.learning_rate": 2e-3},
           {"seed": 2, "pruning.sparsity": 0.5, "train.weight_decay": 0.1}]
SPARSE = [{"seed": 0},
          {"seed": 1, "pruning.sparsity": 0.7, "pruning.drop_fraction": 0.5,
           "train.learning_rate": 2e-3},
          {"seed": 2, "pruning.sparsity": 0.95, "pruning.drop_fraction": 0.1,
           "train.weight_decay": 0.0}]
TOME = {"mitigation.token_merging.mode": "single_pass",
        "mitigation.token_merging.keep_ratio": 0.5, "mitigation.token_merging.r": 0}
# (id, shared overrides, members, devices, calls); burden metrics are on in the smoke config.
# gmp runs with token merging here; without it, in test_members_write_ordinary_run_dirs.
CASES = [
    ("none", {"pruning.method": "none"}, DENSE, 1, CALLS),
    ("gmp_tome", {"pruning.method": "gmp", **TOME}, GRADUAL, 2, TOME_CALLS),
    ("pdwp", {"pruning.method": "pdwp"}, GRADUAL[:2], 4, CALLS),
    ("rigl", {"pruning.method": "rigl"}, SPARSE[:2], 2, CALLS),
    ("set", {"pruning.method": "set"}, SPARSE, 4, CALLS),
    ("static", {"pruning.method": "static"}, SPARSE[::2], 1, CALLS),
]
# A member and its run alone differ only in the order of float32 operations: its matmuls run
# batched over the members and its batch may be split over devices (its gradient a sum of
# parts), ~1e-7 relative per operation. Adam divides by sqrt(v) + eps, which amplifies those
# differences where gradients are small. After 24 steps the largest measured were 7e-6 on
# params and 9e-6 relative on the metrics (the gradient norm): the tolerances leave 10x.
METRIC_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_ATOL = 1e-4
# A weight whose exact gradient is zero (the attention key bias: softmax ignores a constant
# added to a row of logits; a bias whose every outgoing weight is pruned) gets a gradient of
# pure rounding noise, which each run's Adam turns into steps of up to the learning rate, of
# either sign. It changes no output (but the merge choice) and is held to that budget:
# such entries are those whose Adam second moment (the mean squared gradient) is below
# NOISE_NU in the run alone; measured: under 1e-15 for them, 1e-11 and up for the others.
NOISE_NU = 1e-14


def _configs(shared, members):
    return [smoke_config(**shared, **member) for member in members]


def _population_run(configs, devices, calls):
    """The population trained for ``calls`` calls on ``devices``: its state and metrics[k, N]."""
    mesh = mesh_lib.population_mesh(len(configs), jax.devices()[:devices])
    population = build_lib.build(configs, smoke_dataset(), mesh)
    orders = [order_lib.BatchOrder(len(population.dataset.train_labels), c.train.batch_size, c.seed)
              for c in configs]
    state, history, k = population.state, [], configs[0].train.steps_per_call
    for call in range(calls):
        state, metrics = population.train_call(
            state, population.train_images, population.train_labels,
            population_loop.train_indices(population, orders, call * k, k))
        history.append(jax.device_get(metrics))
    return state, history


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _assert_params_close(got, alone, config):
    """Params within PARAM_ATOL, but the rounding-noise entries within Adam's budget."""
    second_moment = {path.split(".nu", 1)[1]: nu for path, nu in _flat(alone.opt_state).items()
                     if ".nu" in path}
    budget = 2 * config.train.learning_rate * int(alone.step)
    want = _flat(alone.params)
    for path, value in _flat(got.params).items():
        noise = second_moment[path] < NOISE_NU
        diff = np.abs(value - want[path])
        assert np.all(diff[~noise] <= PARAM_ATOL), f"{path}: {diff[~noise].max()}"
        assert np.all(diff[noise] <= budget), f"{path} (noise): {diff[noise].max()}"


@pytest.mark.parametrize(("shared", "members", "devices", "calls"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_member_trains_as_its_run_alone(shared, members, devices, calls):
    configs = _configs(shared, members)
    state, history = _population_run(configs, devices, calls)
    for i, config in enumerate(configs):
        _, alone, alone_history = run_steps(config, calls)
        member = build_lib.member_state(state, i)
        assert int(member.step) == int(alone.step) == calls * config.train.steps_per_call
        want_masks = _flat(alone.masks)
        for path, mask in _flat(member.masks).items():
            np.testing.assert_array_equal(mask, want_masks[path], err_msg=f"member {i} {path}")
        _assert_params_close(member, alone, config)
        for call, (got, want) in enumerate(zip(history, alone_history, strict=True)):
            assert sorted(got) == sorted(want)
            for key, value in want.items():
                np.testing.assert_allclose(np.asarray(got[key])[:, i], value,
                                           err_msg=f"member {i} call {call} {key}",
                                           **METRIC_TOL)


# ------------------------------------------------------------- train_population and its CLI

ROOT = Path(__file__).resolve().parents[1]
# Two gmp members on all 8 devices (member 2 x data 4); checkpoints at 8 and 16, the end at 24.
RUN_ARGS = ["--config", str(ROOT / "configs" / "smoke.py"), "--config.pruning.method=gmp",
            "--config.train.num_steps=24", "--config.train.log_every=4",
            "--config.train.eval_every=8", "--config.train.checkpoint_every=8",
            "--config.train.progress=False"]
RUN_MEMBERS = "seed=0;seed=1,pruning.sparsity=0.8,train.learning_rate=0.002"
NAMES = ["seed0", "seed1_sparsity0.8_learning_rate0.002"]


def _train(directory, members=RUN_MEMBERS):
    return population_main.main([*RUN_ARGS, "--workdir", str(directory), "--members", members])


def _lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _timeless(workdir):
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in _lines(workdir)]


def _fingerprint(checkpoints, step):
    """The fingerprint saved with a checkpoint: equal ones mean bit-identical states."""
    meta = json.loads((checkpoints / str(step) / "_CHECKPOINT_METADATA").read_text())
    return meta["custom_metadata"]["nbjax_fingerprint"]


def _checkpoint_steps(checkpoints):
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A population trained through the CLI's main, never stopped: (directory, finals)."""
    directory = tmp_path_factory.mktemp("population")
    return directory, _train(directory)


def test_members_write_ordinary_run_dirs(reference, tmp_path):
    directory, finals = reference
    assert sorted(finals) == NAMES
    alone_dir = tmp_path / "alone"  # member 0 trained as a single run
    config = smoke_config(**{"pruning.method": "gmp", "train.num_steps": 24,
                             "train.log_every": 4, "train.eval_every": 8,
                             "train.checkpoint_every": 8})
    loop.train_and_evaluate(config, str(alone_dir), dataset=smoke_dataset())
    member_dir = directory / NAMES[0]

    def files(d):
        return sorted("events" if p.name.startswith("events.") else p.name for p in d.iterdir())

    assert files(member_dir) == files(alone_dir)
    assert (member_dir / "config.json").read_text() == (alone_dir / "config.json").read_text()
    got, want = _lines(member_dir), _lines(alone_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 12, 16, 20, 24, 24]
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for key in set(w) - {"train/images_per_sec"}:
            np.testing.assert_allclose(g[key], w[key], err_msg=key, **METRIC_TOL)
    final = json.loads((member_dir / "final_metrics.json").read_text())
    assert final == finals[NAMES[0]] and final["train/steps"] == 24
    assert sorted(final) == sorted(json.loads((alone_dir / "final_metrics.json").read_text()))

    other = json.loads((directory / NAMES[1] / "config.json").read_text())
    assert (other["seed"], other["pruning"]["sparsity"], other["train"]["learning_rate"]) == \
        (1, 0.8, 0.002)
    members = json.loads((directory / "population" / "population.json").read_text())["members"]
    assert members == [
        {"workdir": "../seed0", "seed": 0, "train.learning_rate": 1e-3,
         "train.weight_decay": 0.05, "pruning.sparsity": 0.9, "pruning.initial_sparsity": 0.0,
         "pruning.drop_fraction": 0.3, "data.mix_alpha": 0.0},
        {"workdir": f"../{NAMES[1]}", "seed": 1, "train.learning_rate": 2e-3,
         "train.weight_decay": 0.05, "pruning.sparsity": 0.8, "pruning.initial_sparsity": 0.0,
         "pruning.drop_fraction": 0.3, "data.mix_alpha": 0.0}]


def test_member_dirs_are_read_by_the_run_tools(reference):
    directory, finals = reference
    for name in NAMES:
        member_dir = directory / name
        run, state = visualize.restore_run(str(member_dir))  # its own final checkpoint
        assert int(state.step) == 24
        direct = loop.evaluate(run, state)
        assert direct["test/accuracy"] == finals[name]["test/accuracy"]
        np.testing.assert_allclose(direct["test/loss"], finals[name]["test/loss"], rtol=1e-6)
        assert report.load_run(str(member_dir)).final["test/accuracy"] == \
            finals[name]["test/accuracy"]
        record = records.from_run_dir(str(member_dir), {})
        assert record["final"]["train/steps"] == 24
        assert record["config"]["seed"] == run.config.seed


def test_a_stopped_population_resumes_bit_for_bit(reference, tmp_path, monkeypatch):
    requested, calls = preemption.StopSignals.requested, []

    def sigterm_at_step_12(self):  # asked after every call of 4 steps
        calls.append(self)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return requested(self)

    monkeypatch.setattr(preemption.StopSignals, "requested", sigterm_at_step_12)
    with pytest.raises(errors.Stopped, match="stopped by SIGTERM at step 12"):
        _train(tmp_path)
    monkeypatch.undo()
    assert _checkpoint_steps(tmp_path / "population" / "checkpoints") == [8, 12]
    assert not any((tmp_path / name / "final_metrics.json").exists() for name in NAMES)
    assert [r["step"] for r in _lines(tmp_path / NAMES[0])] == [4, 8, 12]

    directory, finals = reference
    assert _train(tmp_path) == finals
    for name in NAMES:
        assert _timeless(tmp_path / name) == _timeless(directory / name)
        assert _fingerprint(tmp_path / name / "checkpoints", 24) == \
            _fingerprint(directory / name / "checkpoints", 24)
    assert _fingerprint(tmp_path / "population" / "checkpoints", 24) == \
        _fingerprint(directory / "population" / "checkpoints", 24)


def test_a_finished_population_returns_its_final_metrics_and_writes_nothing(reference):
    directory, finals = reference
    before = snapshot(directory)
    assert _train(directory) == finals
    assert snapshot(directory) == before


def test_a_population_directory_refuses_other_members(reference):
    directory, _ = reference
    before = snapshot(directory)
    with pytest.raises(errors.ConfigError) as refused:
        _train(directory, "seed=0;seed=2")
    line = str(refused.value)
    assert "\n" not in line and "holds a population of other members" in line
    assert "member 1: " in line and "'seed': 1" in line and "'seed': 2" in line
    assert snapshot(directory) == before and not (directory / "seed2").exists()


def test_a_non_finite_member_stops_the_population_naming_its_run(tmp_path):
    with pytest.raises(errors.NonFiniteError) as failed:
        _train(tmp_path, "seed=0;seed=1,train.learning_rate=1e30")
    line = str(failed.value)
    assert f"population member {tmp_path / 'seed1_learning_rate1e+30'}:" in line
    assert "\n" not in line and "not finite at step" in line
    assert not any(tmp_path.glob("*/final_metrics.json"))


def test_member_specs_name_each_member_by_its_overrides():
    base = smoke_config()
    configs, names = population_main.member_configs(
        base, "seed=0; seed=1,pruning.sparsity=0.8 ;train.learning_rate=2e-3;")
    assert names == ["seed0", "seed1_sparsity0.8", "learning_rate0.002"]
    assert [c.seed for c in configs] == [0, 1, 0]
    assert [c.pruning.sparsity for c in configs] == [0.9, 0.8, 0.9]
    assert configs[2].train.learning_rate == 2e-3 and base.seed == 0
    for members, message in [("seed=0;seedd=1", "unknown config key 'seedd'"),
                             ("seed=0;pruning.sparsity=high", "pruning.sparsity='high'"),
                             ("seed=0;seed", "'seed' is not KEY=VALUE"),
                             ("seed=1;seed=1", "two members are both 'seed=1'"),
                             (" ; ", "names no member")]:
        with pytest.raises(errors.UserError, match=re.escape(message)):
            population_main.member_configs(base, members)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    proc = run_nbjax("--workdir", tmp_path / "p", "--members", "seed=0;seed=1,model.depth=3",
                     module="nbjax.population")
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "population member 1 has model.depth=3 but member 0 has 2" in line
    assert not (tmp_path / "p").exists()


def test_members_may_differ_only_in_the_seed_and_per_member_values():
    gmp = {"pruning.method": "gmp"}
    members_lib.check([smoke_config(**gmp), smoke_config(**gmp, **{
        "seed": 3, "train.learning_rate": 0.01, "train.weight_decay": 0.0,
        "pruning.sparsity": 0.5, "pruning.initial_sparsity": 0.1,
        "pruning.drop_fraction": 0.2})])
    for other in ({"model.depth": 3}, {"pruning.method": "set"}, {"train.num_steps": 50}):
        with pytest.raises(errors.ConfigError) as refused:
            members_lib.check([smoke_config(**gmp), smoke_config(**{**gmp, **other})])
        [key] = other
        assert f"member 1 has {key}=" in str(refused.value) and "\n" not in str(refused.value)
    # under ERK the per-leaf sparsities are constants of the program, so members share them
    erk = {**gmp, "pruning.distribution": "erk"}
    with pytest.raises(errors.ConfigError, match="pruning.sparsity"):
        members_lib.check([smoke_config(**erk), smoke_config(**erk, **{"pruning.sparsity": 0.5})])


def test_group_puts_runs_of_one_program_together_at_most_size_each():
    gmp = [smoke_config(**{"pruning.method": "gmp", "seed": s}) for s in range(3)]
    dst = [smoke_config(**{"pruning.method": "set", "pruning.sparsity": s}) for s in (0.5, 0.8)]
    configs = [gmp[0], dst[0], gmp[1], gmp[2], dst[1]]
    assert members_lib.group(configs, 2) == [[0, 2], [3], [1, 4]]
    assert members_lib.group(configs, 8) == [[0, 2, 3], [1, 4]]
    assert members_lib.group(configs, 1) == [[0], [2], [3], [1], [4]]
    with pytest.raises(errors.ConfigError):
        members_lib.group(configs, 0)
