"""GradientRegularizer: the GR step as a wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import functional as F
from .warmup import GRSchedule, build_gr_schedule, validate_gr_values

logger = logging.getLogger(__name__)

FIRST_GRADIENT_MODES = ("raw", "normalized")
MODES = ("finite_difference", "exact")
PENALTIES = ("norm", "squared_norm")
PERTURBATIONS = ("local", "global")
RESTORES = ("auto", "copy", "subtract")
GROUP_KEYS = ("gr_r", "gr_alpha", "gr_perturb")
"""Parameter-group keys read by the regularizer: the group's target r and alpha, and
whether its parameters are moved by the perturbation (default True)."""


def validate_group_settings(group: Dict[str, Any]) -> None:
    """Raise ValueError on an unknown ``gr_*`` key or an invalid per-group value."""
    for key, value in group.items():
        if not key.startswith("gr_"):
            continue
        if key not in GROUP_KEYS:
            raise ValueError(f"Unknown parameter-group key {key!r}. The regularizer reads {', '.join(GROUP_KEYS)}.")
        if key == "gr_perturb" and not isinstance(value, bool):
            raise ValueError(f"Invalid gr_perturb: {value!r} in a parameter group. Use True or False.")
    try:
        validate_gr_values(group.get("gr_r", 0.0), group.get("gr_alpha", 0.0))
    except ValueError as error:
        raise ValueError(f"{error} The value is a parameter group's gr_r or gr_alpha.") from error


@dataclasses.dataclass(frozen=True)
class GRStepStats:
    """The record of one :meth:`GradientRegularizer.step`, for logging.

    Norms are global L2 norms over the parameters that received a gradient. Values that
    a step did not compute are NaN: ``grad_norm_second``, ``cosine`` and
    ``perturbed_loss`` on a step without a second pass, and ``loss`` when the closure
    returned None.
    """

    step: int
    """Number of updates applied before this step (the schedule's t)."""
    r: float
    """Effective radius r_t."""
    alpha: float
    """Effective mixing weight alpha_t."""
    lam: float
    """Effective penalty weight lambda_t = alpha_t * r_t."""
    gr_step: bool
    """The optimizer received the mixed GR gradient (False on a plain step)."""
    gr_applied: bool
    """The second, perturbed pass ran."""
    closure_calls: int
    loss: float
    """Loss at theta, as returned by the first closure call."""
    perturbed_loss: float
    """Loss at the perturbed point theta + r_t * g1 / ||g1||."""
    grad_norm_first: float
    grad_norm_second: float
    cosine: float
    """cos(g1, g2). Where the step keeps theta but not g1 (alpha = 1), g1 . g2 is read
    from the displacement theta' - theta. Its relative error is then at most about the
    float precision times |theta| / |theta' - theta|, an estimate of 1e-4 for float32
    weights moved by 0.1% of their size."""
    grad_norm_before_clip: float
    grad_norm_after_clip: float
    skipped: bool
    """The update was skipped because a gradient was not finite."""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _GradientResult:
    """The gradients of one step and their statistics, before clipping and the update."""

    params: List[Tensor]
    loss: Any
    first_norm: float
    perturbed_loss: Any = None
    second_norm: float = math.nan
    cosine: float = math.nan
    gr_applied: bool = False
    closure_calls: int = 1
    decoupled_terms: Optional[List[Tensor]] = None
    gr_term_norm: float = 0.0
    received_norm: Optional[float] = None
    """||p.grad|| when it is already known (g = g2 at alpha = 1), to save a pass."""


@dataclasses.dataclass
class _PendingStep:
    """A finite-difference step between its first and second gradient."""

    grouped: List[List[Tensor]]
    with_grad: List[Tensor]
    first_by_param: Dict[Tensor, Tensor]
    """g1 of the parameters whose g1 is still needed; after the perturbation only those."""
    first_norm: float
    direction_norm: float
    gr_step: bool
    run_second: bool
    scales: Optional[List[float]] = None
    """The perturbation factor r / ||g1|| of each group (0 for a group that is not moved)."""
    backups: Optional[List[Optional[List[Tensor]]]] = None
    """Per group, the copy of theta for an exact restore, or None where theta is restored by subtraction."""


class _RNGState:
    """The CPU and CUDA generator states, so that a second pass can replay the first one's randomness."""

    def __init__(self, cuda_devices: List[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = {index: torch.cuda.get_rng_state(index) for index in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


class _FrozenNormStatistics:
    """Context that undoes running-statistics updates of normalisation layers.

    With a model, it snapshots the running mean, running variance and
    ``num_batches_tracked`` of every tracking ``_NormBase`` module (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``) and copies them back on
    exit. Without one, a global forward pre-hook takes the snapshot of each such module
    the first time it runs inside the context.
    """

    _BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, model: Optional[nn.Module]):
        self.model = model
        self.saved: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.hook = None

    def _snapshot(self, module: nn.Module) -> None:
        if not isinstance(module, nn.modules.batchnorm._NormBase) or not module.track_running_stats:
            return
        for name in self._BUFFER_NAMES:
            buffer = getattr(module, name, None)
            if isinstance(buffer, Tensor) and id(buffer) not in self.saved:
                self.saved[id(buffer)] = (buffer, buffer.detach().clone())

    def __enter__(self) -> "_FrozenNormStatistics":
        if self.model is not None:
            for module in self.model.modules():
                self._snapshot(module)
        else:
            self.hook = nn.modules.module.register_module_forward_pre_hook(
                lambda module, args: self._snapshot(module)
            )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.hook is not None:
            self.hook.remove()
        with torch.no_grad():
            for buffer, saved in self.saved.values():
                buffer.copy_(saved)
        self.saved.clear()


class GradientRegularizer(Optimizer):
    r"""Gradient regularization (GR) around any ``torch.optim`` optimizer.

    GR minimises :math:`L(\theta) + \lambda \lVert \nabla L(\theta) \rVert_2`. Its
    gradient is approximated with one extra forward and backward pass at a point a
    distance :math:`r` up the gradient (Zhao, Zhang and Hu, "When Will Gradient
    Regularization Be Harmful?", ICML 2024), with :math:`\lambda = \alpha r`:

    .. math::
        \begin{aligned}
            &(r_t, \alpha_t) \leftarrow \text{schedule}(t)
                \quad t = \text{updates already applied} \\
            &g_1 \leftarrow \nabla L(\theta_t) \\
            &g_2 \leftarrow \nabla L\big(\theta_t + r_t\, g_1 / \lVert g_1 \rVert_2\big) \\
            &g \leftarrow (1-\alpha_t)\, g_1 + \alpha_t\, g_2
                \quad\text{or, with } \texttt{first\_gradient="normalized"}, \quad
                g \leftarrow (1-\alpha_t)\, g_1 / \lVert g_1 \rVert_2 + \alpha_t\, g_2 \\
            &g \leftarrow g \cdot \min\big(1, c / \lVert g \rVert_2\big)
                \quad\text{(no change while } \lVert g \rVert_2 < c = \texttt{max\_grad\_norm}) \\
            &\theta_{t+1} \leftarrow \text{optimizer.step}(\theta_t, g)
        \end{aligned}

    With :math:`\alpha = 1` this is SAM with :math:`\rho = r`. On a quadratic loss the
    finite difference is exact: :math:`g = \nabla L + \lambda H \nabla L / \lVert
    \nabla L \rVert`.

    With Adam-type optimizers GR distorts the second-moment estimate while
    learning-rate warmup is running. The ``warmup`` strategies ramp GR in over
    ``warmup_steps`` optimizer steps (see :mod:`gradreg.warmup`): ``"r"`` ramps
    :math:`r_t = r\min(1, t/W)`, ``"lambda"`` ramps :math:`\alpha_t = \alpha\min(1,
    t/W)`, and ``"zero"`` runs plain single-pass steps for :math:`t < W`.

    The wrapper is itself an :class:`~torch.optim.Optimizer` whose ``param_groups`` and
    ``state`` are the wrapped optimizer's, so an LR scheduler may be attached to
    either object, and ``zero_grad`` works as usual.

    Args:
        optimizer: the optimizer that applies the update, for example
            ``torch.optim.AdamW(model.parameters(), lr=1e-3)``.
        r: the radius r >= 0 of the perturbation.
        alpha: the mixing weight in [0, 1]; ``lambda = alpha * r``.
        warmup: ``"none"``, ``"r"``, ``"lambda"``, ``"zero"``, or a callable
            ``step -> (r_t, alpha_t)``. A step for which the schedule returns
            ``(0, 0)`` is a plain step: one closure call and g = g1.
        warmup_steps: the warmup length W in optimizer steps (>= 0).
        first_gradient: ``"raw"`` (default, the written method) or ``"normalized"``
            (the reference JAX code's default, needed to reproduce its runs).
        max_grad_norm: clip the mixed gradient to this global L2 norm (> 0), or
            ``None`` for no clipping. Clipping applies to plain steps too.
        gr_probability: the probability in (0, 1] that a step is a GR step; the other
            steps are plain ("hybrid" training). The draws come from a generator kept
            in ``state_dict``.
        model: the model, used to undo the running-statistics updates of
            normalisation layers in the second pass. Without it a global module hook
            does that, which works for eager models; pass the model when it is
            compiled.
        seed: the seed of the hybrid-training generator; ``None`` takes
            ``torch.initial_seed()``.
        mode: ``"finite_difference"`` (default, two passes) or ``"exact"``, which
            computes grad L + alpha_t * r_t * H g1/||g1|| by double back-propagation
            in one forward pass and two backward passes. It is the ground truth that
            the finite difference approximates, and the finite difference is exact
            on a quadratic loss.
        penalty: with ``mode="exact"``, ``"norm"`` differentiates
            L + lambda ||grad L|| and ``"squared_norm"`` differentiates
            L + lambda/2 ||grad L||^2 (the Hessian term becomes lambda H g1).
        decoupled: feed the wrapped optimizer the clean gradient g1 only, and apply
            the GR term d = alpha_t (g2 - g1) (exact mode: alpha_t r_t H g1/||g1||)
            after its step as theta <- theta - lr * d, outside its preconditioner.
            Clipping applies to g1. An alternative to GR warmup: Adam's moments then
            never see the GR term.
        perturbation: with a DistributedDataParallel ``model``, ``"local"`` or
            ``"global"`` (see below).
        restore: how theta is put back after the second pass. ``"copy"`` keeps a copy
            of theta and restores it bit for bit. ``"subtract"`` computes
            theta' - r g1/||g1|| from g1, which saves the copy at the cost of one
            rounding of theta' per coordinate, at most the float precision times
            (|theta| + r). ``"auto"`` (default) copies where the step does not need
            g1 anyway (alpha = 1, not decoupled), for 16-bit parameters, and under DDP
            with ``perturbation="local"`` (where ranks would round differently), and
            subtracts otherwise. A float32 step then keeps one parameter-sized buffer
            beyond the gradients during the second pass, and a copy with alpha < 1
            keeps two.

    Distributed data parallel: when ``model`` is a
    :class:`~torch.nn.parallel.DistributedDataParallel` module, :meth:`step` runs both
    closure passes under ``model.no_sync()`` and all-reduces (averages) the gradients
    itself. With ``perturbation="local"`` (the reference default) each rank perturbs
    along its own g1; with ``"global"`` g1 is averaged over the ranks first. The mixed
    gradient is always averaged before the update, so every rank applies the same step.

    Per-group settings: a parameter group may set ``gr_r`` and ``gr_alpha`` (target
    values that follow the warmup in proportion) and ``gr_perturb=False`` (the group is
    not moved in the second pass, for example biases and normalisation weights). The
    unit direction g1/||g1|| is then normalised over the perturbed groups only. Any
    other ``gr_*`` key raises ValueError.

    The closure passed to :meth:`step` clears the gradients, evaluates the model,
    calls ``backward()`` and returns the loss, as for :class:`torch.optim.LBFGS`. It
    runs once at theta and once at the perturbed point. In ``mode="exact"`` it returns
    the loss tensor without calling ``backward()``, and a closure that calls it raises
    ValueError. Both finite-difference runs see the same
    dropout and drop-path masks because the CPU and CUDA generator states are replayed.

    Non-finite and zero gradients: a non-finite ||g1|| or a non-finite mixed gradient
    skips the update. The parameters keep their values (to within one rounding where
    theta is restored by subtraction, see ``restore``), the wrapped optimizer is not
    stepped, the step counter does not advance, and ``last_step.skipped`` is True.
    A zero ||g1|| is a valid point with no perturbation direction: the second pass is
    skipped, g2 = g1, and the normalised first gradient is taken as zero. Neither case
    writes NaN into the parameters.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> optimizer = GradientRegularizer(base, r=0.1, alpha=1.0, warmup="r", warmup_steps=100)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> optimizer.last_step.gr_applied  # r_0 = 0 under r-warmup
        False
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        r: float,
        alpha: float,
        warmup: str | GRSchedule = "none",
        warmup_steps: int = 0,
        first_gradient: str = "raw",
        max_grad_norm: Optional[float] = None,
        gr_probability: float = 1.0,
        model: Optional[nn.Module] = None,
        seed: Optional[int] = None,
        mode: str = "finite_difference",
        penalty: str = "norm",
        decoupled: bool = False,
        perturbation: str = "local",
        restore: str = "auto",
    ) -> None:
        if isinstance(optimizer, GradientRegularizer):
            raise ValueError("Invalid optimizer: it is already a GradientRegularizer. Wrap the plain optimizer once.")
        if not isinstance(optimizer, Optimizer):
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__} is not a torch.optim.Optimizer. "
                "Pass an optimizer instance such as torch.optim.AdamW(model.parameters())."
            )
        self.schedule = build_gr_schedule(warmup, r=r, alpha=alpha, warmup_steps=warmup_steps)
        if callable(warmup):
            validate_gr_values(r, alpha)
        if first_gradient not in FIRST_GRADIENT_MODES:
            raise ValueError(f"Invalid first_gradient: {first_gradient!r}. Use 'raw' or 'normalized'.")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm)
            or max_grad_norm <= 0
        ):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}. Use a finite number > 0, or None.")
        if (
            isinstance(gr_probability, bool)
            or not isinstance(gr_probability, (int, float))
            or not 0.0 < gr_probability <= 1.0
        ):
            raise ValueError(f"Invalid gr_probability: {gr_probability!r}. Use a number in (0, 1].")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} is not a torch.nn.Module.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r}. Use an integer >= 0, or None.")
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}. Use 'finite_difference' or 'exact'.")
        if penalty not in PENALTIES:
            raise ValueError(f"Invalid penalty: {penalty!r}. Use 'norm' or 'squared_norm'.")
        if penalty == "squared_norm" and mode != "exact":
            raise ValueError("Invalid penalty: 'squared_norm' needs mode='exact'; the finite difference approximates the norm penalty.")
        if not isinstance(decoupled, bool):
            raise ValueError(f"Invalid decoupled: {decoupled!r}. Use True or False.")
        if first_gradient == "normalized" and (decoupled or mode == "exact"):
            raise ValueError(
                "Invalid first_gradient: 'normalized' applies to the coupled finite-difference step only. "
                "Use first_gradient='raw' with decoupled=True or mode='exact'."
            )
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"Invalid perturbation: {perturbation!r}. Use 'local' or 'global'.")
        if restore not in RESTORES:
            raise ValueError(f"Invalid restore: {restore!r}. Use 'auto', 'copy' or 'subtract'.")
        if restore == "subtract" and perturbation == "local" and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "Invalid restore: 'subtract' with perturbation='local' on a DistributedDataParallel model "
                "lets the ranks' parameters drift apart, because each rank rounds theta' - r g1/||g1|| with "
                "its own g1. Use restore='auto' or 'copy', or perturbation='global'."
            )
        for group in optimizer.param_groups:
            validate_group_settings(group)

        # The base optimizer owns param_groups and state; the properties below forward
        # to it, and Optimizer.__init__'s own bookkeeping of groups is ignored.
        self.base_optimizer = optimizer
        self._initializing = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._initializing = False

        self.r = float(r)
        self.alpha = float(alpha)
        self.warmup = warmup if isinstance(warmup, str) else "callable"
        self.warmup_steps = warmup_steps
        self.first_gradient = first_gradient
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.gr_probability = float(gr_probability)
        self.model = model
        self.mode = mode
        self.penalty = penalty
        self.decoupled = decoupled
        self.perturbation = perturbation
        self.restore = restore

        self.step_count = 0
        # An OrderedDict because RemovableHandle keeps a weak reference to it.
        self._first_gradient_hooks: "OrderedDict[int, Callable[..., None]]" = OrderedDict()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self.last_step: Optional[GRStepStats] = None
        self._pending: Optional[tuple] = None

    # param_groups and state live in the base optimizer.

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        if not self._initializing:
            self.base_optimizer.param_groups = value

    @property
    def state(self) -> Dict[Tensor, Any]:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Dict[Tensor, Any]) -> None:
        if not self._initializing:
            self.base_optimizer.state = value

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; ``gr_*`` keys are checked first."""
        if not self._initializing:
            validate_group_settings(param_group)
            self.base_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"GradientRegularizer(r={self.r}, alpha={self.alpha}, warmup={self.warmup!r}, "
            f"warmup_steps={self.warmup_steps}, first_gradient={self.first_gradient!r}, "
            f"max_grad_norm={self.max_grad_norm}, gr_probability={self.gr_probability}, mode={self.mode!r}, "
            f"penalty={self.penalty!r}, decoupled={self.decoupled}, perturbation={self.perturbation!r}, "
            f"restore={self.restore!r},\n"
            f"  base_optimizer={self.base_optimizer!r})"
        )

    def gr_values(self, step: Optional[int] = None) -> Tuple[float, float]:
        """Return the schedule's (r_t, alpha_t) for ``step`` (default: the next step)."""
        t = self.step_count if step is None else step
        values = self.schedule(t)
        if not isinstance(values, (tuple, list)) or len(values) != 2:
            raise ValueError(f"The GR schedule at step {t} returned {values!r}. A schedule returns a pair (r, alpha).")
        r_t, alpha_t = values
        validate_gr_values(r_t, alpha_t, source=f"the GR schedule at step {t}")
        return float(r_t), float(alpha_t)

    def register_first_gradient_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Register ``hook(optimizer, params, first_grads, first_norm)``, called after each first pass.

        ``first_grads`` are the clean gradients g1 of ``params`` (the parameters that
        received one), before mixing and clipping. The hook must not modify them.
        Diagnostics use it to follow what the optimizer would have seen without GR.
        Returns a handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._first_gradient_hooks)
        self._first_gradient_hooks[handle.id] = hook
        return handle

    def _draw_gr_step(self) -> bool:
        if self.gr_probability >= 1.0:
            return True
        return bool(torch.rand((), generator=self.generator).item() < self.gr_probability)

    def _group_settings(self, r_t: float, alpha_t: float) -> List[Tuple[float, float, bool]]:
        """Return (r, alpha, perturbed) of every parameter group for this step.

        A group's own ``gr_r`` / ``gr_alpha`` follow the warmup by the ratio of the
        scheduled value to the target value. Without them the group uses (r_t, alpha_t).
        """
        r_ratio = r_t / self.r if self.r > 0 else 1.0
        alpha_ratio = alpha_t / self.alpha if self.alpha > 0 else 1.0
        settings = []
        for group in self.param_groups:
            group_r = group["gr_r"] * r_ratio if "gr_r" in group else r_t
            group_alpha = min(1.0, group["gr_alpha"] * alpha_ratio) if "gr_alpha" in group else alpha_t
            settings.append((group_r, group_alpha, bool(group.get("gr_perturb", True))))
        return settings

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler: Optional[Any] = None) -> Any:  # type: ignore[override]
        """Run one GR step and return the closure's loss at theta.

        Args:
            closure: clears the gradients, evaluates the model, calls ``backward()``
                and returns the loss. In ``mode="exact"`` it returns the loss without
                calling ``backward()``. Loops that cannot pass a closure use
                :meth:`first_step` and :meth:`second_step`; after :meth:`first_step`,
                ``step()`` without a closure finishes the step like :meth:`second_step`.
            grad_scaler: a ``torch.amp.GradScaler`` for fp16 training. The closure then
                calls ``grad_scaler.scale(loss).backward()``. Each pass's gradient is
                unscaled as soon as it exists, so the perturbation, the mixing and the
                clipping see true gradients. A non-finite gradient in either pass skips
                the update with theta restored, and the scaler records it. Call
                ``grad_scaler.update()`` once after this method, as usual.
        """
        if closure is None and self._pending is not None:
            # Trainers that call optimizer.step() after their own backward pass.
            self.second_step()
            return None
        if closure is None:
            raise ValueError(
                "GradientRegularizer.step needs a closure: it evaluates the loss twice. "
                "Pass a function that calls zero_grad(), computes the loss, calls "
                "loss.backward() and returns the loss, or use first_step() and second_step()."
            )
        if self._pending is not None:
            raise RuntimeError("A step started with first_step() is pending: call second_step() before step().")
        if grad_scaler is not None and grad_scaler.is_enabled() and self.mode == "exact":
            raise ValueError("grad_scaler works with mode='finite_difference' only; use bf16 autocast with mode='exact'.")
        scale = _scale_of(grad_scaler)
        t, r_t, alpha_t, gr_step, settings = self._schedule_step()

        if self.mode == "exact":
            result = self._exact_gradients(closure, settings, gr_step)
        else:
            groups = self._params_by_group()
            cuda_devices = sorted({p.device.index or 0 for ps in groups for p in ps if p.device.type == "cuda"})

            # First pass at theta, then the second at the perturbed point with the same randomness.
            rng_before = _RNGState(cuda_devices)
            with self._no_sync(), torch.enable_grad():
                loss = closure()
            F.scale_([p.grad for ps in groups for p in ps if p.grad is not None], 1.0 / scale)
            if self._distributed() and self.perturbation == "global":
                F.all_reduce_mean_([p.grad for ps in groups for p in ps if p.grad is not None])
            pending = self._begin_finite_difference(settings, gr_step)
            perturbed_loss = None
            if pending.run_second:
                rng_after_first = _RNGState(cuda_devices)
                rng_before.restore()
                with self._no_sync(), _FrozenNormStatistics(self.model), torch.enable_grad():
                    perturbed_loss = closure()
                rng_after_first.restore()
                F.scale_([p.grad for p in pending.with_grad if p.grad is not None], 1.0 / scale)
            result = self._finish_finite_difference(pending, settings)
            result.loss, result.perturbed_loss = loss, perturbed_loss
            if self._distributed() and (pending.run_second or self.perturbation == "local"):
                F.all_reduce_mean_([p.grad for p in result.params])
                if result.decoupled_terms is not None:
                    F.all_reduce_mean_(result.decoupled_terms)
        self._update(result, t, r_t, alpha_t, gr_step, grad_scaler, scale)
        return result.loss

    @torch.no_grad()
    def first_step(self, grad_scaler: Optional[Any] = None) -> bool:
        """Start a GR step from the gradients already in ``p.grad``; return whether a second pass is needed.

        For loops that cannot pass a closure (gradient accumulation over micro-batches,
        trainers that call ``backward()`` themselves)::

            for micro_batch in micro_batches:       # accumulate g1 at theta
                (loss_fn(model, micro_batch) / len(micro_batches)).backward()
            if optimizer.first_step():              # theta is now perturbed, p.grad cleared
                for micro_batch in micro_batches:   # accumulate g2 at the perturbed point
                    (loss_fn(model, micro_batch) / len(micro_batches)).backward()
            optimizer.second_step()                 # restore theta, mix, clip, update
            optimizer.zero_grad()

        When it returns False (a plain step, r_t = 0 or alpha_t = 0) run no second
        backward pass: :meth:`second_step` then uses g2 = g1. Unlike :meth:`step`, the
        caller is responsible for dropout randomness and normalisation statistics in the
        second pass. Only ``mode="finite_difference"`` is supported.

        With fp16 and a ``torch.amp.GradScaler``, call ``scaler.scale(loss).backward()``
        in both passes and pass the scaler to both calls: ``first_step(grad_scaler=scaler)``
        and ``second_step(grad_scaler=scaler)``, then ``scaler.update()``.
        """
        if self.mode == "exact":
            raise ValueError("first_step() works with mode='finite_difference' only; use step(closure) for mode='exact'.")
        if self._pending is not None:
            raise RuntimeError("first_step() was called twice: call second_step() to finish the pending step.")
        scale = _scale_of(grad_scaler)
        t, r_t, alpha_t, gr_step, settings = self._schedule_step()
        F.scale_([p.grad for ps in self._params_by_group() for p in ps if p.grad is not None], 1.0 / scale)
        pending = self._begin_finite_difference(settings, gr_step)
        self._pending = (pending, t, r_t, alpha_t, gr_step, settings, scale)
        return pending.run_second

    @torch.no_grad()
    def second_step(self, loss: Any = None, perturbed_loss: Any = None, grad_scaler: Optional[Any] = None) -> None:
        """Finish the step begun by :meth:`first_step`, with g2 in ``p.grad``.

        ``loss`` and ``perturbed_loss`` are only recorded in :attr:`last_step`. Pass the
        same ``grad_scaler`` as to :meth:`first_step`.
        """
        if self._pending is None:
            raise RuntimeError("second_step() needs a pending step: call first_step() first.")
        pending, t, r_t, alpha_t, gr_step, settings, scale = self._pending
        if _scale_of(grad_scaler) != scale:
            raise ValueError("second_step() needs the same grad_scaler as first_step(), or none in both.")
        self._pending = None
        if pending.run_second:
            F.scale_([p.grad for p in pending.with_grad if p.grad is not None], 1.0 / scale)
        result = self._finish_finite_difference(pending, settings)
        result.loss, result.perturbed_loss = loss, perturbed_loss if pending.run_second else None
        self._update(result, t, r_t, alpha_t, gr_step, grad_scaler, scale)

    def _distributed(self) -> bool:
        """True when the model is a DistributedDataParallel module in a group of several ranks."""
        return isinstance(self.model, nn.parallel.DistributedDataParallel) and F.world_size() > 1

    def _no_sync(self):
        """``model.no_sync()`` for a distributed model, so that this class decides what to average."""
        if self._distributed():
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _schedule_step(self):
        t = self.step_count
        r_t, alpha_t = self.gr_values(t)
        drawn_gr = self._draw_gr_step()
        gr_step = drawn_gr and not (r_t == 0.0 and alpha_t == 0.0)
        return t, r_t, alpha_t, gr_step, self._group_settings(r_t, alpha_t)

    def _update(
        self, result: "_GradientResult", t: int, r_t: float, alpha_t: float, gr_step: bool,
        grad_scaler: Optional[Any] = None, scale: float = 1.0,
    ) -> None:
        """Clip what the optimizer receives, check it, step the optimizer and record the step."""
        received = [p.grad for p in result.params]
        if grad_scaler is not None and grad_scaler.is_enabled():
            # Hand the scaler a scaled gradient so that its own unscale_ records the
            # non-finite check for update(). Scales are powers of two by default, so
            # multiplying and dividing again is exact.
            F.scale_(received, scale)
            grad_scaler.unscale_(self.base_optimizer)
        if result.received_norm is not None and not self._distributed():
            before_clip = result.received_norm
        else:
            before_clip = float(F.global_norm(received))
        factor = F.clip_coefficient(before_clip, self.max_grad_norm)
        F.scale_(received, factor)
        skipped = not math.isfinite(before_clip) or not math.isfinite(result.gr_term_norm)
        if skipped:
            logger.warning(
                "Skipped update at GR step %d: a gradient is not finite (||g1|| = %s, ||g|| = %s).",
                t, result.first_norm, before_clip,
            )
        else:
            if grad_scaler is not None and grad_scaler.is_enabled():
                grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
            if result.decoupled_terms is not None:
                self._apply_decoupled_terms(result.params, result.decoupled_terms)
            self.step_count += 1

        self.last_step = GRStepStats(
            step=t,
            r=r_t if gr_step else 0.0,
            alpha=alpha_t if gr_step else 0.0,
            lam=r_t * alpha_t if gr_step else 0.0,
            gr_step=gr_step,
            gr_applied=result.gr_applied,
            closure_calls=result.closure_calls,
            loss=_to_float(result.loss),
            perturbed_loss=_to_float(result.perturbed_loss),
            grad_norm_first=result.first_norm,
            grad_norm_second=result.second_norm,
            cosine=result.cosine,
            grad_norm_before_clip=before_clip,
            grad_norm_after_clip=before_clip * factor,
            skipped=skipped,
        )

    def _params_by_group(self) -> List[List[Tensor]]:
        return [list(group["params"]) for group in self.param_groups]

    def _first_pass_done(self, with_grad: List[Tensor], first_grads: List[Tensor]) -> float:
        if not with_grad:
            raise RuntimeError(
                "The closure produced no gradients. Call loss.backward() inside the closure, "
                "and check that the optimizer holds the model's parameters."
            )
        first_norm = float(F.global_norm(first_grads))
        for hook in self._first_gradient_hooks.values():
            hook(self, with_grad, first_grads, first_norm)
        return first_norm

    def _keeps_first_gradient(self, setting: Tuple[float, float, bool]) -> bool:
        """Return True when a group's g1 must live on through the second pass.

        It must when the mixing uses it (alpha < 1 in either ``first_gradient`` mode,
        decoupled GR), and for a group that is not moved, whose g1 cannot be read back
        from the displacement for cos(g1, g2). A moved SAM group (alpha = 1) needs only
        its copy of theta.
        """
        r, alpha, moved = setting
        if self.restore == "subtract":
            return True
        return alpha != 1.0 or self.decoupled or not moved or r == 0.0

    def _restores_by_copy(self, params: List[Tensor], keeps_first: bool) -> bool:
        """Return True when a moved group keeps a copy of theta (exact restore) instead of subtracting r g1/||g1||."""
        if self.restore == "copy" or not keeps_first:
            return True
        if self.restore == "subtract":
            return False
        if self._distributed() and self.perturbation == "local":
            # Each rank would subtract its own g1 and round differently, so the replicas would drift apart.
            return True
        return any(p.dtype in (torch.float16, torch.bfloat16) for p in params)

    def _begin_finite_difference(self, settings, gr_step: bool) -> "_PendingStep":
        """Read g1 from ``p.grad`` and, when a second pass will change the result, perturb theta.

        Memory: each moved group keeps one parameter-sized buffer through the second
        pass, either the copy of theta (SAM groups, and 16-bit parameters) or g1 (which
        the mixing needs, and from which theta is restored by subtraction). ``p.grad``
        is set to None afterwards, so the second backward pass writes fresh tensors even
        if the caller zeroes gradients in place.
        """
        grouped = [[p for p in ps if p.grad is not None] for ps in self._params_by_group()]
        with_grad = [p for ps in grouped for p in ps]
        first_grads = [p.grad for p in with_grad]
        first_norm = self._first_pass_done(with_grad, first_grads)
        del first_grads

        # The unit direction is taken over the perturbed groups only.
        perturbed = [p.grad for ps, (_, _, on) in zip(grouped, settings) if on for p in ps]
        direction_norm = float(F.global_norm(perturbed)) if len(perturbed) < len(with_grad) else first_norm
        del perturbed
        moves = any(on and r > 0.0 and ps for ps, (r, _, on) in zip(grouped, settings))
        mixes = any(alpha > 0.0 and ps for ps, (_, alpha, _) in zip(grouped, settings))
        run_second = gr_step and math.isfinite(first_norm) and direction_norm > 0.0 and moves and mixes

        first_by_param = {p: p.grad for p in with_grad}
        pending = _PendingStep(grouped, with_grad, first_by_param, first_norm, direction_norm, gr_step, run_second)
        if not run_second:
            return pending

        pending.scales, pending.backups = [], []
        for ps, setting in zip(grouped, settings):
            r, _, on = setting
            scale = r / direction_norm if on else 0.0
            keeps_first = self._keeps_first_gradient(setting)
            backup = None
            if scale != 0.0 and ps and self._restores_by_copy(ps, keeps_first):
                backup = F.backup_parameters(ps)
            F.perturb_parameters_(ps, [p.grad for p in ps], scale)
            pending.scales.append(scale)
            pending.backups.append(backup)
            for p in ps:
                if not keeps_first:
                    del first_by_param[p]
                p.grad = None
        return pending

    def _finish_finite_difference(self, pending: "_PendingStep", settings) -> "_GradientResult":
        """Restore theta and mix g1 with the g2 now in ``p.grad``, group by group, into ``p.grad``."""
        with_grad, first_by_param = pending.with_grad, pending.first_by_param
        result = _GradientResult(params=with_grad, loss=None, first_norm=pending.first_norm)
        if not pending.run_second:
            self._mix_without_second_pass(pending.grouped, settings, pending.gr_step, pending.direction_norm, result)
            return result

        for p in with_grad:
            if p.grad is None:
                # A parameter unused at the perturbed point has a zero gradient there.
                p.grad = torch.zeros_like(p)
        second_grads = [p.grad for p in with_grad]
        result.gr_applied, result.closure_calls = True, 2
        result.second_norm = float(F.global_norm(second_grads))

        # g1 . g2, group by group: from g1 where it was kept, else from the displacement
        # theta' - theta = scale * g1, before theta is restored.
        dot = 0.0
        for ps, scale, backup in zip(pending.grouped, pending.scales, pending.backups):
            if not ps:
                continue
            seconds = [p.grad for p in ps]
            if ps[0] in first_by_param:
                dot += float(F.global_dot([first_by_param[p] for p in ps], seconds))
            else:
                dot += float(F.displacement_dot(ps, backup, seconds)) / scale
        if pending.first_norm * result.second_norm > 0:
            result.cosine = dot / (pending.first_norm * result.second_norm)

        for ps, scale, backup in zip(pending.grouped, pending.scales, pending.backups):
            if backup is not None:
                F.restore_parameters_(ps, backup)
            elif scale != 0.0:
                F.perturb_parameters_(ps, [first_by_param[p] for p in ps], -scale)
        pending.backups = None

        if self.decoupled:
            result.decoupled_terms = []
        for ps, (_, alpha, _) in zip(pending.grouped, settings):
            if not ps:
                continue
            seconds = [p.grad for p in ps]
            if self.decoupled:
                # The optimizer receives g1; the GR term alpha * (g2 - g1) is applied after its step.
                firsts = [first_by_param[p] for p in ps]
                F.mix_gradients_(seconds, firsts, alpha=alpha, first_coefficient=-alpha)
                result.decoupled_terms += seconds
                for p, first in zip(ps, firsts):
                    p.grad = first
                continue
            coefficient = F.first_gradient_coefficient(alpha, self.first_gradient, pending.direction_norm)
            if coefficient == 0.0:
                F.mix_gradients_(seconds, [], alpha=alpha, first_coefficient=0.0)
            else:
                F.mix_gradients_(seconds, [first_by_param[p] for p in ps], alpha=alpha, first_coefficient=coefficient)
        first_by_param.clear()
        if result.decoupled_terms is not None:
            result.gr_term_norm = float(F.global_norm(result.decoupled_terms))
        elif all(alpha == 1.0 for _, alpha, _ in settings):
            # SAM: the g1 coefficient is 0 in both first_gradient modes, so the mixed gradient is g2 itself.
            result.received_norm = result.second_norm
        return result

    def _mix_without_second_pass(self, grouped, settings, gr_step: bool, direction_norm: float, result) -> None:
        """Apply the mixing rule with g2 = g1, for steps where the second pass would not change it.

        In raw mode g = (1 - alpha) g1 + alpha g1 = g1, so nothing is done, which keeps a
        step with r = 0 or alpha = 0 bit-identical to the plain optimizer. The optimizer
        then receives g1, whose norm is known, so clipping needs no second norm pass.
        """
        if self.decoupled:
            result.decoupled_terms = None
            result.received_norm = result.first_norm
            return
        if not gr_step or self.first_gradient == "raw" or not math.isfinite(result.first_norm):
            result.received_norm = result.first_norm
            return
        for ps, (_, alpha, _) in zip(grouped, settings):
            coefficient = F.first_gradient_coefficient(alpha, self.first_gradient, direction_norm)
            F.scale_([p.grad for p in ps], coefficient + alpha)

    def _exact_gradients(self, closure, settings, gr_step: bool) -> "_GradientResult":
        """g = grad L + alpha * H v by double back-propagation, written into ``p.grad``.

        v = r * g1 / ||g1|| over the perturbed groups for the norm penalty, and
        v = r * g1 for the squared-norm penalty, so that with one (r, alpha) the result
        is grad (L + lambda ||grad L||) or grad (L + lambda/2 ||grad L||^2), lambda = alpha r.
        """
        groups = self._params_by_group()
        trainable = [p for ps in groups for p in ps if p.requires_grad]
        for p in trainable:
            p.grad = None
        with self._no_sync(), torch.enable_grad():
            loss = closure()
            if any(p.grad is not None for p in trainable):
                raise ValueError(
                    "mode='exact' needs a closure that returns the loss without calling backward(): "
                    "the regularizer differentiates the loss twice itself. Remove loss.backward() "
                    "from the closure, or use mode='finite_difference'."
                )
            if not isinstance(loss, Tensor) or loss.grad_fn is None:
                raise ValueError(
                    "mode='exact' needs a closure that returns the loss tensor with its autograd graph; "
                    f"it returned {type(loss).__name__}."
                )
            gradients = torch.autograd.grad(loss, trainable, create_graph=gr_step, allow_unused=True)

            index = {p: i for i, p in enumerate(trainable)}
            grouped = [[p for p in ps if p.requires_grad and gradients[index[p]] is not None] for ps in groups]
            with_grad = [p for ps in grouped for p in ps]
            first_grads = [gradients[index[p]].detach() for p in with_grad]
            first_norm = self._first_pass_done(with_grad, first_grads)
            result = _GradientResult(params=with_grad, loss=loss.detach(), first_norm=first_norm)

            first_by_param = dict(zip(with_grad, first_grads))
            perturbed = [first_by_param[p] for ps, (_, _, on) in zip(grouped, settings) if on for p in ps]
            direction_norm = float(F.global_norm(perturbed)) if len(perturbed) < len(with_grad) else first_norm
            run_hvp = gr_step and math.isfinite(first_norm) and direction_norm > 0.0 and any(
                on and r > 0.0 and alpha > 0.0 for r, alpha, on in settings
            )
            hessian_vector = None
            if run_hvp:
                vector = []
                for ps, (r, _, on) in zip(grouped, settings):
                    if not on:
                        scale = 0.0
                    elif self.penalty == "norm":
                        scale = r / direction_norm
                    else:
                        scale = r
                    vector += [first_by_param[p] * scale for p in ps]
                graph_gradients = [gradients[index[p]] for p in with_grad]
                hessian_vector = torch.autograd.grad(graph_gradients, with_grad, grad_outputs=vector, allow_unused=True)
        del gradients

        terms = []
        position = 0
        for ps, (_, alpha, _) in zip(grouped, settings):
            for p in ps:
                product = hessian_vector[position] if hessian_vector is not None else None
                position += 1
                term = torch.zeros_like(first_by_param[p]) if product is None else alpha * product.detach()
                terms.append(term)
        result.gr_applied = hessian_vector is not None
        if self.decoupled:
            result.decoupled_terms = terms if hessian_vector is not None else None
            for p in with_grad:
                p.grad = first_by_param[p].clone()
        else:
            for p, term in zip(with_grad, terms):
                p.grad = first_by_param[p] + term if hessian_vector is not None else first_by_param[p].clone()
        if self._distributed():
            F.all_reduce_mean_([p.grad for p in with_grad])
            if result.decoupled_terms is not None:
                F.all_reduce_mean_(result.decoupled_terms)
        if result.decoupled_terms is not None:
            result.gr_term_norm = float(F.global_norm(result.decoupled_terms))
        return result

    @torch.no_grad()
    def _apply_decoupled_terms(self, params: List[Tensor], terms: List[Tensor]) -> None:
        """theta -= lr * term for every parameter, with its group's learning rate."""
        term_by_param = dict(zip(params, terms))
        for group in self.param_groups:
            members = [p for p in group["params"] if p in term_by_param]
            if members:
                torch._foreach_add_(members, [term_by_param[p] for p in members], alpha=-float(group["lr"]))

    def state_dict(self) -> Dict[str, Any]:
        """Return the wrapped optimizer's state and the wrapper's step counter and generator."""
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "gradient_regularizer": {
                "step_count": self.step_count,
                "generator_state": self.generator.get_state(),
                "r": self.r,
                "alpha": self.alpha,
                "warmup": self.warmup,
                "warmup_steps": self.warmup_steps,
                "first_gradient": self.first_gradient,
                "max_grad_norm": self.max_grad_norm,
                "gr_probability": self.gr_probability,
                "mode": self.mode,
                "penalty": self.penalty,
                "decoupled": self.decoupled,
                "perturbation": self.perturbation,
                "restore": self.restore,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; training then continues exactly.

        The settings stored beside the counter (r, alpha, warmup, ...) are for the
        record: the values given to the constructor stay in force.
        """
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict or "gradient_regularizer" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Invalid state_dict for GradientRegularizer (keys: {keys}). Pass the result of "
                "GradientRegularizer.state_dict(); load a plain optimizer's state with "
                "wrapper.base_optimizer.load_state_dict(...)."
            )
        own = state_dict["gradient_regularizer"]
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.step_count = int(own["step_count"])
        self.generator.set_state(own["generator_state"])


def _scale_of(grad_scaler: Optional[Any]) -> float:
    """Return the loss scale of an enabled GradScaler, else 1."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return 1.0
    return float(grad_scaler.get_scale())


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, Tensor):
        return float(value.detach())
    return float(value)
