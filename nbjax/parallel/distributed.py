"""Joining a multi-process run: when and how ``jax.distributed.initialize()`` is called.

A run with several processes (a TPU pod slice, several GPU hosts, or several CPU processes on
one machine for testing) is one JAX program per process. Each process must call
``jax.distributed.initialize`` before anything asks JAX for devices; afterwards
``jax.devices()`` lists the devices of every process and one ``Mesh`` spans them all.

How nbjax decides (:func:`initialize`, called by ``nbjax.main`` before JAX starts):

* **Explicit:** ``--coordinator_address HOST:PORT --num_processes N --process_id I``, or the
  environment variables ``NBJAX_COORDINATOR_ADDRESS``, ``NBJAX_NUM_PROCESSES`` and
  ``NBJAX_PROCESS_ID`` (a flag wins over its variable). ``N == 1`` means a single process:
  nothing is initialised.
* **Cloud TPU VM:** with no explicit settings, a process on a Cloud TPU VM calls
  ``jax.distributed.initialize()`` with no arguments; JAX reads the coordinator, process count
  and index from the TPU metadata (a single-host VM becomes a group of one). JAX's docs call
  this optional but recommended on TPU; Orbax's multi-host checkpoints rely on it.
* **Anything else** (a laptop, one GPU host): a single process, nothing to do.

``NBJAX_DISTRIBUTED`` (or ``--distributed``) overrides the choice: ``auto`` (the default, the
rules above), ``on`` (always call ``initialize`` with whatever was given, so JAX's own cluster
detection covers SLURM, Open MPI and Kubernetes) or ``off`` (never).

For CPU processes the cross-process collectives use Gloo
(``jax_cpu_collectives_implementation='gloo'``); it is set whenever nbjax initialises and has
no effect on GPU or TPU devices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping

ENV_COORDINATOR = "NBJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NBJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "NBJAX_PROCESS_ID"
ENV_MODE = "NBJAX_DISTRIBUTED"
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`initialize` will do: ``call`` it or not, and with which arguments."""

    call: bool
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    reason: str = ""


def _int_or_none(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is not an integer") from err


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (libtpu installed and a TPU PCI device present)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:  # JAX's own check (PCI vendor/device ids); private, so fall back if it moves
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")
    return bool(running_in_cloud_tpu_vm)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, mode: str | None = None,
            environ: Mapping[str, str] | None = None,
            cloud_tpu: bool | None = None) -> Settings:
    """Combines flags (given here) with the ``NBJAX_*`` environment; raises ValueError if bad.

    ``cloud_tpu`` overrides the detection of a Cloud TPU VM (for tests).
    """
    env = os.environ if environ is None else environ
    mode = mode or env.get(ENV_MODE) or "auto"
    if mode not in MODES:
        raise ValueError(f"--distributed / {ENV_MODE}={mode!r}; allowed: {list(MODES)}")
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else _int_or_none(
        env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_or_none(
        env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if mode == "off":
        return Settings(call=False, reason=f"{ENV_MODE}=off")
    explicit = address is not None or num is not None or pid is not None
    if explicit:
        if num is not None and num < 1:
            raise ValueError(f"--num_processes={num} must be >= 1")
        if num == 1 and mode == "auto":
            if pid not in (None, 0):
                raise ValueError(f"--process_id={pid} with --num_processes=1 (must be 0)")
            return Settings(call=False, reason="one process")
        missing = [name for name, v in (("--coordinator_address", address),
                                        ("--num_processes", num), ("--process_id", pid))
                   if v is None]
        if missing and mode == "auto":
            raise ValueError(
                f"a multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                f"missing: {', '.join(missing)}")
        if num is not None and pid is not None and not 0 <= pid < num:
            raise ValueError(f"--process_id={pid} must be in [0, {num})")
        if address is not None and ":" not in address:
            raise ValueError(f"--coordinator_address={address!r} must be HOST:PORT")
        return Settings(True, address, num, pid, reason="explicit")
    if mode == "on":
        return Settings(call=True, reason=f"{ENV_MODE}=on (JAX's cluster auto-detection)")
    if (on_cloud_tpu_vm() if cloud_tpu is None else cloud_tpu):
        return Settings(call=True, reason="Cloud TPU VM (JAX reads the TPU metadata)")
    return Settings(call=False, reason="single process")


_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None) -> Settings:
    """Calls ``jax.distributed.initialize`` if this process is one of several (see module doc).

    Must run before JAX initialises its backends. Returns what was decided.
    """
    global _initialized
    settings = resolve(coordinator_address, num_processes, process_id, mode)
    if not settings.call or _initialized:
        return settings
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes,
                               process_id=settings.process_id)
    _initialized = True
    return settings
