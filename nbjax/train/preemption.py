"""Stop requests: SIGTERM and Ctrl-C end training at the next call boundary, after a save.

One process: a handler records the signal and the loop, after each compiled call, saves a
checkpoint and stops. A second signal is not caught again (Ctrl-C raises KeyboardInterrupt,
SIGTERM terminates), so a run stuck in a long call can still be ended at once.

Several processes: a signal reaches the hosts at different times, yet all must save the same
step (an Orbax save is collective). JAX's preemption service, started by
``jax.distributed.initialize``, catches SIGTERM on any host and makes every process agree on a
call at which to stop (``multihost_utils.reached_preemption_sync_point``), so nbjax leaves
SIGTERM to it and turns Ctrl-C into SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


def _preemption_sync_point(call_id: int) -> bool | None:
    """JAX's preemption agreement, asked with consecutive ids from 0 on every process;
    None when the service is off."""
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(call_id)
    except RuntimeError:  # jax_enable_preemption_service is off
        return None


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT become a stop request.

    Call :meth:`requested` once after every compiled call, on every process.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False  # a second signal: stop now, without saving
        self._previous: dict[int, Any] = {}
        self._calls = 0
        self._several = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        if not self._several:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._record)
        elif _preemption_sync_point(self._calls) is not None:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.forced = True
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{_NAMES.get(signum, signum)} received: stopping after the current call to "
              "save a checkpoint (send it again to stop at once, without saving)",
              file=sys.stderr, flush=True)

    def _forward(self, signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGTERM)  # JAX's preemption service takes it from here

    def requested(self) -> bool:
        """Whether training should save and stop now (the same answer on every process)."""
        self._calls += 1
        if self._several:
            if _preemption_sync_point(self._calls):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
