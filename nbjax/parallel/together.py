"""Compiling a jitted call in every process before any of them runs it.

On CPU the cross-process collectives use Gloo, which gives the processes 30 s to meet at a
collective. Processes compile at different speeds (one finds the program in the compilation
cache, another compiles it for minutes on a busy host), so the first collective of a step
can time out in the process that started first. :class:`CompiledTogether` compiles the call
ahead of its first run for each argument shape and then waits at a barrier of the
coordination service, which waits as long as it is told and moves no data. With one process
it is the jitted call itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax

BARRIER_TIMEOUT_MS = 3_600_000  # compiling can take minutes; a dead peer is caught anyway
_barrier_ids = itertools.count()  # every process builds its calls in the same order


def _barrier(name: str) -> None:
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=f"nbjax_compiled_{name}_{next(_barrier_ids)}",
                                    timeout_ms=BARRIER_TIMEOUT_MS)


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(args))


class CompiledTogether:
    """``jitted(*args)``, compiled (once per argument shape) by every process before any
    process runs it; ``name`` tells the barriers apart in logs."""

    def __init__(self, jitted: Any, name: str) -> None:
        self._jitted = jitted
        self._name = name
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        if jax.process_count() == 1:
            return self._jitted(*args)
        signature = _signature(args)
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._jitted.lower(*args).compile()
            _barrier(self._name)
            self._compiled[signature] = compiled
        return compiled(*args)

    def __getattr__(self, name: str) -> Any:
        """The rest of the jitted call's API (``lower``, ``_cache_size``, ...)."""
        return getattr(self._jitted, name)
