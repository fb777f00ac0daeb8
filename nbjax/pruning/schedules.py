"""Step schedules of pruning during training, and the checks on their settings.

Every schedule is a pure function of the step: a Python step gives a Python value (exact, for
host code and tests), a JAX step a float32 or bool JAX scalar (inside the jitted train step).
Hyper-parameters are Python numbers, validated eagerly.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Step = Any  # a Python int or a (possibly traced) JAX integer scalar


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def validate_sparsity(value: float, name: str = "sparsity", *, allow_one: bool = False) -> float:
    """Checks that ``value`` is a sparsity in [0, 1) (or [0, 1] with ``allow_one``).

    A sparsity of 1 would remove every weight of a layer, which is never a valid *target*;
    it is only accepted where a fraction is meant (``allow_one``).
    """
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from e
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if not (v >= 0.0 and upper_ok):  # also rejects NaN
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def validate_steps(start_step: int, end_step: int) -> None:
    """Checks ``0 <= start_step < end_step`` (a schedule needs a non-empty interval)."""
    if int(start_step) != start_step or int(end_step) != end_step:
        raise ValueError(f"steps must be integers, got start={start_step!r}, end={end_step!r}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if end_step <= start_step:
        raise ValueError(
            f"end_step must be > start_step, got start_step={start_step}, end_step={end_step}"
        )


def validate_every(every: int) -> None:
    """Checks that an update period ΔT is a positive integer."""
    if int(every) != every or every <= 0:
        raise ValueError(f"every (the update period ΔT) must be a positive integer, got {every!r}")


def _is_python_number(x: Any) -> bool:
    return isinstance(x, (Real, np.integer, np.floating)) and not isinstance(x, bool)


def _checked_sparsity(value: Any, name: str, *, allow_one: bool = False) -> Any:
    """A Python ``value`` validated as a sparsity; a JAX value (a population member's, traced)
    as it is: it was validated in its member's config."""
    if isinstance(value, jax.Array | jax.core.Tracer):
        return value
    return validate_sparsity(value, name, allow_one=allow_one)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def polynomial_sparsity(
    step: Step,
    *,
    initial: float,
    final: float,
    start_step: int,
    end_step: int,
    exponent: float = 3.0,
) -> Any:
    """Gradual pruning sparsity of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** exponent`` for t0 <= t <= t1,
    ``s_i`` before t0 and ``s_f`` after t1. With the default cubic exponent the network is
    pruned fast while it is dense (many redundant weights) and slowly near the target.

    Returns a Python float for a Python ``step``, a float32 JAX scalar otherwise.
    """
    initial = _checked_sparsity(initial, "initial")
    final = _checked_sparsity(final, "final")
    validate_steps(start_step, end_step)
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    span = end_step - start_step
    if _is_python_number(step):
        frac = min(max((step - start_step) / span, 0.0), 1.0)
        return final + (initial - final) * (1.0 - frac) ** exponent
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
    return final + (initial - final) * (1.0 - frac) ** exponent


def is_update_step(step: Step, *, start_step: int, end_step: int, every: int,
                   last_step: int | None = None) -> Any:
    """Whether the mask is recomputed at ``step`` (gmp: t0 = start_step, t1 = end_step).

    On ``t0, t0 + ΔT, t0 + 2ΔT, ...`` up to ``last_step`` (default t1; pdwp re-ranks past
    t1), **and on t1 itself** even off the grid, so the schedule's final sparsity is always
    applied. Never before t0. A Python bool for a Python ``step``, a JAX bool otherwise.
    """
    validate_steps(start_step, end_step)
    validate_every(every)
    last = end_step if last_step is None else last_step
    if int(last) != last or last < end_step:
        raise ValueError(f"last_step must be an integer >= end_step={end_step}, got {last!r}")
    if _is_python_number(step):
        on_grid = (step - start_step) % every == 0
        return bool(step >= start_step and ((step <= last and on_grid) or step == end_step))
    step = jnp.asarray(step)
    on_grid = (step - start_step) % every == 0
    return (step >= start_step) & (((step <= last) & on_grid) | (step == end_step))


def cosine_drop_fraction(step: Step, *, initial: float, end_step: int) -> Any:
    """Fraction of kept weights to drop (and regrow) at a DST update, RigL's cosine decay.

    ``initial * 0.5 * (1 + cos(pi * min(t, t_end) / t_end))``: ``initial`` at step 0, 0 from
    ``end_step`` on (Evci et al., 2020). Steps before 0 are treated as 0.

    Returns a Python float for a Python ``step``, a float32 JAX scalar otherwise.
    """
    initial = _checked_sparsity(initial, "initial drop fraction", allow_one=True)
    if int(end_step) != end_step or end_step <= 0:
        raise ValueError(f"end_step must be a positive integer, got {end_step!r}")
    if _is_python_number(step):
        t = min(max(step, 0), end_step) / end_step
        return initial * 0.5 * (1.0 + math.cos(math.pi * t))
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0, end_step) / end_step
    return initial * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
