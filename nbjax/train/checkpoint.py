"""Checkpoints of the whole train state with Orbax, so a run resumes bit-for-bit.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so an
interrupted save leaves the previous checkpoint as the latest good one. Restores go through an
abstract target (shapes, dtypes, shardings), so optax states come back with their types and
the arrays land with the shardings of the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """Periodic, asynchronous saves of one pytree; restore of the latest complete one."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        directory = str(directory)
        # Local paths are made absolute (Orbax wants that); gs:// and other URLs stay as they are.
        self.directory = epath.Path(directory if "://" in directory
                                    else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> None:
        """Starts saving ``state`` at ``step`` in the background (see :meth:`wait`)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """The state at ``step`` (default latest), shaped, typed and sharded like the target.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings, e.g.
        ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def abstract_like(state: Any) -> Any:
    """Shapes, dtypes and shardings of ``state``, the target a restore fills in."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
