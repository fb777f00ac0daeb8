"""Step schedules for pruning-during-training, and the checks on their settings.

Every schedule here is a pure function of the step. Each one accepts either a Python number
(evaluated with Python floats, exact to double precision, for host-side code and tests) or a
JAX scalar, traced or not (evaluated with ``jnp`` in float32, so it can live inside a jitted
train step). Hyper-parameters are always Python numbers and are validated eagerly.

- :func:`polynomial_sparsity`: the gradual-pruning schedule of Zhu & Gupta (2017), "To prune,
  or not to prune".
- :func:`is_update_step`: on which steps the mask is recomputed.
- :func:`cosine_drop_fraction`: the decayed drop/regrow fraction of RigL (Evci et al., 2020,
  "Rigging the Lottery").
- :func:`warmup_cosine_lr`: linear warm-up then cosine decay of the learning rate.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

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
    initial = validate_sparsity(initial, "initial")
    final = validate_sparsity(final, "final")
    validate_steps(start_step, end_step)
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    span = end_step - start_step
    if _is_python_number(step):
        frac = min(max((step - start_step) / span, 0.0), 1.0)
        return final + (initial - final) * (1.0 - frac) ** exponent
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
    return final + (initial - final) * (1.0 - frac) ** exponent


def is_update_step(step: Step, *, start_step: int, end_step: int, every: int) -> Any:
    """Whether the mask is recomputed at ``step``.

    Update steps are ``t0, t0 + ΔT, t0 + 2ΔT, ...`` while ``<= t1``, **and t1 itself** even
    when ``t1 - t0`` is not a multiple of ΔT: otherwise the final sparsity of the polynomial
    schedule would never be applied to the mask. No update happens before t0 or after t1.

    Returns a Python bool for a Python ``step``, a JAX bool scalar otherwise.
    """
    validate_steps(start_step, end_step)
    validate_every(every)
    if _is_python_number(step):
        in_range = start_step <= step <= end_step
        return bool(in_range and ((step - start_step) % every == 0 or step == end_step))
    step = jnp.asarray(step)
    in_range = (step >= start_step) & (step <= end_step)
    on_grid = ((step - start_step) % every == 0) | (step == end_step)
    return in_range & on_grid


def cosine_drop_fraction(step: Step, *, initial: float, end_step: int) -> Any:
    """Fraction of kept weights to drop (and regrow) at a DST update, RigL's cosine decay.

    ``initial * 0.5 * (1 + cos(pi * min(t, t_end) / t_end))``: ``initial`` at step 0, 0 from
    ``end_step`` on (Evci et al., 2020). Steps before 0 are treated as 0.

    Returns a Python float for a Python ``step``, a float32 JAX scalar otherwise.
    """
    initial = validate_sparsity(initial, "initial drop fraction", allow_one=True)
    if int(end_step) != end_step or end_step <= 0:
        raise ValueError(f"end_step must be a positive integer, got {end_step!r}")
    if _is_python_number(step):
        t = min(max(step, 0), end_step) / end_step
        return initial * 0.5 * (1.0 + math.cos(math.pi * t))
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0, end_step) / end_step
    return initial * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def warmup_cosine_lr(
    base_lr: float, warmup_steps: int, total_steps: int, end_lr_factor: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to
    ``base_lr * end_lr_factor`` at ``total_steps`` (which counts the warm-up), constant after.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if int(total_steps) != total_steps or total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps must be an integer > warmup_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )
    if not 0.0 <= end_lr_factor <= 1.0:
        raise ValueError(f"end_lr_factor must be in [0, 1], got {end_lr_factor!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=int(warmup_steps),
        decay_steps=int(total_steps),
        end_value=base_lr * end_lr_factor,
    )
