"""Exact GR by double back-propagation, per-group settings and decoupled GR."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradreg import GradientRegularizer


def tanh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=generator, dtype=torch.float64), torch.randint(0, 2, (8,), generator=generator)


def received_gradient(model, optimizer, x, y, exact: bool):
    """Run one step and return the flat gradient the wrapped optimizer received."""
    received = []
    optimizer.base_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: received.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    )

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if not exact:
            loss.backward()
        return loss

    optimizer.step(closure)
    return received[0]


def quadratic_problem():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=generator, dtype=torch.float64)
    theta = torch.randn(5, generator=generator, dtype=torch.float64)
    return a, b, theta


@pytest.mark.parametrize("penalty", ["norm", "squared_norm"])
def test_exact_on_quadratic_matches_formula_and_finite_difference(penalty):
    a, b, start = quadratic_problem()
    r, alpha = 0.3, 0.7
    gradients = {}
    for mode in ("exact", "finite_difference"):
        if mode == "finite_difference" and penalty == "squared_norm":
            continue
        theta = nn.Parameter(start.clone())
        base = torch.optim.SGD([theta], lr=0.1)
        seen = []
        base.register_step_pre_hook(lambda opt, args, kwargs: seen.append(theta.grad.clone()))
        optimizer = GradientRegularizer(base, r=r, alpha=alpha, mode=mode, penalty=penalty)

        def closure():
            optimizer.zero_grad()
            loss = 0.5 * theta @ a @ theta + b @ theta
            if mode == "finite_difference":
                loss.backward()
            return loss

        optimizer.step(closure)
        gradients[mode] = seen[0]
        assert optimizer.last_step.closure_calls == (1 if mode == "exact" else 2)

    g = a @ start + b
    hessian_term = a @ g / g.norm() if penalty == "norm" else a @ g
    expected = g + alpha * r * hessian_term
    torch.testing.assert_close(gradients["exact"], expected, rtol=1e-12, atol=1e-12)
    if penalty == "norm":
        torch.testing.assert_close(gradients["finite_difference"], gradients["exact"], rtol=1e-12, atol=1e-12)


def test_finite_difference_error_is_linear_in_r():
    """(g2 - g1) / r estimates H g/||g|| with an error proportional to r.

    The mixed gradient g1 + alpha (g2 - g1) then differs from the exact gradient by
    alpha r times that error, which is proportional to r squared.
    """
    x, y = batch()
    radii = [1e-1, 3e-2, 1e-2, 3e-3]
    errors = []
    for r in radii:
        model = tanh_net()
        exact_model = copy.deepcopy(model)
        fd = received_gradient(model, GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.0), r=r, alpha=1.0), x, y, False)
        exact_optimizer = GradientRegularizer(torch.optim.SGD(exact_model.parameters(), lr=0.0), r=r, alpha=1.0, mode="exact")
        exact = received_gradient(exact_model, exact_optimizer, x, y, True)
        errors.append(float((fd - exact).norm()))

    hessian_vector_errors = [error / r for error, r in zip(errors, radii)]  # alpha = 1
    slope = np.polyfit(np.log(radii), np.log(hessian_vector_errors), 1)[0]
    assert 0.9 < slope < 1.1, (slope, hessian_vector_errors)
    gradient_slope = np.polyfit(np.log(radii), np.log(errors), 1)[0]
    assert 1.9 < gradient_slope < 2.1, (gradient_slope, errors)
    assert hessian_vector_errors[-1] < hessian_vector_errors[0] / 10


def test_exact_matches_torch_func_hessian_vector_product():
    model = tanh_net()
    x, y = batch()
    r, alpha = 0.2, 0.5
    names = [name for name, _ in model.named_parameters()]
    values = tuple(p.detach().clone() for p in model.parameters())

    def loss_of(*params):
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)

    gradient = torch.func.grad(loss_of, argnums=tuple(range(len(values))))
    g = gradient(*values)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    direction = tuple(t / norm for t in g)
    _, hessian_direction = torch.func.jvp(gradient, values, direction)
    expected = torch.cat([(gi + alpha * r * hi).reshape(-1) for gi, hi in zip(g, hessian_direction)])

    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.0), r=r, alpha=alpha, mode="exact")
    actual = received_gradient(model, optimizer, x, y, True)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_exact_closure_contract_errors():
    model = tanh_net()
    x, y = batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0, mode="exact")

    def with_backward():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="without calling backward"):
        optimizer.step(with_backward)
    with pytest.raises(ValueError, match="returned float"):
        optimizer.step(lambda: 1.0)


def test_exact_zero_warmup_is_plain_step():
    model, plain_model = tanh_net(), tanh_net()
    x, y = batch()
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0, mode="exact",
                                    warmup="zero", warmup_steps=5)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    optimizer.step(lambda: nn.functional.cross_entropy(model(x), y))
    plain.zero_grad()
    nn.functional.cross_entropy(plain_model(x), y).backward()
    plain.step()
    assert not optimizer.last_step.gr_applied
    for actual, expected in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-15)


# Per-group settings.


def test_excluded_group_stays_unperturbed():
    model = tanh_net()
    x, y = batch()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    base = torch.optim.SGD([{"params": weights}, {"params": biases, "gr_perturb": False}], lr=0.0)
    optimizer = GradientRegularizer(base, r=0.5, alpha=1.0)
    reference = copy.deepcopy(model)

    seen_parameters = []

    def closure():
        optimizer.zero_grad()
        seen_parameters.append([p.detach().clone() for p in (*weights, *biases)])
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    before, perturbed = seen_parameters
    for b, p in zip(before[2:], perturbed[2:]):
        assert torch.equal(b, p)  # biases stay put in the second pass

    # Hand computation: move the weights along g1 normalised over the weights only.
    nn.functional.cross_entropy(reference(x), y).backward()
    reference_weights = [reference[0].weight, reference[2].weight]
    norm = torch.sqrt(sum((w.grad**2).sum() for w in reference_weights))
    for b, p, w in zip(before[:2], perturbed[:2], reference_weights):
        torch.testing.assert_close(p, b + 0.5 * w.grad / norm, rtol=1e-12, atol=1e-14)


def test_group_alpha_and_r_follow_warmup():
    model = tanh_net()
    x, y = batch()
    base = torch.optim.SGD([{"params": model[0].parameters(), "gr_alpha": 0.5, "gr_r": 0.2},
                            {"params": model[2].parameters()}], lr=0.0)
    optimizer = GradientRegularizer(base, r=0.1, alpha=1.0, warmup="r", warmup_steps=4)
    assert optimizer._group_settings(*optimizer.gr_values(2)) == [(pytest.approx(0.1), 0.5, True), (0.05, 1.0, True)]

    grads = []

    def closure():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])

    received = []
    base.register_step_pre_hook(lambda opt, args, kwargs: received.append([p.grad.clone() for p in model.parameters()]))
    optimizer.step_count = 4
    optimizer.step(closure)
    g1, g2 = grads
    for index, (first, second, actual) in enumerate(zip(g1, g2, received[0])):
        alpha = 0.5 if index < 2 else 1.0
        torch.testing.assert_close(actual, (1 - alpha) * first + alpha * second, rtol=1e-12, atol=1e-14)


def test_invalid_group_keys_raise():
    model = tanh_net()
    with pytest.raises(ValueError, match="Unknown parameter-group key 'gr_rho'"):
        GradientRegularizer(torch.optim.SGD([{"params": model.parameters(), "gr_rho": 0.1}], lr=0.1), r=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="Invalid alpha: 2.*parameter group"):
        GradientRegularizer(torch.optim.SGD([{"params": model.parameters(), "gr_alpha": 2.0}], lr=0.1), r=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="Invalid gr_perturb"):
        GradientRegularizer(torch.optim.SGD([{"params": model.parameters(), "gr_perturb": "no"}], lr=0.1), r=0.1, alpha=1.0)
    optimizer = GradientRegularizer(torch.optim.SGD(model[0].parameters(), lr=0.1), r=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="Unknown parameter-group key 'gr_radius'"):
        optimizer.add_param_group({"params": model[2].parameters(), "gr_radius": 1.0})


# Decoupled GR.


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_decoupled_matches_hand_computation(mode):
    model = tanh_net()
    reference = copy.deepcopy(model)
    x, y = batch()
    lr, r, alpha = 0.01, 0.1, 0.8
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    received = []
    base.register_step_pre_hook(lambda opt, args, kwargs: received.append([p.grad.clone() for p in model.parameters()]))
    optimizer = GradientRegularizer(base, r=r, alpha=alpha, decoupled=True, mode=mode)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if mode == "finite_difference":
            loss.backward()
        return loss

    optimizer.step(closure)

    # By hand: AdamW receives the clean g1; the GR term alpha * (g2 - g1) is applied with the learning rate.
    params = list(reference.parameters())
    loss = nn.functional.cross_entropy(reference(x), y)
    g1 = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(r * g / norm)
    g2 = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), params)
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.sub_(r * g / norm)
    for actual, expected in zip(received[0], g1):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)

    reference_adamw = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for p, g in zip(params, g1):
        p.grad = g.clone()
    if mode == "finite_difference":
        terms = [alpha * (second - first) for first, second in zip(g1, g2)]
    else:
        # Exact mode: alpha * r * H g1 / ||g1|| by double back-propagation at theta.
        graph = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), params, create_graph=True)
        products = torch.autograd.grad(graph, params, grad_outputs=[g / norm for g in g1])
        terms = [alpha * r * product for product in products]
    reference_adamw.step()
    with torch.no_grad():
        for p, term in zip(params, terms):
            p.sub_(lr * term)
    for actual, expected in zip(model.parameters(), params):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="second_order"), "Invalid mode: 'second_order'"),
        (dict(penalty="l1"), "Invalid penalty: 'l1'"),
        (dict(penalty="squared_norm"), "needs mode='exact'"),
        (dict(decoupled=1), "Invalid decoupled: 1"),
        (dict(decoupled=True, first_gradient="normalized"), "Invalid first_gradient: 'normalized'"),
        (dict(mode="exact", first_gradient="normalized"), "Invalid first_gradient: 'normalized'"),
    ],
)
def test_invalid_mode_combinations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GradientRegularizer(torch.optim.SGD(tanh_net().parameters(), lr=0.1), r=0.1, alpha=1.0, **kwargs)


def test_exact_step_cost_is_one_closure_call():
    model = tanh_net()
    x, y = batch()
    calls = []
    optimizer = GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=1.0, mode="exact")

    def closure():
        calls.append(1)
        return nn.functional.cross_entropy(model(x), y)

    optimizer.step(closure)
    assert calls == [1]
    assert optimizer.last_step.gr_applied
    assert math.isnan(optimizer.last_step.perturbed_loss)
