"""GradientRegularizer: the GR step as a wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

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


@dataclasses.dataclass(frozen=True)
class GRStepStats:
    """What one call of :meth:`GradientRegularizer.step` did, for logging.

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
    """cos(g1, g2)."""
    grad_norm_before_clip: float
    grad_norm_after_clip: float
    skipped: bool
    """The update was skipped because a gradient was not finite."""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


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

    The closure passed to :meth:`step` clears the gradients, evaluates the model,
    calls ``backward()`` and returns the loss, as for :class:`torch.optim.LBFGS`. It
    runs once at theta and once at the perturbed point. Both runs see the same
    dropout and drop-path masks because the CPU and CUDA generator states are replayed.

    Non-finite and zero gradients: a non-finite ||g1|| or a non-finite mixed gradient
    skips the update. The parameters keep their values, the wrapped optimizer is not
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

        self.step_count = 0
        # An OrderedDict because RemovableHandle keeps a weak reference to it.
        self._first_gradient_hooks: "OrderedDict[int, Callable[..., None]]" = OrderedDict()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self.last_step: Optional[GRStepStats] = None

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
        """Add a parameter group to the wrapped optimizer."""
        if not self._initializing:
            self.base_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"GradientRegularizer(r={self.r}, alpha={self.alpha}, warmup={self.warmup!r}, "
            f"warmup_steps={self.warmup_steps}, first_gradient={self.first_gradient!r}, "
            f"max_grad_norm={self.max_grad_norm}, gr_probability={self.gr_probability},\n"
            f"  base_optimizer={self.base_optimizer!r})"
        )

    def gr_values(self, step: Optional[int] = None) -> Tuple[float, float]:
        """Return the schedule's (r_t, alpha_t) for ``step`` (default: the next step)."""
        t = self.step_count if step is None else step
        r_t, alpha_t = self.schedule(t)
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

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Run one GR step and return the closure's loss at theta.

        Args:
            closure: clears the gradients, evaluates the model, calls ``backward()``
                and returns the loss. Required.
        """
        if closure is None:
            raise ValueError(
                "GradientRegularizer.step needs a closure: it evaluates the loss twice. "
                "Pass a function that calls zero_grad(), computes the loss, calls "
                "loss.backward() and returns the loss."
            )
        t = self.step_count
        r_t, alpha_t = self.gr_values(t)
        drawn_gr = self._draw_gr_step()
        gr_step = drawn_gr and not (r_t == 0.0 and alpha_t == 0.0)
        params = [p for group in self.param_groups for p in group["params"]]
        cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})

        # First pass at theta.
        rng_before = _RNGState(cuda_devices)
        with torch.enable_grad():
            loss = closure()
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                "The closure produced no gradients. Call loss.backward() inside the closure, "
                "and check that the optimizer holds the model's parameters."
            )
        first_grads = [p.grad for p in with_grad]
        first_norm = float(F.global_norm(first_grads))
        first_finite = math.isfinite(first_norm)
        for hook in self._first_gradient_hooks.values():
            hook(self, with_grad, first_grads, first_norm)

        # Second pass at theta + r_t * g1 / ||g1||, only when it changes the result.
        run_second = gr_step and first_finite and r_t > 0.0 and alpha_t > 0.0 and first_norm > 0.0
        perturbed_loss: Any = None
        second_grads = first_grads
        if run_second:
            second_grads, perturbed_loss = self._second_pass(closure, with_grad, first_grads, r_t / first_norm, rng_before, cuda_devices)

        # Mix into the tensors the optimizer reads.
        second_norm = F.global_norm(second_grads) if run_second else torch.tensor(math.nan)
        cosine_numerator = F.global_dot(first_grads, second_grads) if run_second else torch.tensor(math.nan)
        if gr_step and first_finite:
            coefficient = F.first_gradient_coefficient(alpha_t, self.first_gradient, first_norm)
            if run_second:
                F.mix_gradients_(second_grads, first_grads, alpha=alpha_t, first_coefficient=coefficient)
            elif self.first_gradient == "normalized":
                # g2 = g1, so g = (c + alpha) * g1; in raw mode c + alpha = 1 exactly.
                F.scale_(first_grads, coefficient + alpha_t)
        mixed_grads = second_grads
        del first_grads

        # Clip, check and update.
        before_clip = float(F.global_norm(mixed_grads))
        factor = F.clip_coefficient(before_clip, self.max_grad_norm)
        F.scale_(mixed_grads, factor)
        skipped = not math.isfinite(before_clip)
        if skipped:
            logger.warning(
                "Skipped update at GR step %d: the gradient norm is not finite (||g1|| = %s, ||g|| = %s).",
                t,
                first_norm,
                before_clip,
            )
        else:
            self.base_optimizer.step()
            self.step_count += 1

        self.last_step = self._record(
            t, r_t, alpha_t, gr_step, run_second, loss, perturbed_loss, first_norm, second_norm,
            cosine_numerator, before_clip, before_clip * factor, skipped,
        )
        return loss

    def _second_pass(
        self,
        closure: Callable[[], Any],
        params: List[Tensor],
        first_grads: List[Tensor],
        scale: float,
        rng_before: _RNGState,
        cuda_devices: List[int],
    ) -> Tuple[List[Tensor], Any]:
        """Evaluate the closure at theta + scale * g1 and return (g2, loss there).

        Theta is restored bit for bit from a copy. The first gradients stay alive in
        ``first_grads`` because ``p.grad`` is set to None before the closure, so its
        backward writes fresh tensors even if it zeroes gradients in place.
        """
        rng_after_first = _RNGState(cuda_devices)
        backup = F.backup_parameters(params)
        F.perturb_parameters_(params, first_grads, scale)
        for p in params:
            p.grad = None

        rng_before.restore()
        with _FrozenNormStatistics(self.model), torch.enable_grad():
            perturbed_loss = closure()
        rng_after_first.restore()
        F.restore_parameters_(params, backup)

        second_grads = []
        for p, g1 in zip(params, first_grads):
            if p.grad is None:
                # A parameter unused at the perturbed point has a zero gradient there.
                p.grad = torch.zeros_like(g1)
            second_grads.append(p.grad)
        return second_grads, perturbed_loss

    def _record(
        self,
        t: int,
        r_t: float,
        alpha_t: float,
        gr_step: bool,
        ran_second: bool,
        loss: Any,
        perturbed_loss: Any,
        first_norm: float,
        second_norm: Tensor,
        dot: Tensor,
        before_clip: float,
        after_clip: float,
        skipped: bool,
    ) -> GRStepStats:
        second = float(second_norm)
        cosine = float(dot) / (first_norm * second) if ran_second and first_norm * second > 0 else math.nan
        return GRStepStats(
            step=t,
            r=r_t if gr_step else 0.0,
            alpha=alpha_t if gr_step else 0.0,
            lam=r_t * alpha_t if gr_step else 0.0,
            gr_step=gr_step,
            gr_applied=ran_second,
            closure_calls=2 if ran_second else 1,
            loss=_to_float(loss),
            perturbed_loss=_to_float(perturbed_loss),
            grad_norm_first=first_norm,
            grad_norm_second=second,
            cosine=cosine,
            grad_norm_before_clip=before_clip,
            grad_norm_after_clip=after_clip,
            skipped=skipped,
        )

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


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, Tensor):
        return float(value.detach())
    return float(value)
