"""GradientRegularizer: exact cases, torch.optim conventions, guards and resumption."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from gradreg import GradientRegularizer


def make_mlp(seed: int = 0, dropout: float = 0.0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def make_batch(seed: int = 1, dtype=torch.float64, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=generator, dtype=dtype), torch.randint(0, 3, (size,), generator=generator)


def make_closure(model, optimizer, x, y, calls=None):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls is not None:
            calls.append(float(loss.detach()))
        return loss

    return closure


def capture_received(optimizer):
    """Record the gradient the wrapped optimizer receives at each step."""
    received = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: received.append(
            [p.grad.detach().clone() for group in opt.param_groups for p in group["params"]]
        )
    )
    return received


# Exact cases.


@pytest.mark.parametrize("r", [1e-3, 0.1, 2.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_quadratic_is_exact(r, alpha):
    """On L = 1/2 x'Ax + b'x the GR gradient is g + lambda * A g / ||g|| for any r."""
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(6, generator=generator, dtype=torch.float64))

    base = torch.optim.SGD([theta], lr=0.1)
    received = capture_received(base)
    optimizer = GradientRegularizer(base, r=r, alpha=alpha)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * theta @ a @ theta + b @ theta
        loss.backward()
        return loss

    with torch.no_grad():
        g = a @ theta + b
    optimizer.step(closure)

    expected = g + alpha * r * (a @ g) / g.norm()
    torch.testing.assert_close(received[0][0], expected, rtol=1e-12, atol=1e-12)
    assert optimizer.last_step.lam == pytest.approx(alpha * r)


def test_alpha_one_is_sam():
    model = make_mlp()
    reference = copy.deepcopy(model)
    x, y = make_batch()
    rho = 0.05

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    received = capture_received(base)
    optimizer = GradientRegularizer(base, r=rho, alpha=1.0)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))

        # SAM by hand: ascend to theta + rho * g / ||g||, take the gradient there, step from theta.
        reference_optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        params = list(reference.parameters())
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            shifts = [rho * g / norm for g in grads]
            for p, e in zip(params, shifts):
                p.add_(e)
        reference_optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        sam_gradient = [p.grad.clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)
        reference_optimizer.step()

        for actual, expected in zip(received[-1], sam_gradient):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    for actual, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_alpha_one_mixed_gradient_is_second_gradient_bitwise():
    model = make_mlp()
    x, y = make_batch()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    received = capture_received(base)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0)
    closure_grads = []

    def closure():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        closure_grads.append([p.grad.clone() for p in model.parameters()])

    optimizer.step(closure)
    assert len(closure_grads) == 2
    for actual, expected in zip(received[0], closure_grads[1]):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("r, alpha", [(0.0, 0.8), (0.1, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("make_base", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
])
def test_no_gr_equals_plain_optimizer_bitwise(r, alpha, make_base):
    model, plain_model = make_mlp(dropout=0.2), make_mlp(dropout=0.2)
    x, y = make_batch()
    optimizer = GradientRegularizer(make_base(model.parameters()), r=r, alpha=alpha, first_gradient="raw")
    plain = make_base(plain_model.parameters())

    torch.manual_seed(5)
    calls = []
    for _ in range(4):
        optimizer.step(make_closure(model, optimizer, x, y, calls))
    torch.manual_seed(5)
    for _ in range(4):
        plain.step(make_closure(plain_model, plain, x, y))

    assert len(calls) == 4
    for actual, expected in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(actual, expected)


# Warmup strategies inside the optimizer.


def test_zero_warmup_runs_closure_once_per_step():
    model = make_mlp()
    x, y = make_batch()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0, warmup="zero", warmup_steps=3)
    calls_per_step = []
    for _ in range(5):
        calls = []
        optimizer.step(make_closure(model, optimizer, x, y, calls))
        calls_per_step.append(len(calls))
        assert optimizer.last_step.closure_calls == len(calls)
    assert calls_per_step == [1, 1, 1, 2, 2]
    assert [optimizer.gr_values(step) for step in (0, 2, 3)] == [(0.0, 0.0), (0.0, 0.0), (0.1, 1.0)]


def test_r_warmup_stats_follow_schedule():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-3), r=0.2, alpha=0.5, warmup="r", warmup_steps=4)
    seen = []
    for _ in range(6):
        optimizer.step(make_closure(model, optimizer, x, y))
        stats = optimizer.last_step
        seen.append((stats.step, round(stats.r, 12), stats.alpha, stats.gr_applied))
    assert seen == [
        (0, 0.0, 0.5, False),
        (1, 0.05, 0.5, True),
        (2, 0.1, 0.5, True),
        (3, 0.15, 0.5, True),
        (4, 0.2, 0.5, True),
        (5, 0.2, 0.5, True),
    ]


def test_callable_schedule_is_used_and_validated():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(
        torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5, warmup=lambda step: (0.01 * step, 0.5)
    )
    optimizer.step(make_closure(model, optimizer, x, y))
    optimizer.step(make_closure(model, optimizer, x, y))
    assert optimizer.last_step.r == pytest.approx(0.01)

    bad = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5, warmup=lambda step: (0.1, 2.0))
    with pytest.raises(ValueError, match="GR schedule at step 0 returned an invalid alpha"):
        bad.step(make_closure(model, bad, x, y))


# Per-step statistics.


def test_step_stats_match_hand_computation():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.7, max_grad_norm=0.5)
    grads, losses = [], []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        losses.append(float(loss.detach()))
        return loss

    optimizer.step(closure)
    stats = optimizer.last_step
    g1, g2 = grads
    mixed = 0.3 * g1 + 0.7 * g2
    assert stats.loss == pytest.approx(losses[0])
    assert stats.perturbed_loss == pytest.approx(losses[1])
    assert stats.perturbed_loss > stats.loss
    assert stats.grad_norm_first == pytest.approx(float(g1.norm()), rel=1e-6)
    assert stats.grad_norm_second == pytest.approx(float(g2.norm()), rel=1e-6)
    assert stats.cosine == pytest.approx(float(g1 @ g2 / (g1.norm() * g2.norm())), rel=1e-6)
    assert stats.grad_norm_before_clip == pytest.approx(float(mixed.norm()), rel=1e-6)
    assert stats.grad_norm_after_clip == pytest.approx(min(0.5, float(mixed.norm())), rel=1e-6)
    assert stats.lam == pytest.approx(0.07)
    assert stats.gr_step
    assert stats.gr_applied
    assert not stats.skipped
    assert set(stats.as_dict()) >= {"r", "alpha", "lam", "gr_applied", "cosine", "perturbed_loss"}


def test_clipping_scales_to_max_norm():
    model = make_mlp()
    x, y = make_batch()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    received = capture_received(base)
    optimizer = GradientRegularizer(base, r=0.1, alpha=0.5, max_grad_norm=1e-3)
    optimizer.step(make_closure(model, optimizer, x, y))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in received[0]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-9)


# Randomness and normalisation layers.


def test_dropout_masks_identical_across_passes(device):
    model = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 3)).double().to(device)
    x, y = (tensor.to(device) for tensor in make_batch())
    masks = []
    model[1].register_forward_hook(lambda module, inputs, output: masks.append((output == 0) & (inputs[0] != 0)))
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0)

    torch.manual_seed(3)
    optimizer.step(make_closure(model, optimizer, x, y))
    optimizer.step(make_closure(model, optimizer, x, y))

    assert len(masks) == 4
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[0], masks[2])
    assert 0.3 < masks[0].double().mean() < 0.7


def test_random_stream_continues_as_after_one_pass():
    model = make_mlp(dropout=0.3)
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0)
    torch.manual_seed(11)
    optimizer.step(make_closure(model, optimizer, x, y))
    after_gr = torch.rand(4)

    torch.manual_seed(11)
    model(x)  # one forward pass draws the same dropout mask as the first GR pass
    after_one_pass = torch.rand(4)
    assert torch.equal(after_gr, after_one_pass)


@pytest.mark.parametrize("pass_model", [True, False])
def test_batchnorm_statistics_change_once(pass_model):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    x, y = make_batch()
    optimizer = GradientRegularizer(
        torch.optim.SGD(model.parameters(), lr=0.1), r=0.5, alpha=1.0, model=model if pass_model else None
    )
    optimizer.step(make_closure(model, optimizer, x, y))
    assert optimizer.last_step.gr_applied

    reference(x)  # one training-mode forward pass at theta
    batchnorm, expected = model[1], reference[1]
    assert int(batchnorm.num_batches_tracked) == 1
    assert torch.equal(batchnorm.running_mean, expected.running_mean)
    assert torch.equal(batchnorm.running_var, expected.running_var)


# Guards.


def test_zero_gradient_gives_no_nan():
    weight = nn.Parameter(torch.ones(3))
    for first_gradient in ("raw", "normalized"):
        base = torch.optim.AdamW([weight], lr=1e-2)
        optimizer = GradientRegularizer(base, r=0.1, alpha=0.5, first_gradient=first_gradient)

        def closure():
            optimizer.zero_grad()
            loss = (weight * 0.0).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        assert torch.isfinite(weight).all()
        assert not optimizer.last_step.gr_applied
        assert not optimizer.last_step.skipped
        assert optimizer.last_step.grad_norm_before_clip == 0.0


@pytest.mark.parametrize("bad_value", [math.inf, math.nan])
def test_non_finite_gradient_skips_update(bad_value, caplog):
    model = make_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0, max_grad_norm=5.0)
    x, y = make_batch()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * bad_value
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_step.skipped
    assert optimizer.step_count == 0
    assert len(base.state) == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert "Skipped update" in caplog.text


def test_non_finite_second_pass_skips_and_restores():
    weight = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = GradientRegularizer(torch.optim.SGD([weight], lr=0.1), r=10.0, alpha=0.5)
    calls = []

    def closure():
        optimizer.zero_grad()
        # Finite at theta, infinite gradient far from it.
        scale = math.inf if calls else 1.0
        calls.append(1)
        loss = (weight**2).sum() * scale
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_step.skipped
    assert torch.equal(weight.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_step_without_closure_raises():
    optimizer = GradientRegularizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1), r=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step()


def test_closure_without_backward_raises():
    model = make_mlp()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0)
    x, y = make_batch()
    with pytest.raises(RuntimeError, match="no gradients"):
        optimizer.step(lambda: nn.functional.cross_entropy(model(x), y))


def test_unused_parameters_are_left_alone():
    model = make_mlp()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    base = torch.optim.SGD([{"params": model.parameters()}, {"params": [unused]}], lr=0.1)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0)
    x, y = make_batch()
    optimizer.step(make_closure(model, optimizer, x, y))
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(r=-1.0), "r"),
        (dict(r=float("nan")), "r"),
        (dict(alpha=1.1), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(warmup="cosine"), "warmup"),
        (dict(warmup="r", warmup_steps=-5), "warmup_steps"),
        (dict(warmup="r", warmup_steps=1.5), "warmup_steps"),
        (dict(first_gradient="unit"), "first_gradient"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(max_grad_norm=math.inf), "max_grad_norm"),
        (dict(gr_probability=0.0), "gr_probability"),
        (dict(gr_probability=1.5), "gr_probability"),
        (dict(model="net"), "model"),
        (dict(restore="none"), "restore"),
    ],
)
def test_invalid_argument_raises(kwargs, argument):
    arguments = dict(r=0.1, alpha=0.5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=f"Invalid {argument}:"):
        GradientRegularizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1), **arguments)


def test_invalid_optimizer_raises():
    with pytest.raises(ValueError, match="Invalid optimizer: list is not a torch.optim.Optimizer"):
        GradientRegularizer([], r=0.1, alpha=0.5)
    inner = GradientRegularizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1), r=0.1, alpha=0.5)
    with pytest.raises(ValueError, match="already a GradientRegularizer"):
        GradientRegularizer(inner, r=0.1, alpha=0.5)


# torch.optim conventions.


def test_param_groups_and_state_are_shared():
    model = make_mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0)
    assert optimizer.param_groups is base.param_groups
    assert optimizer.defaults is base.defaults
    x, y = make_batch()
    optimizer.step(make_closure(model, optimizer, x, y))
    assert optimizer.state is base.state
    assert "exp_avg_sq" in optimizer.state[next(model.parameters())]

    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer.add_param_group({"params": [extra], "lr": 0.5})
    assert base.param_groups[-1]["params"] == [extra]
    assert base.param_groups[-1]["lr"] == 0.5


@pytest.mark.parametrize("attach_to", ["wrapper", "base"])
def test_lr_scheduler_attached_to_either_object(attach_to):
    model = make_mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1.0)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer if attach_to == "wrapper" else base, lambda t: 1.0 / (t + 1))
    x, y = make_batch()
    learning_rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            learning_rates.append(base.param_groups[0]["lr"])
            optimizer.step(make_closure(model, optimizer, x, y))
            scheduler.step()
    assert learning_rates == pytest.approx([1.0, 0.5, 1.0 / 3.0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


def test_step_hooks_run_on_wrapper():
    model = make_mlp()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0)
    events = []
    optimizer.register_step_pre_hook(lambda *args: events.append("pre"))
    optimizer.register_step_post_hook(lambda *args: events.append("post"))
    x, y = make_batch()
    optimizer.step(make_closure(model, optimizer, x, y))
    assert events == ["pre", "post"]


def train(model, optimizer, scheduler, steps, x, y):
    for _ in range(steps):
        optimizer.step(make_closure(model, optimizer, x, y))
        scheduler.step()


def build_run(seed=0):
    model = make_mlp(dropout=0.2)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    optimizer = GradientRegularizer(
        base, r=0.05, alpha=0.8, warmup="lambda", warmup_steps=4, gr_probability=0.5, max_grad_norm=1.0, seed=seed
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 3))
    return model, optimizer, scheduler


def test_resume_equals_uninterrupted_run():
    x, y = make_batch()

    torch.manual_seed(7)
    model, optimizer, scheduler = build_run()
    train(model, optimizer, scheduler, 10, x, y)
    applied = optimizer.step_count

    torch.manual_seed(7)
    first_model, first_optimizer, first_scheduler = build_run()
    train(first_model, first_optimizer, first_scheduler, 4, x, y)
    checkpoint = copy.deepcopy(
        {
            "model": first_model.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "scheduler": first_scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    del first_model, first_optimizer, first_scheduler

    resumed_model, resumed_optimizer, resumed_scheduler = build_run(seed=123)  # the seed comes from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    assert resumed_optimizer.step_count == 4
    assert resumed_optimizer.param_groups is resumed_optimizer.base_optimizer.param_groups
    train(resumed_model, resumed_optimizer, resumed_scheduler, 6, x, y)

    assert resumed_optimizer.step_count == applied
    for actual, expected in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(actual, expected)


def test_hybrid_training_mixes_plain_and_gr_steps():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.01), r=0.05, alpha=1.0, gr_probability=0.5, seed=0)
    kinds = []
    for _ in range(40):
        optimizer.step(make_closure(model, optimizer, x, y))
        kinds.append(optimizer.last_step.gr_step)
    assert 8 < sum(kinds) < 32

    again_model = make_mlp()
    again = GradientRegularizer(torch.optim.SGD(again_model.parameters(), lr=0.01), r=0.05, alpha=1.0, gr_probability=0.5, seed=0)
    repeated = []
    for _ in range(40):
        again.step(make_closure(again_model, again, x, y))
        repeated.append(again.last_step.gr_step)
    assert repeated == kinds


def test_state_dict_round_trip_contents():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-3), r=0.1, alpha=1.0, warmup="r", warmup_steps=10)
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))
    state = optimizer.state_dict()
    assert state["gradient_regularizer"]["step_count"] == 3
    assert state["gradient_regularizer"]["warmup"] == "r"
    assert state["base_optimizer"]["state"][0]["step"] == 3

    fresh = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-3), r=0.1, alpha=1.0, warmup="r", warmup_steps=10)
    fresh.load_state_dict(state)
    assert fresh.step_count == 3
    assert fresh.gr_values() == pytest.approx((0.03, 1.0))
    torch.testing.assert_close(
        fresh.state[next(model.parameters())]["exp_avg_sq"], optimizer.state[next(model.parameters())]["exp_avg_sq"]
    )

    with pytest.raises(ValueError, match="Invalid state_dict for GradientRegularizer"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


# Two-call API.


def test_two_call_micro_batches_equal_full_batch():
    """Two passes of 4 micro-batches of 2 give the same step as one closure step on 8 examples."""
    x, y = make_batch(size=8)
    closure_model, split_model = make_mlp(), make_mlp()
    closure_optimizer = GradientRegularizer(torch.optim.AdamW(closure_model.parameters(), lr=1e-2), r=0.1, alpha=0.7, max_grad_norm=1.0)
    split_optimizer = GradientRegularizer(torch.optim.AdamW(split_model.parameters(), lr=1e-2), r=0.1, alpha=0.7, max_grad_norm=1.0)

    for _ in range(3):
        closure_optimizer.step(make_closure(closure_model, closure_optimizer, x, y))

        split_optimizer.zero_grad()
        for chunk in range(4):
            rows = slice(2 * chunk, 2 * chunk + 2)
            (nn.functional.cross_entropy(split_model(x[rows]), y[rows]) / 4).backward()
        assert split_optimizer.first_step()
        for chunk in range(4):
            rows = slice(2 * chunk, 2 * chunk + 2)
            (nn.functional.cross_entropy(split_model(x[rows]), y[rows]) / 4).backward()
        split_optimizer.second_step()

        assert split_optimizer.last_step.gr_applied
        assert split_optimizer.last_step.cosine == pytest.approx(closure_optimizer.last_step.cosine, rel=1e-9)
    for actual, expected in zip(split_model.parameters(), closure_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_two_call_plain_step_needs_no_second_pass():
    model, plain_model = make_mlp(), make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0, warmup="zero", warmup_steps=2)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1)

    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert optimizer.first_step() is False
    optimizer.second_step(loss=1.5)
    plain.zero_grad()
    nn.functional.cross_entropy(plain_model(x), y).backward()
    plain.step()

    assert optimizer.last_step.loss == 1.5
    assert not optimizer.last_step.gr_applied
    for actual, expected in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(actual, expected)


def test_two_call_misuse_raises():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0)
    with pytest.raises(RuntimeError, match="call first_step"):
        optimizer.second_step()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match="pending"):
        optimizer.step(make_closure(model, optimizer, x, y))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.second_step()
    assert optimizer.step_count == 1

    exact = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0, mode="exact")
    with pytest.raises(ValueError, match="mode='finite_difference' only"):
        exact.first_step()


@pytest.mark.parametrize("seed", ["a", -1, 1.5, True])
def test_invalid_seed_raises(seed):
    with pytest.raises(ValueError, match="Invalid seed"):
        GradientRegularizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1), r=0.1, alpha=0.5, seed=seed)


def test_schedule_returning_non_pair_raises():
    model = make_mlp()
    x, y = make_batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5, warmup=lambda step: "x")
    with pytest.raises(ValueError, match="returned 'x'. A schedule returns a pair"):
        optimizer.step(make_closure(model, optimizer, x, y))
