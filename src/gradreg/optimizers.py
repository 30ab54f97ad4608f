"""Build a ``torch.optim`` optimizer from a name and plain hyper-parameters.

Which hyper-parameters each name uses. The others are validated and then
ignored, except ``nesterov=True``, which raises ``ValueError`` for every name
but ``sgd``:

===========  ========================  =====================================================
name         class                     hyper-parameters
===========  ========================  =====================================================
``adamw``    ``torch.optim.AdamW``     ``lr``, ``betas``, ``eps``, ``weight_decay``
``adam``     ``torch.optim.Adam``      ``lr``, ``betas``, ``eps``, ``weight_decay``
``rmsprop``  ``torch.optim.RMSprop``   ``lr``, ``rmsprop_decay``, ``eps``, ``momentum``,
                                       ``weight_decay``
``sgd``      ``torch.optim.SGD``       ``lr``, ``momentum``, ``nesterov``, ``weight_decay``
===========  ========================  =====================================================

Weight decay :math:`\\lambda` means different things for these classes
(as implemented in torch 2.14 ``torch/optim/adam.py``, ``rmsprop.py`` and ``sgd.py``):

* AdamW decouples it from the gradient: :math:`\\theta \\leftarrow (1 - \\eta\\lambda)\\theta`
  before the Adam update.
* Adam, RMSprop and SGD add it to the gradient as an L2 penalty:
  :math:`g \\leftarrow g + \\lambda\\theta`, which then passes through the
  adaptive scaling of Adam and RMSprop.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

__all__ = ["DEFAULT_OPTIMIZER", "OPTIMIZERS", "build_optimizer"]

#: Names accepted by :func:`build_optimizer`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "rmsprop", "sgd")

DEFAULT_OPTIMIZER = "adamw"


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_range(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real in [low, high) or (low, high)."""
    if _is_real(value):
        below = value <= low if low_open else value < low
        if not below and (high is None or value < high):
            return
    left = "(" if low_open else "["
    right = f"{high})" if high is not None else "inf)"
    raise ValueError(f"{name} must be a finite float in {left}{low}, {right}, got {value!r}")


def _check_arguments(
    name: str,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float,
    nesterov: bool,
    rmsprop_decay: float,
) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {list(OPTIMIZERS)}")
    _check_range("lr", lr, low=0.0)
    _check_range("weight_decay", weight_decay, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_range("betas[0]", betas[0], low=0.0, high=1.0)
    _check_range("betas[1]", betas[1], low=0.0, high=1.0)
    _check_range("eps", eps, low=0.0, low_open=True)
    _check_range("momentum", momentum, low=0.0, high=1.0)
    _check_range("rmsprop_decay", rmsprop_decay, low=0.0, high=1.0)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov and name != "sgd":
        raise ValueError(f"nesterov=True applies only to optimizer 'sgd', got optimizer {name!r}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True requires momentum > 0, got momentum=0.0")


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
    rmsprop_decay: float = 0.99,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``params``.

    ``name`` maps to a ``torch.optim`` class as follows:

    * ``"adamw"`` (:data:`DEFAULT_OPTIMIZER`): ``AdamW(lr, betas, eps,
      weight_decay)`` with decoupled weight decay.
    * ``"adam"``: ``Adam(lr, betas, eps, weight_decay)`` with the L2 penalty
      added to the gradient.
    * ``"rmsprop"``: ``RMSprop(lr, alpha=rmsprop_decay, eps, momentum,
      weight_decay)``, where the running average is
      :math:`v \\leftarrow \\alpha v + (1 - \\alpha) g^2`.
    * ``"sgd"``: ``SGD(lr, momentum, nesterov, weight_decay)``.

    Every class gets ``foreach=None``, so torch picks its multi-tensor
    implementation where the parameters allow it.

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: parameters or parameter-group dicts, as for any ``torch.optim`` class.
        lr: learning rate, ``>= 0``.
        weight_decay: weight decay factor, ``>= 0``.
        betas: Adam/AdamW moment decay rates, each in ``[0, 1)``.
        eps: Adam/AdamW/RMSprop denominator term, ``> 0``.
        momentum: SGD/RMSprop momentum, in ``[0, 1)``.
        nesterov: Nesterov momentum, SGD only. Requires ``momentum > 0``.
        rmsprop_decay: RMSprop ``alpha``, in ``[0, 1)``.

    Raises:
        ValueError: ``name`` is unknown or an argument is outside its range,
            naming the argument and the accepted range.
    """
    _check_arguments(
        name,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        momentum=momentum,
        nesterov=nesterov,
        rmsprop_decay=rmsprop_decay,
    )
    betas = (float(betas[0]), float(betas[1]))

    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=None
        )
    if name == "adam":
        return torch.optim.Adam(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=None
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(
            params,
            lr=lr,
            alpha=rmsprop_decay,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            foreach=None,
        )
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        foreach=None,
    )
