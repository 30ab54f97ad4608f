"""GRDiagnostics against a hand computation of the optimizer's moments on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradreg import GradientRegularizer
from gradreg.diagnostics import GRDiagnostics, adaptive_lr_summary

BETAS, EPS, DECAY = (0.8, 0.9), 1e-6, 0.95
CLIP = 0.3


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def make_base(name, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=0.05, betas=BETAS, eps=EPS)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.05, betas=BETAS, eps=EPS, weight_decay=0.1)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=0.01, alpha=DECAY, eps=EPS)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def run_steps(name, steps=3, r=0.1, alpha=0.5):
    """Train a few GR steps and record what a hand computation needs."""
    model = make_model()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=generator)
    base = make_base(name, model.parameters())
    optimizer = GradientRegularizer(base, r=r, alpha=alpha, max_grad_norm=CLIP)
    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=1)

    received, clean = [], []
    base.register_step_pre_hook(lambda opt, args, kwargs: received.append([p.grad.clone() for p in model.parameters()]))
    records = []
    for _ in range(steps):
        calls = []

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if not calls:
                clean.append([p.grad.clone() for p in model.parameters()])
            calls.append(1)
            return loss

        optimizer.step(closure)
        records.append(diagnostics.after_step())
    return model, records, received, clean


def expected_moments(received, decay_first, decay_second, bias_corrected):
    m = [torch.zeros_like(g) for g in received[0]]
    v = [torch.zeros_like(g) for g in received[0]]
    for grads in received:
        m = [decay_first * a + (1 - decay_first) * g for a, g in zip(m, grads)]
        v = [decay_second * b + (1 - decay_second) * g * g for b, g in zip(v, grads)]
    t = len(received)
    if bias_corrected:
        m = [a / (1 - decay_first**t) for a in m]
        v = [b / (1 - decay_second**t) for b in v]
    return m, v


def clipped(grads):
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    factor = 1.0 if norm < CLIP else CLIP / norm
    return [g * factor for g in grads]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_statistics_match_hand_computation(name):
    model, records, received, clean = run_steps(name)
    bias_corrected = name != "rmsprop"
    decay_second = BETAS[1] if bias_corrected else DECAY
    m_hat, v_hat = expected_moments(received, BETAS[0], decay_second, bias_corrected)
    _, v_clean = expected_moments([clipped(g) for g in clean], BETAS[0], decay_second, bias_corrected)
    stats = records[-1]["stats"]["global"]

    v_all = flat(v_hat)
    psi = 1.0 / (v_all.sqrt() + EPS)
    assert stats["numel"] == v_all.numel()
    assert stats["v_hat_mean"] == pytest.approx(float(v_all.mean()), rel=1e-9)
    assert stats["v_hat_median"] == pytest.approx(float(v_all.median()), rel=1e-9)
    assert stats["v_hat_max"] == pytest.approx(float(v_all.max()), rel=1e-9)
    assert stats["psi_mean"] == pytest.approx(float(psi.mean()), rel=1e-9)
    assert stats["psi_var"] == pytest.approx(float(psi.var(unbiased=False)), rel=1e-9)
    assert stats["psi_cv"] == pytest.approx(float(psi.std(unbiased=False) / psi.mean()), rel=1e-9)
    drift = float((v_all - flat(v_clean)).norm() / flat(v_clean).norm())
    assert stats["v_drift"] == pytest.approx(drift, rel=1e-6)
    assert stats["v_drift"] > 1e-3  # GR changed the gradient, so v_hat left its clean shadow

    if bias_corrected:
        m_all = flat(m_hat).abs()
        assert stats["m_hat_abs_mean"] == pytest.approx(float(m_all.mean()), rel=1e-9)
        assert stats["m_hat_abs_median"] == pytest.approx(float(m_all.median()), rel=1e-9)
        assert stats["m_hat_abs_max"] == pytest.approx(float(m_all.max()), rel=1e-9)
    else:
        assert "m_hat_abs_mean" not in stats

    per_tensor = records[-1]["stats"]["per_tensor"]
    names = [n for n, _ in model.named_parameters()]
    assert list(per_tensor) == names
    first_psi = 1.0 / (v_hat[0].reshape(-1).sqrt() + EPS)
    assert per_tensor[names[0]]["psi_var"] == pytest.approx(float(first_psi.var(unbiased=False)), rel=1e-9)
    first_drift = float((v_hat[0] - v_clean[0]).norm() / v_clean[0].norm())
    assert per_tensor[names[0]]["v_drift"] == pytest.approx(first_drift, rel=1e-6)


def test_sgd_reports_momentum_only():
    _, records, received, _ = run_steps("sgd")
    stats = records[-1]["stats"]["global"]
    # torch's SGD starts the buffer at the first gradient, then b = momentum * b + g.
    expected = [g.clone() for g in received[0]]
    for grads in received[1:]:
        expected = [0.9 * b + g for b, g in zip(expected, grads)]
    assert stats["m_hat_abs_max"] == pytest.approx(float(flat(expected).abs().max()), rel=1e-9)
    assert "psi_var" not in stats
    assert "v_drift" not in stats


def test_per_step_record_values():
    model, records, _, _ = run_steps("adamw", steps=2)
    record = records[-1]
    expected_norm = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
    assert record["param_norm"] == pytest.approx(expected_norm, rel=1e-9)
    assert record["step"] == 1
    assert record["lr"] == 0.05
    assert record["lam"] == pytest.approx(0.05)
    for key in ("r", "alpha", "gr_applied", "loss", "perturbed_loss", "grad_norm_first", "grad_norm_second",
                "cosine", "grad_norm_before_clip", "grad_norm_after_clip"):
        assert key in record


def test_plain_run_has_no_drift():
    _, records, _, _ = run_steps("adamw", r=0.0, alpha=0.0)
    assert records[-1]["stats"]["global"]["v_drift"] == pytest.approx(0.0, abs=1e-12)


def test_stats_interval_and_state_round_trip():
    model = make_model()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=0.01), r=0.1, alpha=1.0)
    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=3)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with_stats = []
    for _ in range(7):
        optimizer.step(closure)
        with_stats.append("stats" in diagnostics.after_step())
    assert with_stats == [True, False, False, True, False, False, True]

    state = diagnostics.state_dict()
    assert state["shadow_steps"] == 7
    restored = GRDiagnostics(optimizer, model=model, stats_every=3)
    restored.load_state_dict(state)
    assert restored.shadow_steps == 7
    for param in model.parameters():
        assert torch.equal(restored.shadow[param], diagnostics.shadow[param])


def test_invalid_arguments_raise():
    model = make_model()
    with pytest.raises(ValueError, match="Invalid optimizer: AdamW"):
        GRDiagnostics(torch.optim.AdamW(model.parameters()))
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters()), r=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="Invalid stats_every: -1"):
        GRDiagnostics(optimizer, stats_every=-1)
    with pytest.raises(RuntimeError, match="before the first optimizer.step"):
        GRDiagnostics(optimizer).after_step()


def test_adaptive_lr_summary_values():
    summary = adaptive_lr_summary(torch.tensor([1.0, 3.0]))
    assert summary == {"psi_mean": 2.0, "psi_var": 1.0, "psi_cv": 0.5}


def test_psi_leaves_out_coordinates_without_gradient():
    model = nn.Linear(3, 2).double()
    frozen_row = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=0.01, eps=EPS), r=0.1, alpha=1.0)
    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=1)

    def closure():
        optimizer.zero_grad()
        # Only the first input column is nonzero, so weight columns 1 and 2 get no gradient.
        loss = nn.functional.cross_entropy(model(frozen_row), torch.tensor([0, 1]))
        loss.backward()
        return loss

    optimizer.step(closure)
    stats = diagnostics.after_step()["stats"]["global"]
    assert stats["psi_excluded"] == 4
    v_hat = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()]) / (1 - 0.999)
    psi = 1.0 / (v_hat[v_hat > 0].sqrt() + EPS)
    assert stats["psi_mean"] == pytest.approx(float(psi.mean()), rel=1e-9)
    assert stats["psi_var"] == pytest.approx(float(psi.var(unbiased=False)), rel=1e-9)
