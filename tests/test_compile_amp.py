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


def test_bf16_autocast_step_is_close_to_fp32():
    x, y = batch()
    results = {}
    for precision in ("fp32", "bf16"):
        model = make_model().eval()  # no dropout, so both precisions see the same function
        optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.05, alpha=1.0)

        def closure():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
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
