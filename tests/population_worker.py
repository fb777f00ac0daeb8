"""The population that tests/test_population_sharding.py trains, and one process of its
multi-process test.

``python tests/population_worker.py OUT COORDINATOR NUM_PROCESSES PROCESS_ID`` joins a group of
``jax.distributed`` processes, trains the population of :func:`member_configs` (burden metrics
off, to compile faster) for ``CALLS`` calls on ``population_mesh`` over every device of every
process, and writes :func:`held` of the result to OUT (a pickle). Exits with
``helpers.SKIP_EXIT`` when Gloo's CPU collectives are unavailable.
"""

from __future__ import annotations

import pathlib
import pickle
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, the repository is not on the path
    sys.path.insert(0, str(ROOT))

from helpers import join_process_group, smoke_config, smoke_dataset  # noqa: E402

from nbjax.parallel import mesh as sharding  # noqa: E402
from nbjax.population import build as population_lib  # noqa: E402
from nbjax.train import order as order_lib  # noqa: E402

# (seed, pruning.sparsity) per member. Members 0 and 2 share a program group at sparsity 0.5,
# 1 and 3 at 0.8 (the stacked init reorders them); 0 and 3 start from the same seed.
MEMBERS = ((0, 0.5), (1, 0.8), (2, 0.5), (0, 0.8))
# Steps 0..11 of the smoke schedule (t0 = 4, t1 = 28, every 4): gmp prunes to the shared
# initial sparsity at step 4 and to each member's own staircase target at step 8.
CALLS = 3


def member_configs(burden: bool = True) -> list[Any]:
    """The members' configs: gmp (with burden metrics), differing in seed and sparsity."""
    return [smoke_config(**{"pruning.method": "gmp", "burden.enabled": burden, "seed": seed,
                            "pruning.sparsity": sparsity, "pruning.initial_sparsity": 0.2})
            for seed, sparsity in MEMBERS]


def batch_indices(population: population_lib.Population, call: int) -> jax.Array:
    """Call ``call``'s [k, N, B] example indices, each member in its own seed's order, split
    over members and, within a member, over the batch (this process's part only)."""
    k = population.configs[0].train.steps_per_call
    blocks = [order_lib.BatchOrder(len(population.dataset.train_labels), c.train.batch_size,
                                   c.seed).block(call * k, k) for c in population.configs]
    layout = NamedSharding(population.mesh, P(None, sharding.MEMBER_AXIS, sharding.DATA_AXIS))
    return sharding.put_batch(np.stack(blocks, axis=1), layout)


def train(population: population_lib.Population, calls: int) -> tuple[Any, list[dict]]:
    """``calls`` train calls from the population's fresh state; the host metrics per call."""
    state, history = population.state, []
    for call in range(calls):
        state, metrics = population.train_call(state, population.train_images,
                                               population.train_labels,
                                               batch_indices(population, call))
        history.append(jax.device_get(metrics))
    return state, history


def held(population: population_lib.Population, state: Any,
         history: list[dict]) -> dict[str, Any]:
    """What this process holds after training: the members whose shards its devices hold and
    each member-stacked leaf's rows of them (in member order, named by the leaf's path), the
    step, the metrics (replicated) and the layout."""
    leaves = jax.tree_util.tree_flatten_with_path(state.replace(step=None))[0]
    rows: dict[str, dict[int, np.ndarray]] = {}
    for path, leaf in leaves:
        rows[jax.tree_util.keystr(path)] = {
            shard.index[0].start or 0: np.asarray(shard.data)[0]
            for shard in leaf.addressable_shards}
    members = sorted(next(iter(rows.values())))
    return {"members": members,
            "leaves": {name: np.stack([by_member[m] for m in members])
                       for name, by_member in rows.items()},
            "step": int(jax.device_get(state.step)), "history": history,
            "mesh_shape": dict(population.mesh.shape),
            "devices": population.mesh.devices.size,
            "local_devices": len(population.mesh.local_devices)}


def main(argv: list[str]) -> None:
    from nbjax.parallel import runtime

    out, coordinator, num_processes, process_id = argv
    join_process_group(coordinator, int(num_processes), int(process_id))
    runtime.enable_compilation_cache()  # the tests' cache (conftest: NBJAX_COMPILATION_CACHE)
    population = population_lib.build(member_configs(burden=False), smoke_dataset())
    state, history = train(population, CALLS)  # compiled in step: nbjax.parallel.together
    pathlib.Path(out).write_bytes(pickle.dumps(held(population, state, history)))


if __name__ == "__main__":
    main(sys.argv[1:])
