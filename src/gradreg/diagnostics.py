"""Diagnostics that show how GR changes an adaptive optimizer's gradient statistics.

Adam-type optimizers scale coordinate i by the adaptive learning rate
psi_i = 1 / (sqrt(v_hat_i) + eps), where v_hat is the bias-corrected moving average of
squared gradients. Zhao, Zhang and Hu (ICML 2024, arXiv:2406.09723) argue that GR harms
these optimizers because the GR gradient g = (1 - alpha) g1 + alpha g2 differs from the
clean gradient g1 while v_hat forms during learning-rate warmup. :class:`GRDiagnostics`
makes this measurable from a user's own loop::

    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=100)
    for batch in loader:
        optimizer.step(closure)
        record = diagnostics.after_step()   # per-step values, plus optimizer
                                            # statistics every 100 steps

Per step (cheap): learning rate, r_t, alpha_t, lambda_t, whether GR ran, the loss at
theta and at the perturbed point, ||g1||, ||g2||, cos(g1, g2), the mixed-gradient norm
before and after clipping, and ||theta||.

Every ``stats_every`` steps, from the wrapped optimizer's own state:

* ``m_hat``: |bias-corrected first moment| (Adam, AdamW; SGD's momentum buffer): mean, median, max;
* ``v_hat``: bias-corrected second moment (Adam, AdamW; RMSprop's ``square_avg``, which
  torch does not bias-correct): mean, median, max;
* ``psi``: the adaptive learning rate 1 / (sqrt(v_hat) + eps): mean, variance and
  coefficient of variation (std / mean) across the coordinates with v_hat > 0;
  ``psi_excluded`` counts the coordinates that never received a gradient;
* ``v_drift``: ||v_hat - v_hat_clean|| / ||v_hat_clean||, where v_hat_clean is a shadow
  moving average with the optimizer's own decay and bias correction, fed the clean
  gradient g1 (clipped by the same rule as the mixed gradient) instead of the gradient
  the optimizer received. It is 0 for a run without GR.

Each is computed over all coordinates together (``global``) and per parameter tensor.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .regularizer import GradientRegularizer

SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.SGD)


def _summary(values: Tensor, prefix: str) -> Dict[str, float]:
    """Mean, median and max of a flat tensor."""
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_median": float(values.median()),
        f"{prefix}_max": float(values.max()),
    }


def adaptive_lr_summary(psi: Tensor) -> Dict[str, float]:
    """Mean, variance (population) and coefficient of variation of the adaptive learning rate."""
    psi = psi.double()
    mean = float(psi.mean())
    variance = float(psi.var(unbiased=False)) if psi.numel() > 1 else 0.0
    return {
        "psi_mean": mean,
        "psi_var": variance,
        "psi_cv": math.sqrt(variance) / mean if mean > 0 else math.nan,
    }


def _step_number(state: Dict[str, Any]) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, Tensor) else step)


def moment_estimates(optimizer: torch.optim.Optimizer, group: Dict[str, Any], param: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[float]]:
    """Return (m_hat, v_hat, eps) of one parameter from the optimizer's state.

    Adam and AdamW: m_hat = m / (1 - beta1^t) and v_hat = v / (1 - beta2^t), using
    ``max_exp_avg_sq`` under AMSGrad as torch does. RMSprop: v_hat = ``square_avg``
    (torch applies no bias correction) and no m_hat. SGD: m_hat = the momentum buffer
    and no v_hat. Missing state (before the first step) gives (None, None, None).
    """
    state = optimizer.state.get(param)
    if not state:
        return None, None, None
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = group["betas"]
        t = _step_number(state)
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        m_hat = state["exp_avg"] / (1.0 - beta1**t)
        v_hat = second / (1.0 - beta2**t)
        return m_hat, v_hat, float(group["eps"])
    if isinstance(optimizer, torch.optim.RMSprop):
        return None, state["square_avg"], float(group["eps"])
    if isinstance(optimizer, torch.optim.SGD):
        return state.get("momentum_buffer"), None, None
    return None, None, None


def _second_moment_decay(optimizer: torch.optim.Optimizer, group: Dict[str, Any]) -> Tuple[Optional[float], bool]:
    """Return (decay of the squared-gradient average, whether it is bias-corrected)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return float(group["betas"][1]), True
    if isinstance(optimizer, torch.optim.RMSprop):
        return float(group["alpha"]), False
    return None, False


class GRDiagnostics:
    """Per-step values and periodic gradient statistics of a :class:`GradientRegularizer`.

    Args:
        optimizer: the regularizer whose wrapped optimizer is inspected (Adam, AdamW,
            RMSprop or SGD; other optimizers get the per-step values only).
        model: used for parameter names in per-tensor statistics; without it tensors
            are named ``param_<index>``.
        stats_every: compute optimizer statistics every this many steps (>= 1), and at
            step 0. Set it to 0 to turn them off.
        per_tensor: include statistics per parameter tensor.

    Create it before the first ``optimizer.step``, because the shadow average counts
    its own steps for the bias correction, and call :meth:`after_step` after every
    ``optimizer.step``. The shadow average of clean
    squared gradients costs one parameter-sized buffer and one fused update per step;
    it is kept only for Adam, AdamW and RMSprop.
    """

    def __init__(
        self,
        optimizer: GradientRegularizer,
        *,
        model: Optional[nn.Module] = None,
        stats_every: int = 100,
        per_tensor: bool = True,
    ) -> None:
        if not isinstance(optimizer, GradientRegularizer):
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__}. GRDiagnostics needs a GradientRegularizer; "
                "wrap a plain optimizer as GradientRegularizer(optimizer, r=0, alpha=0) to inspect it."
            )
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 0:
            raise ValueError(f"Invalid stats_every: {stats_every!r}. Use an integer >= 0 (0 turns statistics off).")
        self.optimizer = optimizer
        self.base = optimizer.base_optimizer
        self.stats_every = stats_every
        self.per_tensor = per_tensor
        self.names: Dict[Tensor, str] = {}
        if model is not None:
            self.names = {param: name for name, param in model.named_parameters()}

        # Shadow second moment of clean gradients, per parameter, with its own step count.
        self.shadow: Dict[Tensor, Tensor] = {}
        self.shadow_steps = 0
        self._pending_shadow = False
        self._handle = optimizer.register_first_gradient_hook(self._update_shadow)

    def close(self) -> None:
        """Stop following the optimizer."""
        self._handle.remove()

    def _params(self) -> List[Tensor]:
        return [p for group in self.base.param_groups for p in group["params"]]

    def state_dict(self) -> Dict[str, Any]:
        """Return the shadow average (by parameter index) and its step count, for checkpoints."""
        index = {param: i for i, param in enumerate(self._params())}
        return {
            "shadow": {index[param]: value.clone() for param, value in self.shadow.items()},
            "shadow_steps": self.shadow_steps,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run keeps its v_hat drift."""
        params = self._params()
        self.shadow = {params[int(i)]: value.to(params[int(i)].device) for i, value in state_dict["shadow"].items()}
        self.shadow_steps = int(state_dict["shadow_steps"])

    def _group_of(self) -> Dict[Tensor, Dict[str, Any]]:
        return {p: group for group in self.base.param_groups for p in group["params"]}

    @torch.no_grad()
    def _update_shadow(self, optimizer, params: Sequence[Tensor], first_grads: Sequence[Tensor], first_norm: float) -> None:
        if self.stats_every == 0 or not math.isfinite(first_norm):
            return
        clip = F.clip_coefficient(first_norm, optimizer.max_grad_norm)
        groups = self._group_of()

        # One fused update per decay value: v_clean = decay * v_clean + (1 - decay) * (clip * g1)^2.
        by_decay: Dict[float, Tuple[List[Tensor], List[Tensor]]] = {}
        for param, grad in zip(params, first_grads):
            decay, _ = _second_moment_decay(self.base, groups[param])
            if decay is None:
                continue
            if param not in self.shadow:
                self.shadow[param] = torch.zeros_like(param, memory_format=torch.preserve_format)
            shadows, grads = by_decay.setdefault(decay, ([], []))
            shadows.append(self.shadow[param])
            grads.append(grad)
        for decay, (shadows, grads) in by_decay.items():
            torch._foreach_mul_(shadows, decay)
            torch._foreach_addcmul_(shadows, grads, grads, value=(1.0 - decay) * clip * clip)
        self._pending_shadow = bool(by_decay)

    def after_step(self) -> Dict[str, Any]:
        """Return this step's record, with a ``stats`` entry on statistics steps."""
        stats = self.optimizer.last_step
        if stats is None:
            raise RuntimeError("GRDiagnostics.after_step() was called before the first optimizer.step().")
        if self._pending_shadow and not stats.skipped:
            self.shadow_steps += 1
        self._pending_shadow = False

        params = self._params()
        record: Dict[str, Any] = {
            "step": stats.step,
            "lr": float(self.base.param_groups[0]["lr"]),
            **{key: value for key, value in stats.as_dict().items() if key != "step"},
            "param_norm": float(F.global_norm([p.detach() for p in params])),
        }
        if self.stats_every and stats.step % self.stats_every == 0:
            record["stats"] = self.optimizer_statistics()
        return record

    @torch.no_grad()
    def optimizer_statistics(self) -> Dict[str, Any]:
        """Summarise m_hat, v_hat, psi and the v_hat drift from the optimizer's current state."""
        groups = self._group_of()
        entries = []
        for index, param in enumerate(self._params()):
            m_hat, v_hat, eps = moment_estimates(self.base, groups[param], param)
            if m_hat is None and v_hat is None:
                continue
            clean = self._clean_second_moment(param, groups[param]) if v_hat is not None else None
            entries.append((self.names.get(param, f"param_{index}"), m_hat, v_hat, eps, clean))

        result: Dict[str, Any] = {"global": _statistics(entries)}
        if self.per_tensor:
            result["per_tensor"] = {entry[0]: _statistics([entry]) for entry in entries}
        return result

    def _clean_second_moment(self, param: Tensor, group: Dict[str, Any]) -> Optional[Tensor]:
        shadow = self.shadow.get(param)
        if shadow is None or self.shadow_steps == 0:
            return None
        decay, corrected = _second_moment_decay(self.base, group)
        if corrected:
            return shadow / (1.0 - decay**self.shadow_steps)
        return shadow


def _statistics(entries: Iterable[Tuple[str, Optional[Tensor], Optional[Tensor], Optional[float], Optional[Tensor]]]) -> Dict[str, Any]:
    """Combine the moment tensors of the given entries into one summary."""
    entries = list(entries)
    result: Dict[str, Any] = {"numel": 0}
    m_values = [m.reshape(-1).abs().double() for _, m, _, _, _ in entries if m is not None]
    v_values = [v.reshape(-1).double() for _, _, v, _, _ in entries if v is not None]
    if m_values:
        result.update(_summary(torch.cat(m_values), "m_hat_abs"))
        result["numel"] = sum(t.numel() for t in m_values)
    if v_values:
        all_v = torch.cat(v_values)
        result["numel"] = all_v.numel()
        result.update(_summary(all_v, "v_hat"))
        # Coordinates that never received a gradient (v_hat = 0, for example the key part
        # of the qkv bias, to which softmax attention is invariant) would sit at 1/eps and
        # swamp the spread of psi, so they are counted and left out.
        psi_parts, excluded = [], 0
        for _, _, v, eps, _ in entries:
            if v is None:
                continue
            flat = v.reshape(-1).double()
            received = flat[flat > 0]
            excluded += flat.numel() - received.numel()
            psi_parts.append(1.0 / (received.sqrt() + eps))
        psi = torch.cat(psi_parts)
        result["psi_excluded"] = excluded
        if psi.numel() > 0:
            result.update(adaptive_lr_summary(psi))

        cleans = [(v, c) for _, _, v, _, c in entries if v is not None and c is not None]
        if cleans and len(cleans) == len(v_values):
            difference = math.sqrt(sum(float(((v.double() - c.double()) ** 2).sum()) for v, c in cleans))
            reference = math.sqrt(sum(float((c.double() ** 2).sum()) for _, c in cleans))
            result["v_drift"] = difference / reference if reference > 0 else math.nan
    return result
