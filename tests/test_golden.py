"""Parity with golden vectors computed by the authors' JAX code on a tiny MLP.

The golden folder's README gives the conventions: a Flax kernel is stored [in, out], so
the torch weight is ``kernel.T``; the optimizer is AdamW with weight decay 0.3; the
learning rate for update t is ``1e-2 * t / 10`` for t < 10, then cosine to 0 at t = 20.
Tolerances: gradients atol 1e-6 and rtol 1e-5, parameters after 12 steps atol 5e-6 and
rtol 1e-5, Adam's second moment rtol 5e-5.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch import nn

from gradreg import GradientRegularizer

LAYERS = ("Dense_0", "Dense_1", "Dense_2")
GRAD_TOLERANCE = dict(atol=1e-6, rtol=1e-5)
PARAM_TOLERANCE = dict(atol=5e-6, rtol=1e-5)
BASE_LR, LR_WARMUP, LR_TOTAL = 1e-2, 10, 20


def build_mlp(arrays: Dict[str, np.ndarray], prefix: str = "init_params") -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    linears = [model[0], model[2], model[4]]
    with torch.no_grad():
        for layer, name in zip(linears, LAYERS):
            layer.weight.copy_(torch.from_numpy(arrays[f"{prefix}.{name}.kernel"]).T)
            layer.bias.copy_(torch.from_numpy(arrays[f"{prefix}.{name}.bias"]))
    return model


def as_torch_layout(arrays, prefix: str, index=None) -> List[torch.Tensor]:
    """Return the golden tensors named ``prefix.*`` in the model's parameter order."""
    tensors = []
    for name in LAYERS:
        kernel = arrays[f"{prefix}.{name}.kernel"]
        bias = arrays[f"{prefix}.{name}.bias"]
        if index is not None:
            kernel, bias = kernel[index], bias[index]
        tensors += [torch.from_numpy(np.ascontiguousarray(kernel.T)), torch.from_numpy(bias)]
    return tensors


def lr_factor(step: int) -> float:
    if step < LR_WARMUP:
        return step / LR_WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * (step - LR_WARMUP) / (LR_TOTAL - LR_WARMUP)))


def load_case(golden_dir: Path, name: str):
    arrays = dict(np.load(golden_dir / f"{name}.npz"))
    settings = json.loads((golden_dir / f"{name}.json").read_text())["settings"]
    return arrays, settings


class Recorder:
    """Builds the MLP, the wrapped AdamW and a closure that records every gradient."""

    def __init__(self, arrays, settings, *, first_gradient, warmup="none", max_grad_norm="setting"):
        self.model = build_mlp(arrays)
        self.x = torch.from_numpy(arrays["batch.x"])
        self.labels = torch.from_numpy(arrays["batch.labels"]).long()
        self.base = torch.optim.AdamW(self.model.parameters(), lr=BASE_LR, weight_decay=0.3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.base, lr_factor)
        warmup_steps = int(settings["warmup_epochs"]) * int(settings["steps_per_epoch"])
        clip = settings["gradient_clipping"] if max_grad_norm == "setting" else max_grad_norm
        self.optimizer = GradientRegularizer(
            self.base,
            r=settings["gnp.r"],
            alpha=settings["gnp.alpha"],
            warmup=warmup,
            warmup_steps=warmup_steps,
            first_gradient=first_gradient,
            max_grad_norm=clip,
        )
        self.closure_grads: List[List[torch.Tensor]] = []
        self.received: List[List[torch.Tensor]] = []
        self.base.register_step_pre_hook(self._record_received)

    def _record_received(self, optimizer, args, kwargs):
        self.received.append([p.grad.detach().clone() for p in self.model.parameters()])

    def closure(self):
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.closure_grads.append([p.grad.detach().clone() for p in self.model.parameters()])
        return loss

    def step(self):
        self.optimizer.step(self.closure)
        self.scheduler.step()


def assert_tensors_close(actual, expected, label, **tolerance):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m: f"{label}, tensor {index}: {m}", **tolerance)


def _shared_golden_dir() -> Path:
    value = os.environ.get("GRADREG_GOLDEN_DIR")
    return Path(value) if value else Path(__file__).resolve().parents[2] / "shared" / "golden"


def _cases(pattern: str) -> List[str]:
    folder = _shared_golden_dir()
    return sorted(Path(p).stem for p in glob.glob(str(folder / f"{pattern}.npz"))) or [f"missing:{pattern}"]


def first_gradient_modes(settings) -> List[str]:
    """The modes in which a golden case is valid.

    Files with norm_perturbations=False use the raw first gradient; those with True use
    the normalised one. A plain step (alpha = 0, r = 0) is the same in both.
    """
    if settings["gnp.alpha"] == 0.0 and settings["gnp.r"] == 0.0:
        return ["raw", "normalized"]
    return ["normalized" if settings["gnp.norm_perturbations"] else "raw"]


@pytest.mark.parametrize("name", _cases("A_*"))
def test_one_step_matches_reference(golden_dir, name):
    arrays, settings = load_case(golden_dir, name)
    for first_gradient in first_gradient_modes(settings):
        clipped = Recorder(arrays, settings, first_gradient=first_gradient)
        clipped.step()
        unclipped = Recorder(arrays, settings, first_gradient=first_gradient, max_grad_norm=None)
        unclipped.step()

        # Plain-step files store no separate g1: the mixed gradient is g1 there.
        first_prefix = "grad_ref" if "grad_ref.Dense_0.kernel" in arrays else "grad_preclip"
        assert_tensors_close(clipped.closure_grads[0], as_torch_layout(arrays, first_prefix), f"{name} g1", **GRAD_TOLERANCE)
        assert_tensors_close(unclipped.received[0], as_torch_layout(arrays, "grad_preclip"), f"{name} mixed", **GRAD_TOLERANCE)
        assert_tensors_close(clipped.received[0], as_torch_layout(arrays, "grad_postclip"), f"{name} clipped", **GRAD_TOLERANCE)

        stats = clipped.optimizer.last_step
        assert stats.grad_norm_before_clip == pytest.approx(float(arrays["grad_preclip_global_norm"]), rel=1e-5)
        logged_loss = stats.perturbed_loss if stats.gr_applied else stats.loss
        assert logged_loss == pytest.approx(float(arrays["metric.train_loss"]), rel=1e-5)


@pytest.mark.parametrize("name", _cases("B_*"))
def test_warmup_step_matches_reference(golden_dir, name):
    arrays, settings = load_case(golden_dir, name)
    strategy = str(settings["gr_warmup_strategy"])
    for first_gradient in first_gradient_modes(settings):
        for index, count in enumerate(arrays["counts"].tolist()):
            # A fresh optimizer whose counter is set to `count`, as the golden run did.
            recorder = Recorder(arrays, settings, first_gradient=first_gradient, warmup=strategy)
            recorder.optimizer.step_count = count
            unclipped = Recorder(arrays, settings, first_gradient=first_gradient, warmup=strategy, max_grad_norm=None)
            unclipped.optimizer.step_count = count
            recorder.step()
            unclipped.step()

            label = f"{name} at count {count}"
            stats = recorder.optimizer.last_step
            assert stats.r == pytest.approx(float(arrays["metric.r"][index]), rel=1e-6, abs=1e-7), label
            assert stats.alpha == pytest.approx(float(arrays["metric.alpha"][index]), rel=1e-6, abs=1e-7), label
            expected_ref = as_torch_layout(arrays, "grad_ref", index)
            assert_tensors_close(recorder.closure_grads[0], expected_ref, f"{label} g1", **GRAD_TOLERANCE)
            expected_mixed = as_torch_layout(arrays, "grad_preclip", index)
            assert_tensors_close(unclipped.received[0], expected_mixed, f"{label} mixed", **GRAD_TOLERANCE)
            expected_clipped = as_torch_layout(arrays, "grad_postclip", index)
            assert_tensors_close(recorder.received[0], expected_clipped, f"{label} clipped", **GRAD_TOLERANCE)


@pytest.mark.parametrize("name", _cases("C_traj_*"))
def test_trajectory_matches_reference(golden_dir, name):
    arrays, settings = load_case(golden_dir, name)
    for first_gradient in first_gradient_modes(settings):
        recorder = Recorder(arrays, settings, first_gradient=first_gradient, warmup=str(settings["gr_warmup_strategy"]))
        params = list(recorder.model.parameters())
        num_steps = arrays["lr_used_in_step"].shape[0]
        assert num_steps == 12

        for step in range(num_steps):
            label = f"{name} ({first_gradient}) step {step}"
            lr_used = recorder.base.param_groups[0]["lr"]
            assert lr_used == pytest.approx(float(arrays["lr_used_in_step"][step]), abs=1e-8), label
            recorder.step()

            stats = recorder.optimizer.last_step
            assert stats.gr_applied == bool(arrays["used_gr_step"][step]) or settings["gnp.r"] == 0.0, label
            assert stats.grad_norm_before_clip == pytest.approx(float(arrays["metric.gradient_norm"][step]), rel=1e-5), label
            logged_loss = stats.perturbed_loss if stats.gr_applied else stats.loss
            assert logged_loss == pytest.approx(float(arrays["metric.train_loss"][step]), rel=1e-5), label
            assert stats.loss == pytest.approx(float(arrays["loss_before_step"][step]), rel=1e-5), label

            assert_tensors_close(recorder.received[step], as_torch_layout(arrays, "grad_postclip", step), f"{label} clipped", **GRAD_TOLERANCE)
            assert_tensors_close([p.detach() for p in params], as_torch_layout(arrays, "params_after_step", step), f"{label} params", **PARAM_TOLERANCE)
            exp_avg = [recorder.base.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [recorder.base.state[p]["exp_avg_sq"] for p in params]
            assert_tensors_close(exp_avg, as_torch_layout(arrays, "adam_mu_after_step", step), f"{label} Adam m", **GRAD_TOLERANCE)
            assert_tensors_close(exp_avg_sq, as_torch_layout(arrays, "adam_nu_after_step", step), f"{label} Adam v", rtol=5e-5, atol=1e-12)

        assert recorder.optimizer.step_count == int(arrays["adam_count_final"])
        assert_tensors_close([p.detach() for p in params], as_torch_layout(arrays, "params_final"), f"{name} final params", **PARAM_TOLERANCE)


def test_golden_initial_loss_matches(golden_dir):
    arrays = dict(np.load(golden_dir / "common.npz"))
    model = build_mlp(arrays)
    x = torch.from_numpy(arrays["batch.x"])
    labels = torch.from_numpy(arrays["batch.labels"]).long()
    logits = model(x)
    torch.testing.assert_close(logits.detach(), torch.from_numpy(arrays["init_logits"]), atol=1e-6, rtol=1e-5)
    loss = nn.functional.cross_entropy(logits, labels)
    assert float(loss.detach()) == pytest.approx(float(arrays["init_loss"]), rel=1e-6)
