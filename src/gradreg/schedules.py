"""Learning-rate schedules counted in optimizer steps.

A schedule is a factor :math:`f(t)` that multiplies the base learning rate
:math:`\\eta_0`, so the update with index :math:`t` uses :math:`\\eta_t = \\eta_0 f(t)`.
Here :math:`t = 0, 1, \\dots` is the number of updates already applied, so the
first update uses :math:`f(0)`. :math:`W` is the number of warmup steps and
:math:`T` the total number of steps. Every factor is 0 for :math:`t \\ge T`,
except the constant one.

:func:`build_lr_scheduler` wraps a factor in
:class:`torch.optim.lr_scheduler.LambdaLR`. Call ``scheduler.step()`` once
after each ``optimizer.step()``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "DEFAULT_LR_SCHEDULE",
    "LR_SCHEDULES",
    "build_lr_scheduler",
    "constant_factor",
    "multiplicative_warmup_cosine_factor",
    "warmup_cosine_factor",
]


def _check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")


def _check_schedule(step: int, total_steps: int, warmup_steps: int) -> None:
    _check_int("step", step, 0)
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0, total_steps)


def warmup_cosine_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Compute the linear-warmup, cosine-decay factor.

    .. math::
        f(t) = \\begin{cases}
            t / W & t < W \\\\
            \\tfrac12 \\left(1 + \\cos\\left(\\pi \\frac{t - W}{T - W}\\right)\\right) & W \\le t < T \\\\
            0 & t \\ge T
        \\end{cases}

    With :math:`W > 0` the first update has :math:`f(0) = 0` and changes nothing.
    The factor reaches 1 at :math:`t = W`. :math:`W = 0` gives a pure cosine decay.

    Args:
        step: number of updates already applied, ``>= 0``.
        total_steps: :math:`T`, ``>= 1``.
        warmup_steps: :math:`W`, in ``[0, total_steps]``.

    Raises:
        ValueError: an argument is not an int or is outside its range.
    """
    _check_schedule(step, total_steps, warmup_steps)
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def multiplicative_warmup_cosine_factor(
    step: int, *, total_steps: int, warmup_steps: int
) -> float:
    """Compute a cosine decay over all steps times a linear warmup ramp.

    .. math::
        f(t) = \\tfrac12 \\left(1 + \\cos\\left(\\pi \\frac{t}{T}\\right)\\right)
               \\cdot \\min\\left(1, \\frac{t}{W}\\right), \\qquad f(t) = 0 \\text{ for } t \\ge T

    The ramp factor is 1 when :math:`W = 0`. Because the cosine already decays
    during warmup, the peak stays below 1. For example, with :math:`T` = 300
    epochs and :math:`W` = 40 epochs the peak is
    :math:`\\tfrac12(1 + \\cos(40\\pi/300)) \\approx 0.957` at :math:`t = W`.

    Args:
        step: number of updates already applied, ``>= 0``.
        total_steps: :math:`T`, ``>= 1``.
        warmup_steps: :math:`W`, in ``[0, total_steps]``.

    Raises:
        ValueError: an argument is not an int or is outside its range.
    """
    _check_schedule(step, total_steps, warmup_steps)
    if step >= total_steps:
        return 0.0
    ramp = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * ramp


def constant_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Return :math:`f(t) = 1` for every step, including :math:`t \\ge T`.

    The arguments are validated like those of the other schedules. The
    ``warmup_steps`` value is accepted for a uniform signature and has no effect.

    Raises:
        ValueError: an argument is not an int or is outside its range.
    """
    _check_schedule(step, total_steps, warmup_steps)
    return 1.0


#: Schedule name -> factor function ``f(step, *, total_steps, warmup_steps)``.
_FACTORS: dict[str, Callable[..., float]] = {
    "warmup_cosine": warmup_cosine_factor,
    "multiplicative": multiplicative_warmup_cosine_factor,
    "constant": constant_factor,
}

#: Names accepted by :func:`build_lr_scheduler`.
LR_SCHEDULES: tuple[str, ...] = tuple(_FACTORS)

DEFAULT_LR_SCHEDULE = "warmup_cosine"


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = DEFAULT_LR_SCHEDULE,
    *,
    total_steps: int,
    warmup_steps: int,
) -> LambdaLR:
    """Build a per-step :class:`~torch.optim.lr_scheduler.LambdaLR` scheduler.

    Each parameter group's learning rate becomes ``initial_lr * f(t)``, where
    ``f`` is the factor that ``name`` selects:

    * ``"warmup_cosine"``: :func:`warmup_cosine_factor`;
    * ``"multiplicative"``: :func:`multiplicative_warmup_cosine_factor`;
    * ``"constant"``: :func:`constant_factor` (``warmup_steps`` has no effect).

    Right after construction each group's learning rate is the one for the
    first update, ``initial_lr * f(0)``. Call ``scheduler.step()`` after every ``optimizer.step()``.

    To resume a run, build the optimizer and the scheduler, then load the
    optimizer state and then the scheduler state. A scheduler built after the
    optimizer state is loaded sets the learning rate back to ``initial_lr * f(0)``.

    Args:
        optimizer: the optimizer whose learning rates the scheduler sets.
        name: one of :data:`LR_SCHEDULES`.
        total_steps: :math:`T`, the number of optimizer steps in the run, ``>= 1``.
        warmup_steps: :math:`W`, in ``[0, total_steps]``.

    Raises:
        ValueError: ``name`` is unknown or a step count is outside its range.
    """
    if name not in _FACTORS:
        raise ValueError(f"unknown learning-rate schedule {name!r}: expected one of {list(LR_SCHEDULES)}")
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0, total_steps)

    factor = functools.partial(_FACTORS[name], total_steps=total_steps, warmup_steps=warmup_steps)
    return LambdaLR(optimizer, lr_lambda=factor)
