"""torch.compile'd models and bf16 autocast with the regularizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradreg import GradientRegularizer


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator)


@pytest.mark.slow
def test_compiled_model_compiles_once():
    """Changing r_t, alpha_t and the pass do not change what Dynamo traced, so nothing recompiles."""
    torch._dynamo.reset()
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(len(graph_module.graph.nodes))
        return graph_module.forward

    model = make_model()
    compiled = torch.compile(model, backend=counting_backend)
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-3), r=0.05, alpha=1.0,
                                    warmup="zero", warmup_steps=2, max_grad_norm=1.0, model=compiled)
    x, y = batch()
    counts = []
    for _ in range(8):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        counts.append(len(compilations))
    assert counts[0] >= 1
    assert counts[-1] == counts[1], counts  # no recompilation after the first steps
    assert optimizer.last_step.gr_applied


def test_bf16_autocast_step_is_close_to_fp32(device):
    x, y = (tensor.to(device) for tensor in batch())
    results = {}
    for precision in ("fp32", "bf16"):
        model = make_model().eval().to(device)  # no dropout, so both precisions see the same function
        optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.05, alpha=1.0)

        def closure():
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        assert optimizer.last_step.gr_applied
        assert all(p.dtype == torch.float32 for p in model.parameters())
        results[precision] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(results["bf16"], results["fp32"], rtol=0.05, atol=5e-3)


def scaled_closure(model, optimizer, scaler, x, y, infinite_on_call=None):
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        calls.append(1)
        factor = float("inf") if infinite_on_call == len(calls) else 1.0
        scaler.scale(loss * factor).backward()
        return loss

    return closure


def test_grad_scaler_step_equals_unscaled_step(device):
    """Power-of-two loss scales are exact, so the scaled GR step equals the plain fp32 one bit for bit."""
    x, y = (tensor.to(device) for tensor in batch())
    scaled_model, reference_model = make_model().eval().to(device), make_model().eval().to(device)
    scaled = GradientRegularizer(torch.optim.AdamW(scaled_model.parameters(), lr=1e-2), r=0.05, alpha=0.5, max_grad_norm=0.5)
    reference = GradientRegularizer(torch.optim.AdamW(reference_model.parameters(), lr=1e-2), r=0.05, alpha=0.5, max_grad_norm=0.5)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)

    for _ in range(3):
        scaled.step(scaled_closure(scaled_model, scaled, scaler, x, y), grad_scaler=scaler)
        scaler.update()

        def closure():
            reference.zero_grad()
            loss = nn.functional.cross_entropy(reference_model(x), y)
            loss.backward()
            return loss

        reference.step(closure)
        assert scaled.last_step.grad_norm_first == reference.last_step.grad_norm_first
    for actual, expected in zip(scaled_model.parameters(), reference_model.parameters()):
        assert torch.equal(actual, expected)
    assert scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("infinite_pass", [1, 2])
def test_grad_scaler_infinite_pass_skips_and_backs_off(infinite_pass):
    x, y = batch()
    model = make_model().eval()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = GradientRegularizer(base, r=0.05, alpha=1.0, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    optimizer.step(scaled_closure(model, optimizer, scaler, x, y), grad_scaler=scaler)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    steps_before = [int(base.state[p]["step"]) for p in model.parameters()]

    optimizer.step(scaled_closure(model, optimizer, scaler, x, y, infinite_on_call=infinite_pass), grad_scaler=scaler)
    scaler.update()

    assert optimizer.last_step.skipped
    assert optimizer.step_count == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert [int(base.state[p]["step"]) for p in model.parameters()] == steps_before
    assert scaler.get_scale() == 2.0**9  # backed off once

    optimizer.step(scaled_closure(model, optimizer, scaler, x, y), grad_scaler=scaler)
    scaler.update()
    assert not optimizer.last_step.skipped
    assert optimizer.step_count == 2


def test_two_call_grad_scaler_equals_closure_step():
    x, y = batch()
    closure_model, split_model = make_model().eval(), make_model().eval()
    closure_optimizer = GradientRegularizer(torch.optim.AdamW(closure_model.parameters(), lr=1e-2), r=0.05, alpha=0.5)
    split_optimizer = GradientRegularizer(torch.optim.AdamW(split_model.parameters(), lr=1e-2), r=0.05, alpha=0.5)
    closure_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    split_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    for _ in range(3):
        closure_optimizer.step(scaled_closure(closure_model, closure_optimizer, closure_scaler, x, y), grad_scaler=closure_scaler)
        closure_scaler.update()

        split_optimizer.zero_grad()
        split_scaler.scale(nn.functional.cross_entropy(split_model(x), y)).backward()
        assert split_optimizer.first_step(grad_scaler=split_scaler)
        split_scaler.scale(nn.functional.cross_entropy(split_model(x), y)).backward()
        split_optimizer.second_step(grad_scaler=split_scaler)
        split_scaler.update()
    for actual, expected in zip(split_model.parameters(), closure_model.parameters()):
        assert torch.equal(actual, expected)

    split_optimizer.zero_grad()
    nn.functional.cross_entropy(split_model(x), y).backward()
    split_optimizer.first_step()
    with pytest.raises(ValueError, match="same grad_scaler"):
        split_optimizer.second_step(grad_scaler=split_scaler)
