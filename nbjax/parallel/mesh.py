"""Where arrays live: one ``Mesh`` over every device with a single ``data`` axis.

The batch is split over ``data``; the train state is replicated (``sharding.mode='replicated'``)
or, for ``'fsdp'``, each large leaf is split along its largest axis that the device count
divides. How the step's sums cross the devices is :mod:`nbjax.parallel.collectives`.
:func:`use_all_cpu_cores` decides, before JAX starts, how many devices a CPU host has.

Host data enters the mesh two ways, both valid with one process or many:

* :func:`put_replicated`: the same host array on every process (the dataset, which every
  device holds whole) becomes one replicated global array.
* :func:`put_batch`: a global batch-shaped host array of which each process transfers only
  the rows its own devices hold, assembled into one global array (the explicit-transfer
  equivalent of ``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MEMBER_AXIS = "member"  # a population's members (nbjax.population)


def use_all_cpu_cores() -> None:
    """Runs a CPU-only host as one XLA device per core, unless the user chose otherwise.

    XLA's CPU backend runs one device's operations one after another; with one device per
    core and the batch sharded over them, the small operations of the two halves of the
    batch run in parallel. On the project's 2-core host that made nbjax's train step 3-8 %
    faster than one device (docs/performance.md). Must run before JAX initialises its
    backends (that is, before the first device query).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return
    count = os.cpu_count() or 1
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def population_mesh(num_members: int, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``member`` × ``data`` mesh for ``num_members`` members over ``devices``.

    The member axis takes the largest share of the devices that divides the member count
    (gcd), so with at least as many members as devices (and divisible) every device holds
    whole members and no gradient sum crosses devices; the rest of the devices split each
    member's batch. Devices are in process order, so the member axis spans the processes.
    """
    devices = jax.devices() if devices is None else devices
    members = math.gcd(num_members, len(devices))
    grid = np.asarray(devices).reshape(members, len(devices) // members)
    return Mesh(grid, (MEMBER_AXIS, DATA_AXIS))


def member_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the leading (member) axis over the mesh's ``member`` axis."""
    return NamedSharding(mesh, P(MEMBER_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split along ``batch_axis`` over the ``data`` axis."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def _leaf_spec(shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            return P(*([None] * axis), DATA_AXIS)
    return P()


def state_shardings(state: Any, mesh: Mesh, mode: str = "replicated",
                    fsdp_min_size: int = 2**18) -> Any:
    """A sharding per leaf of ``state``: replicated, or FSDP-style split of large leaves."""
    if mode == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), state)
    if mode != "fsdp":
        raise ValueError(f"sharding.mode={mode!r}; allowed: ['replicated', 'fsdp']")
    n = mesh.devices.size

    def spec(leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, _leaf_spec(shape, n, fsdp_min_size))

    return jax.tree.map(spec, state)


def _put_shards(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles a global array from explicit copies of ``host``'s pieces to local devices.

    Only the pieces that this process's devices hold are read and copied. The copies are
    explicit ``jax.device_put`` calls, so they pass ``jax.transfer_guard("disallow")``; the
    equivalent ``jax.make_array_from_process_local_data`` / ``make_array_from_callback`` count
    as implicit transfers with several processes.
    """
    index_map = sharding.addressable_devices_indices_map(host.shape)
    devices = list(index_map)
    shards = jax.device_put([np.ascontiguousarray(host[index_map[d]]) for d in devices], devices)
    return jax.make_array_from_single_device_arrays(host.shape, sharding, shards)


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """``x`` (identical on every process) as one array replicated on every device of ``mesh``.

    Each process copies ``x`` to its own devices only, so the same call works with one process
    or many, and passes ``jax.transfer_guard("disallow")``.
    """
    return _put_shards(np.asarray(x), replicated(mesh))


def put_batch(global_block: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array ``global_block`` placed with ``sharding``, from this process's rows.

    Every process passes the same ``global_block`` (cheap when it holds example indices, as in
    the train loop); each one transfers only the rows its own devices hold, so each process
    feeds only its part of the global batch.
    """
    return _put_shards(np.asarray(global_block), sharding)
