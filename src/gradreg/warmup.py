"""GR warmup schedules: the effective radius r_t and mixing weight alpha_t per step.

Gradient regularization (GR) with an adaptive optimizer distorts the optimizer's
second-moment estimate while learning-rate warmup lets it form. Zhao, Zhang and Hu,
"When Will Gradient Regularization Be Harmful?" (ICML 2024, arXiv:2406.09723), show
that ramping GR in over the same warmup window removes the harm. With W warmup steps
and t the number of optimizer updates already applied (t = 0 for the first update):

==============  ==============================  ================
strategy        t < W                           t >= W
==============  ==============================  ================
``none``        (r, alpha)                      (r, alpha)
``r``           (r * t / W, alpha)              (r, alpha)
``lambda``      (r, alpha * t / W)              (r, alpha)
``zero``        plain step, reported as (0, 0)  (r, alpha)
==============  ==============================  ================

Since lambda = alpha * r, both ramps also ramp lambda linearly. A schedule is any
callable ``step -> (r_t, alpha_t)``. The regularizer runs a plain single-pass step
when a schedule returns ``(0.0, 0.0)``, which is how zero-warmup is expressed.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

GRSchedule = Callable[[int], Tuple[float, float]]
"""A GR schedule: maps the number of updates already applied to ``(r_t, alpha_t)``."""

WARMUP_STRATEGIES = ("none", "r", "lambda", "zero")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Return the linear ramp min(1, step / warmup_steps); 1.0 when warmup_steps is 0."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def constant_schedule(r: float, alpha: float) -> GRSchedule:
    """Full GR from the first step: strategy ``"none"``."""

    def schedule(step: int) -> Tuple[float, float]:
        return r, alpha

    return schedule


def r_warmup_schedule(r: float, alpha: float, warmup_steps: int) -> GRSchedule:
    """Ramp the radius: r_t = r * min(1, t / W) with alpha fixed (strategy ``"r"``)."""

    def schedule(step: int) -> Tuple[float, float]:
        return r * warmup_factor(step, warmup_steps), alpha

    return schedule


def lambda_warmup_schedule(r: float, alpha: float, warmup_steps: int) -> GRSchedule:
    """Ramp the mixing weight: alpha_t = alpha * min(1, t / W) with r fixed (strategy ``"lambda"``)."""

    def schedule(step: int) -> Tuple[float, float]:
        return r, alpha * warmup_factor(step, warmup_steps)

    return schedule


def zero_warmup_schedule(r: float, alpha: float, warmup_steps: int) -> GRSchedule:
    """Plain steps for t < W, then full GR (strategy ``"zero"``).

    The optimizer state carries straight through the switch, as in the reference code,
    which switches at an epoch boundary; step-based switching at t = W is the same
    when W is a whole number of epochs.
    """

    def schedule(step: int) -> Tuple[float, float]:
        if step < warmup_steps:
            return 0.0, 0.0
        return r, alpha

    return schedule


def build_gr_schedule(
    warmup: str | GRSchedule, *, r: float, alpha: float, warmup_steps: int
) -> GRSchedule:
    """Build the GR schedule for a strategy name, or return a user callable unchanged.

    Args:
        warmup: one of ``"none"``, ``"r"``, ``"lambda"``, ``"zero"``, or a callable
            ``step -> (r_t, alpha_t)``.
        r: the target radius (r >= 0).
        alpha: the target mixing weight (0 <= alpha <= 1).
        warmup_steps: the warmup length W in optimizer steps (>= 0).

    Raises:
        ValueError: on an unknown strategy name or an argument out of range.
    """
    if callable(warmup):
        return warmup

    if not isinstance(warmup, str) or warmup not in WARMUP_STRATEGIES:
        raise ValueError(
            f"Invalid warmup: {warmup!r}. Use one of {', '.join(map(repr, WARMUP_STRATEGIES))} "
            "or a callable step -> (r, alpha)."
        )
    validate_gr_values(r, alpha)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r}. Use an integer >= 0.")

    if warmup == "none":
        return constant_schedule(r, alpha)
    if warmup == "r":
        return r_warmup_schedule(r, alpha, warmup_steps)
    if warmup == "lambda":
        return lambda_warmup_schedule(r, alpha, warmup_steps)
    return zero_warmup_schedule(r, alpha, warmup_steps)


def validate_gr_values(r: float, alpha: float, *, source: str = "") -> None:
    """Raise ValueError unless r is a finite number >= 0 and alpha lies in [0, 1]."""
    prefix = f"{source} returned an invalid " if source else "Invalid "
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
        raise ValueError(f"{prefix}r: {r!r}. Use a finite number >= 0.")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0.0 <= alpha <= 1.0
    ):
        raise ValueError(f"{prefix}alpha: {alpha!r}. Use a number in [0, 1].")
