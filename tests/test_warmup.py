"""GR warmup schedules: values at the start, the midpoint, the end and after warmup."""

from __future__ import annotations

import math

import pytest

from gradreg.warmup import build_gr_schedule, warmup_factor

R, ALPHA, W = 0.1, 0.8, 10


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("none", {0: (R, ALPHA), 5: (R, ALPHA), 10: (R, ALPHA), 25: (R, ALPHA)}),
        ("r", {0: (0.0, ALPHA), 5: (R / 2, ALPHA), 10: (R, ALPHA), 25: (R, ALPHA)}),
        ("lambda", {0: (R, 0.0), 5: (R, ALPHA / 2), 10: (R, ALPHA), 25: (R, ALPHA)}),
        ("zero", {0: (0.0, 0.0), 5: (0.0, 0.0), 9: (0.0, 0.0), 10: (R, ALPHA), 25: (R, ALPHA)}),
    ],
)
def test_schedule_values(strategy, expected):
    schedule = build_gr_schedule(strategy, r=R, alpha=ALPHA, warmup_steps=W)
    for step, (r_t, alpha_t) in expected.items():
        actual_r, actual_alpha = schedule(step)
        assert actual_r == pytest.approx(r_t, abs=1e-15), f"{strategy} r at step {step}"
        assert actual_alpha == pytest.approx(alpha_t, abs=1e-15), f"{strategy} alpha at step {step}"


@pytest.mark.parametrize("strategy", ["r", "lambda"])
def test_lambda_ramps_linearly(strategy):
    schedule = build_gr_schedule(strategy, r=R, alpha=ALPHA, warmup_steps=W)
    lambdas = [math.prod(schedule(step)) for step in range(W + 1)]
    for step, value in enumerate(lambdas):
        assert value == pytest.approx(R * ALPHA * step / W, abs=1e-15)


def test_zero_warmup_steps_means_no_warmup():
    for strategy in ("r", "lambda", "zero"):
        schedule = build_gr_schedule(strategy, r=R, alpha=ALPHA, warmup_steps=0)
        assert schedule(0) == (R, ALPHA)


def test_warmup_factor_values():
    assert warmup_factor(0, 4) == 0.0
    assert warmup_factor(1, 4) == 0.25
    assert warmup_factor(4, 4) == 1.0
    assert warmup_factor(100, 4) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_callable_schedule_returned_unchanged():
    def schedule(step):
        return 0.05, 0.5

    assert build_gr_schedule(schedule, r=R, alpha=ALPHA, warmup_steps=W) is schedule


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(warmup="linear"), "warmup"),
        (dict(warmup=None), "warmup"),
        (dict(r=-0.1), "r"),
        (dict(r=float("nan")), "r"),
        (dict(r=float("inf")), "r"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.5), "alpha"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=2.5), "warmup_steps"),
    ],
)
def test_invalid_arguments_raise(kwargs, argument):
    arguments = dict(warmup="r", r=R, alpha=ALPHA, warmup_steps=W)
    arguments.update(kwargs)
    warmup = arguments.pop("warmup")
    with pytest.raises(ValueError, match=f"Invalid {argument}:"):
        build_gr_schedule(warmup, **arguments)
