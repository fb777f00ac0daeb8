"""A population on a mesh of several devices, and of several processes.

On the 8 CPU devices of the test session (tests/conftest.py) a population of 4 members is laid
out member 4 x data 2: each device holds one member's state and half of that member's batch.
Each member must train as its run alone on one device does (masks exactly, the rest up to
float32 rounding), and two processes of 2 devices must train the population exactly as one
process of 4 devices does, each process holding 2 of the members. The population and its
training are those of tests/population_worker.py, which is also the processes' program.
"""

import functools
import pickle
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    SKIP_EXIT,
    child_env,
    free_port,
    run_process_group,
    run_steps,
    smoke_dataset,
)
from jax.sharding import PartitionSpec as P
from population_worker import (
    CALLS,
    MEMBERS,
    batch_indices,
    held,
    member_configs,
    train,
)

from nbjax.parallel import mesh as sharding
from nbjax.population import build as population_lib
from nbjax.train import order as order_lib

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "population_worker.py"
TIMEOUT_S = 540  # both processes; cold, each compiles for about a minute of CPU time

# A member and its run alone differ only in the order of float32 sums: the member's batch is
# split over 2 devices (its gradient is a sum of two halves) and its matmuls run batched over
# the members. In CALLS calls Adam amplifies that rounding to differences of order 1e-7 (params,
# moments, burden references) and 1e-6 relative (metrics), so TOL keeps a margin of 10x or
# more while a member fed another member's batches or settings misses it by orders of
# magnitude.
TOL = dict(rtol=1e-5, atol=1e-5)
# The attention key bias has an exactly zero gradient (softmax ignores a constant added to a
# row of logits), so each run's Adam turns its own rounding noise into steps of up to the
# learning rate, of either sign (order 1e-4 here). It changes no output; it is held to the
# learning-rate budget of the two runs instead.
NOISE_ONLY = "['key']['bias']"


def noise_atol(config) -> float:
    return 2 * config.train.learning_rate * CALLS * config.train.steps_per_call


@functools.lru_cache(maxsize=1)
def trained_population():
    """The population of MEMBERS on all 8 devices after CALLS calls: (population, state,
    metrics of every step as {key: [steps, members]})."""
    mesh = sharding.population_mesh(len(MEMBERS), jax.devices())
    population = population_lib.build(member_configs(), smoke_dataset(), mesh)
    state, history = train(population, CALLS)
    return population, state, {key: np.concatenate([h[key] for h in history]) for key in history[0]}


def test_population_layout_is_one_member_per_device_and_half_a_batch_per_device():
    population, state, _ = trained_population()
    mesh = population.mesh
    assert dict(mesh.shape) == {"member": 4, "data": 2}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.replace(step=None))[0]:
        assert leaf.sharding.spec == P("member"), jax.tree_util.keystr(path)
    assert state.step.sharding.is_fully_replicated

    kernel = state.params["block_0"]["fc1"]["kernel"]
    on_device = {shard.device: shard for shard in kernel.addressable_shards}
    whole = np.asarray(kernel)
    for (member, _), device in np.ndenumerate(mesh.devices):
        shard = on_device[device]
        assert shard.index[0] == slice(member, member + 1)  # its mesh row's member, only it
        np.testing.assert_array_equal(np.asarray(shard.data)[0], whole[member])

    config = population.configs[0]
    k, batch = config.train.steps_per_call, config.train.batch_size
    idx = batch_indices(population, 1)
    on_device = {shard.device: np.asarray(shard.data) for shard in idx.addressable_shards}
    for (member, half), device in np.ndenumerate(mesh.devices):
        order = order_lib.BatchOrder(len(population.dataset.train_labels), batch,
                                     MEMBERS[member][0])
        rows = order.block(k, k)[:, half * batch // 2:(half + 1) * batch // 2]
        np.testing.assert_array_equal(on_device[device], rows[:, None, :])


def _assert_state_close(got, want, noise_atol: float) -> None:
    flat_got, tree_got = jax.tree_util.tree_flatten_with_path(got)
    flat_want, tree_want = jax.tree_util.tree_flatten_with_path(want)
    assert tree_got == tree_want
    for (path, x), (_, y) in zip(flat_got, flat_want, strict=True):
        name = jax.tree_util.keystr(path)
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype == bool or np.issubdtype(x.dtype, np.integer):  # masks, step, rng
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif NOISE_ONLY in name:
            np.testing.assert_allclose(x, y, atol=noise_atol, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, err_msg=name, **TOL)


@pytest.mark.parametrize("member", range(len(MEMBERS)))
def test_member_equals_its_run_alone_on_one_device(member):
    population, state, metrics = trained_population()
    config = population.configs[member]
    _, alone, history = run_steps(config, CALLS)
    _assert_state_close(population_lib.member_state(state, member), alone, noise_atol(config))
    want = {key: np.concatenate([h[key] for h in history]) for key in history[0]}
    assert sorted(metrics) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key][:, member], value, err_msg=key, **TOL)


def test_members_prune_to_their_own_sparsity():
    _, state, metrics = trained_population()
    # gmp's staircase at its step-8 update (t0 = 4, t1 = 28): s_f + (s_i - s_f) (1 - 4/24)^3
    want = [s + (0.2 - s) * (5 / 6) ** 3 for _, s in MEMBERS]
    np.testing.assert_allclose(metrics["pruning/target_sparsity"][-1], want, rtol=1e-6)
    realised = metrics["pruning/sparsity"][-1]
    np.testing.assert_allclose(realised, want, atol=0.01)  # whole entries per leaf
    # members 0 and 3 start from the same seed and see the same batches: only the sparsity
    # tells their masks apart
    same_seed = [i for i, (seed, _) in enumerate(MEMBERS) if seed == MEMBERS[0][0]]
    first, other = (population_lib.member_state(state, i).masks for i in same_seed[:2])
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True))


# ------------------------------------------------------------------ several processes


def test_two_processes_hold_two_members_each_and_train_like_one_process(tmp_path):
    port = free_port()
    outs = [tmp_path / "process0.pkl", tmp_path / "process1.pkl"]
    commands = [([sys.executable, str(WORKER), str(out), f"127.0.0.1:{port}", "2", str(i)],
                 child_env(2)) for i, out in enumerate(outs)]
    run_process_group(commands, [out.with_suffix(".log") for out in outs], TIMEOUT_S,
                      skip_exit=SKIP_EXIT)
    first, second = (pickle.loads(out.read_bytes()) for out in outs)
    # the reference: this one process, on 4 of its devices
    mesh = sharding.population_mesh(len(MEMBERS), jax.devices()[:4])
    population = population_lib.build(member_configs(burden=False), smoke_dataset(), mesh)
    reference = held(population, *train(population, CALLS))

    for result in (first, second, reference):
        assert result["mesh_shape"] == {"member": 4, "data": 1} and result["devices"] == 4
    assert (first["local_devices"], second["local_devices"]) == (2, 2)
    # devices come in process order, so the member axis spans the processes
    assert (first["members"], second["members"], reference["members"]) == (
        [0, 1], [2, 3], [0, 1, 2, 3])
    # The same program runs on every device (one whole member, its whole batch, no sum across
    # devices), so where the devices live cannot change a bit: everything is compared exactly.
    steps = CALLS * population.configs[0].train.steps_per_call
    assert first["step"] == second["step"] == reference["step"] == steps
    for name, want in reference["leaves"].items():
        got = np.concatenate([first["leaves"][name], second["leaves"][name]])
        np.testing.assert_array_equal(got, want, err_msg=name)
    for result in (first, second):
        for got, want in zip(result["history"], reference["history"], strict=True):
            assert sorted(got) == sorted(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
