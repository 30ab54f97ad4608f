"""The pieces of a gradient-regularization step, each a small function on tensor lists.

A GR step with radius r and mixing weight alpha (Zhao, Zhang and Hu, ICML 2024,
arXiv:2406.09723, which restates the finite-difference form of Barrett and Dherin,
"Implicit Gradient Regularization", ICLR 2021) is

    g1 = grad L(theta)
    g2 = grad L(theta + r * g1 / ||g1||)
    g  = (1 - alpha) * g1 + alpha * g2

followed by clipping g to a global L2 norm. With alpha = 1 this is SAM
(Foret et al., ICLR 2021) with rho = r. The functions below implement one line of that
recipe each, with multi-tensor (``torch._foreach_*``) kernels so that the cost is a few
passes over the parameters, which is small next to a forward and backward pass.
All of them run without autograd and modify their first argument in place where the
name ends in an underscore.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64, else float32 (also for half-precision tensors)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Return the L2 norm of all tensors taken together, as a scalar tensor.

    The per-tensor norms are computed in one multi-tensor kernel and combined on the
    device of the first tensor, in float64 when any tensor is float64 and in float32
    otherwise. An empty list has norm 0.
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    device, dtype = tensors[0].device, _accumulation_dtype(tensors)
    per_tensor = torch._foreach_norm(list(tensors))
    stacked = torch.stack([norm.to(device=device, dtype=dtype) for norm in per_tensor])
    return torch.linalg.vector_norm(stacked)


@torch.no_grad()
def global_dot(first: Sequence[Tensor], second: Sequence[Tensor]) -> Tensor:
    """Return the inner product of two tensor lists taken as one vector."""
    if len(first) == 0:
        return torch.zeros((), dtype=torch.float32)
    device, dtype = first[0].device, _accumulation_dtype(first)
    products = [
        torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)).to(device) for a, b in zip(first, second)
    ]
    return torch.stack(products).sum()


@torch.no_grad()
def displacement_dot(moved: Sequence[Tensor], origin: Sequence[Tensor], other: Sequence[Tensor]) -> Tensor:
    """Return (moved - origin) . other over all tensors, without a full-size temporary.

    The GR step uses it for g1 . g2 when it keeps theta but not g1:
    theta' - theta = (r / ||g1||) g1. The difference is formed one tensor at a time, so
    the extra memory is the largest tensor, not all of them. It cancels digits: its
    relative error is about the float precision times |theta| / |theta' - theta|.
    """
    if len(moved) == 0:
        return torch.zeros((), dtype=torch.float32)
    device, dtype = moved[0].device, _accumulation_dtype(moved)
    products = [
        torch.dot((a - b).reshape(-1).to(dtype), c.reshape(-1).to(dtype)).to(device)
        for a, b, c in zip(moved, origin, other)
    ]
    return torch.stack(products).sum()


def perturbation_scale(radius: float, gradient_norm: float) -> float:
    """Return r / ||g1||, the factor that moves theta a distance r along g1.

    The reference implementation divides without a guard, so a zero gradient gives NaN
    parameters there. Here a zero or non-finite norm gives 0, which means no
    perturbation: the second pass would then see theta itself.
    """
    if radius == 0.0 or gradient_norm == 0.0 or not math.isfinite(gradient_norm):
        return 0.0
    return radius / gradient_norm


@torch.no_grad()
def backup_parameters(params: Sequence[Tensor]) -> List[Tensor]:
    """Return an exact copy of the parameters, to be put back by :func:`restore_parameters_`."""
    backup = [torch.empty_like(p) for p in params]
    torch._foreach_copy_(backup, list(params))
    return backup


@torch.no_grad()
def perturb_parameters_(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> None:
    """Move theta to theta + scale * direction in place (the ascent step of GR and SAM)."""
    if scale != 0.0 and len(params) > 0:
        torch._foreach_add_(list(params), list(direction), alpha=scale)


@torch.no_grad()
def restore_parameters_(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Copy the saved values back into the parameters, bit for bit."""
    torch._foreach_copy_(list(params), list(backup))


def first_gradient_coefficient(alpha: float, first_gradient: str, first_norm: float) -> float:
    """Return c in g = c * g1 + alpha * g2.

    ``"raw"`` interpolates with the raw first gradient, c = 1 - alpha (the written
    method). ``"normalized"`` interpolates with the unit first gradient,
    c = (1 - alpha) / ||g1||, the default of the authors' JAX code
    (``norm_perturbations=True``). A zero or non-finite ||g1|| gives c = 0 there.
    """
    if first_gradient == "raw":
        return 1.0 - alpha
    if first_norm == 0.0 or not math.isfinite(first_norm):
        return 0.0
    return (1.0 - alpha) / first_norm


@torch.no_grad()
def mix_gradients_(
    second: Sequence[Tensor], first: Sequence[Tensor], *, alpha: float, first_coefficient: float
) -> None:
    """Overwrite ``second`` with alpha * second + first_coefficient * first.

    With alpha = 1 and a zero coefficient the result is ``second`` unchanged, so a SAM
    step equals the perturbed gradient exactly.
    """
    second, first = list(second), list(first)
    if alpha != 1.0:
        torch._foreach_mul_(second, alpha)
    if first_coefficient != 0.0:
        torch._foreach_add_(second, first, alpha=first_coefficient)


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """Return the factor that clips a gradient of norm ``total_norm`` to ``max_norm``.

    Follows the reference: the gradient stays unchanged when its norm is below the
    threshold, and is scaled by max_norm / norm otherwise, with no epsilon
    (``torch.nn.utils.clip_grad_norm_`` adds 1e-6 to the norm, a relative difference of
    about 1e-6). ``None`` disables clipping.
    """
    if max_norm is None or total_norm < max_norm or not math.isfinite(total_norm):
        return 1.0
    return max_norm / total_norm


@torch.no_grad()
def scale_(tensors: Sequence[Tensor], factor: float) -> None:
    """Multiply every tensor by ``factor`` in place (no kernel when the factor is 1)."""
    if factor != 1.0 and len(tensors) > 0:
        torch._foreach_mul_(list(tensors), factor)


def world_size() -> int:
    """Return the number of ranks in the default process group, or 1 outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average the tensors over all ranks in place, with one all-reduce per dtype and device."""
    import torch.distributed as dist

    size = world_size()
    if size == 1 or len(tensors) == 0:
        return
    buckets: dict = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(size)
        torch._foreach_copy_(bucket, list(torch._utils._unflatten_dense_tensors(flat, bucket)))
