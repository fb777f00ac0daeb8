"""Checkpoints of the whole train state with Orbax, checked on restore; a run resumes bit-for-bit.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so an
interrupted save leaves the previous checkpoint as the latest good one. Each checkpoint also
carries a fingerprint of every array of the state in its Orbax step metadata, and a state with
non-finite parameters is never saved. A restore recomputes the fingerprint: a checkpoint that
cannot be read, or reads back different values, is damaged, and
:meth:`Checkpointer.restore_latest_good` falls back to the newest good one (setting the
damaged ones aside, never deleting them). A save that fails (a full disk) is reported with the
step it lost and the step that is intact. Restores go through an abstract target (shapes,
dtypes, shardings), so optax states come back with their types and the arrays land with the
shardings of the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nbjax.errors import (
    CheckpointError,
    NonFiniteError,
    NotFoundError,
    WorkdirError,
    one_line,
    verbose,
)

FINGERPRINT_KEY = "nbjax_fingerprint"
DAMAGED_DIR = "checkpoints_damaged"  # beside the checkpoint directory; damaged steps go here


def _leaf_sum(leaf: jax.Array) -> jax.Array:
    """A position-weighted wrapping sum of the bits of ``leaf``: any one flipped bit changes it.

    The weights are odd, so a change of one element by any non-zero bit pattern changes the
    sum modulo 2**32; integer sums are exact, so the value is the same on every mesh.
    """
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32)
    elif leaf.dtype.itemsize >= 4:  # 8-byte types become two uint32 words
        bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    else:
        unsigned = jnp.uint8 if leaf.dtype.itemsize == 1 else jnp.uint16
        bits = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
    bits = bits.ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprint_and_finite(state: Any, params: Any) -> tuple[jax.Array, jax.Array]:
    leaves = jax.tree.leaves(state)
    sums = jnp.stack([_leaf_sum(leaf) for leaf in leaves]) if leaves else jnp.zeros(0, jnp.uint32)
    inexact = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)
               if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return sums, jnp.all(jnp.stack(inexact)) if inexact else jnp.bool_(True)


def fingerprint(state: Any) -> tuple[list[int], bool]:
    """The per-array fingerprint of ``state`` and whether its parameters (``state.params``, or
    the whole tree if it has none) are all finite. Other leaves may hold NaN on purpose (the
    burden tracker's "not measured yet")."""
    sums, finite = jax.device_get(_fingerprint_and_finite(state, getattr(state, "params", state)))
    return [int(v) for v in np.asarray(sums)], bool(finite)


def _reason(err: BaseException) -> str:
    """The most specific one-line reason in an exception chain (an OSError's if there is one)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    if isinstance(chain[0], CheckpointError):
        return chain[0].what
    os_errors = [e for e in chain if isinstance(e, OSError) and e.strerror]
    if os_errors:
        return f"{os_errors[-1].strerror} (errno {os_errors[-1].errno})"
    text = one_line(str(chain[-1]) or type(chain[-1]).__name__)
    code = re.search(r"\[os_error_code='(\d+)'\]", text)  # TensorStore's form of an OSError
    if code:
        written = re.findall(r'Failed writing: "([^"]+)"', text)
        return os.strerror(int(code.group(1))) + (f" writing {written[-1]}" if written else "")
    return text if len(text) <= 200 else text[:197] + "..."


def _drop_closed_loop_callbacks() -> None:
    """After a failed restore, TensorStore's pending reads call back into Orbax's event loop,
    which is closed by then, and each callback's RuntimeError is reported as unraisable; they
    say nothing the one-line warning does not (``--verbose`` keeps them)."""
    previous = sys.unraisablehook
    if verbose() or getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpointer:
    """Periodic, asynchronous saves of one pytree; restore of the newest good one."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        directory = str(directory)
        # Local paths are made absolute (Orbax wants that); gs:// and other URLs stay as they are.
        self.directory = epath.Path(directory if "://" in directory
                                    else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())
        self._in_flight: int | None = None  # the step of a save that may still be writing

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, force: bool = False) -> None:
        """Starts saving ``state`` at ``step`` in the background (see :meth:`wait`).

        Raises :class:`NonFiniteError` (nothing written) if the parameters are not all
        finite, and :class:`CheckpointError` if this or the previous save could not be written.
        """
        values, finite = fingerprint(state)
        if not finite:
            raise NonFiniteError(
                f"the parameters at step {step} are not all finite, so they were not saved",
                f"lower train.learning_rate or check the data; {self.resume_note()}")
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=force,
                               custom_metadata={FINGERPRINT_KEY: values})
        except Exception as err:
            raise self._write_error(step, err) from err
        self._in_flight = step

    def wait(self) -> None:
        """Blocks until every pending save is on disk; a failed one is a CheckpointError."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._write_error(step, err) from err

    def close(self) -> None:
        """Waits for the pending save and releases Orbax's resources."""
        try:
            self.wait()
        finally:
            # A failed save has already raised in wait(); closing has nothing more to say.
            with contextlib.suppress(Exception):
                self._manager.close()

    def resume_note(self) -> str:
        """Where a re-run would resume: the newest complete checkpoint, after pending saves."""
        with contextlib.suppress(CheckpointError):  # a failed save is reported by its caller
            self.wait()
        self._manager.reload()
        last = self.latest_step()
        return (f"a re-run resumes from the checkpoint of step {last} in {self.directory}"
                if last is not None else "no checkpoint was written, a re-run starts at step 0")

    def _write_error(self, step: int, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"could not write the checkpoint of step {step} in {self.directory}: {_reason(err)}",
            f"free space there (or fix its permissions) and run the same command again; "
            f"{self.resume_note()}")

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """The state at ``step`` (default latest), shaped, typed and sharded like the target.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`abstract_like`). Raises :class:`CheckpointError` if the restored arrays do not
        match the fingerprint saved with them, :class:`WorkdirError` if the checkpoint holds
        a state of another structure or shape (a run of another config).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise NotFoundError(f"no checkpoint in {self.directory}", "train the run first")
        self._check_layout(step, abstract_state)
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        expected = (self._manager.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
        if expected is not None and fingerprint(state)[0] != list(expected):
            raise CheckpointError(f"the arrays read back do not match the checksum saved with "
                                  f"them (checkpoint step {step} in {self.directory})",
                                  "it is damaged; restore it from a backup")
        return state

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        """Raises WorkdirError if checkpoint ``step`` holds arrays of other shapes."""
        stored = self._manager.item_metadata(step)
        stored_shapes = sorted(tuple(leaf.shape) for leaf in
                               jax.tree.leaves(getattr(stored, "tree", stored))
                               if hasattr(leaf, "shape"))
        shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(abstract_state))
        if stored_shapes != shapes:
            pairs = zip(stored_shapes, shapes, strict=False)
            differ = next((f"{a} there, {b} now" for a, b in pairs if a != b),
                          f"{len(stored_shapes)} arrays there, {len(shapes)} now")
            raise WorkdirError(
                f"checkpoint step {step} in {self.directory} holds a train state of another "
                f"layout (array shapes differ: {differ})",
                "the model or method changed, which no resume can bridge; use a new --workdir")

    def restore_latest_good(self, abstract_state: Any, warn: Callable[[str], Any] = print,
                            set_aside: bool = True) -> tuple[Any, int] | None:
        """``(state, step)`` of the newest checkpoint that restores and matches its
        fingerprint, or None if there is no checkpoint. Damaged newer ones are reported with
        ``warn`` (one line each) and, with ``set_aside`` (a run that will save again), moved
        to ``checkpoints_damaged/`` beside the directory; if every checkpoint is damaged, a
        CheckpointError says so and nothing is moved."""
        damaged: list[int] = []
        _drop_closed_loop_callbacks()  # a failed restore's callbacks can come before its error
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(abstract_state, step)
            except WorkdirError:
                raise
            except Exception as err:
                warn(f"warning: checkpoint step {step} in {self.directory} is damaged or "
                     f"unreadable ({_reason(err)}); trying the one before it")
                damaged.append(step)
                continue
            if set_aside:
                self._set_aside(damaged, warn)
            return state, step
        if damaged:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} (steps "
                f"{', '.join(map(str, sorted(damaged)))}) can be restored",
                "nothing was deleted: restore them from a backup, or move the directory "
                "away to train again from step 0")
        return None

    def _set_aside(self, steps: list[int], warn: Callable[[str], Any]) -> None:
        """Moves damaged step directories out of Orbax's sight, so new saves can take them."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / DAMAGED_DIR
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
                (self.directory / str(step)).rename(target)
                warn(f"warning: moved the damaged checkpoint step {step} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("nbjax_damaged_checkpoints_moved")
        self._manager.reload()


def abstract_like(state: Any) -> Any:
    """Shapes, dtypes and shardings of ``state``, the target a restore fills in."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
