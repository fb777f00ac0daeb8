"""Timing prepared variants: calls interleaved across variants, and the figures of the times.

Calls run in turn (A B C ... C B A ...), so a shared, noisy machine slows every variant alike.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Timed:
    """A variant ready to be timed: ``call()`` takes ``steps`` steps and returns (seconds,
    whether a mask update happened); ``info`` is what is known of it before timing."""

    name: str
    call: Callable[[], tuple[float, bool]]
    steps: int
    batch: int
    info: dict[str, Any]
    peak_flops: float | None = None  # the device's peak for the compute dtype (MFU)
    update_every: int | None = None  # the mask-update interval, for masked methods
    times: list[float] = dataclasses.field(default_factory=list)
    updated: list[bool] = dataclasses.field(default_factory=list)

    def record(self) -> None:
        """One timed call."""
        seconds, updated = self.call()
        self.times.append(seconds)
        self.updated.append(updated)

    def summary(self) -> dict[str, Any]:
        """``info`` plus the step time, img/s, FLOP/s, MFU and the mask-update window.

        The step time is the median of the calls without a mask update (of all calls when
        every call held one), so it is the plain step's.
        """
        plain = [t for t, u in zip(self.times, self.updated, strict=True) if not u]
        plain_call = statistics.median(plain or self.times)
        step_s = plain_call / self.steps
        out = dict(self.info)
        out.update(step_s=step_s, img_s=self.batch / step_s,
                   mean_step_s=sum(self.times) / (len(self.times) * self.steps),
                   num_calls=len(self.times))
        flops, model_flops = out.get("flops_per_step"), out.get("model_flops_per_step")
        out["flops_per_s"] = flops / step_s if flops else None
        out["model_flops_per_s"] = model_flops / step_s if model_flops else None
        out["mfu"] = (out["model_flops_per_s"] / self.peak_flops
                      if self.peak_flops and model_flops else None)
        out["update"] = self._update_window(plain_call, step_s) if self.update_every else None
        return out

    def _update_window(self, plain_call: float, step_s: float) -> dict[str, Any]:
        """The mask update's cost spread over its interval ΔT: ``window_step_s`` is the
        average step time over ΔT steps, one of which updates the masks."""
        update_calls = [t for t, u in zip(self.times, self.updated, strict=True) if u]
        every = self.update_every
        window: dict[str, Any] = {"every": every, "plain_call_s": plain_call,
                                  "num_update_calls": len(update_calls)}
        if update_calls:
            update_call = statistics.median(update_calls)
            window_step = step_s + (update_call - plain_call) / every
            window.update(update_call_s=update_call, window_step_s=window_step,
                          window_ratio=window_step / step_s)
        return window


def time_interleaved(timed: Sequence[Timed], warmup: int, num_calls: int) -> list[float]:
    """``warmup`` untimed calls of each variant, then ``num_calls`` timed ones in turn,
    alternating the order each round; returns the 1-minute load average before each round."""
    for item in timed:
        for _ in range(warmup):
            item.call()
    loads = []
    for r in range(num_calls):
        loads.append(os.getloadavg()[0])
        for item in (timed if r % 2 == 0 else timed[::-1]):
            item.record()
    return loads
