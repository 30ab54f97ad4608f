import math

import pytest
import torch

from gradreg.schedules import (
    DEFAULT_LR_SCHEDULE,
    LR_SCHEDULES,
    build_lr_scheduler,
    constant_factor,
    multiplicative_warmup_cosine_factor,
    warmup_cosine_factor,
)

BASE_LR = 1e-2
WARMUP = 10
TOTAL = 20
# Learning rates of updates t = 0..11 for base 1e-2, W = 10, T = 20.
GOLDEN_LRS = [0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.00975528]


def make_adamw(lr=BASE_LR):
    param = torch.nn.Parameter(torch.ones(3))
    return param, torch.optim.AdamW([param], lr=lr)


def test_schedule_names():
    assert LR_SCHEDULES == ("warmup_cosine", "multiplicative", "constant")
    assert DEFAULT_LR_SCHEDULE == "warmup_cosine"


def test_warmup_cosine_golden_values():
    lrs = [BASE_LR * warmup_cosine_factor(t, total_steps=TOTAL, warmup_steps=WARMUP) for t in range(12)]
    assert lrs == pytest.approx(GOLDEN_LRS, abs=1e-7)


def test_warmup_cosine_first_update_is_zero():
    assert warmup_cosine_factor(0, total_steps=100, warmup_steps=5) == 0.0


def test_warmup_cosine_end_and_after():
    assert warmup_cosine_factor(TOTAL - 1, total_steps=TOTAL, warmup_steps=WARMUP) > 0.0
    assert warmup_cosine_factor(TOTAL, total_steps=TOTAL, warmup_steps=WARMUP) == 0.0
    assert warmup_cosine_factor(TOTAL + 7, total_steps=TOTAL, warmup_steps=WARMUP) == 0.0


def test_warmup_cosine_without_warmup_is_cosine():
    for t in range(TOTAL):
        expected = 0.5 * (1.0 + math.cos(math.pi * t / TOTAL))
        assert warmup_cosine_factor(t, total_steps=TOTAL, warmup_steps=0) == pytest.approx(expected)
    assert warmup_cosine_factor(0, total_steps=TOTAL, warmup_steps=0) == 1.0


def test_warmup_cosine_warmup_equals_total():
    factors = [warmup_cosine_factor(t, total_steps=4, warmup_steps=4) for t in range(6)]
    assert factors == [0.0, 0.25, 0.5, 0.75, 0.0, 0.0]


def test_warmup_cosine_midpoint():
    # Halfway through the cosine phase the factor is 1/2.
    assert warmup_cosine_factor(15, total_steps=TOTAL, warmup_steps=WARMUP) == pytest.approx(0.5)


def test_multiplicative_peak_at_warmup_end():
    steps_per_epoch = 195
    total = 300 * steps_per_epoch
    warmup = 40 * steps_per_epoch
    factors = [multiplicative_warmup_cosine_factor(t, total_steps=total, warmup_steps=warmup) for t in range(total + 1)]
    peak_step = max(range(len(factors)), key=factors.__getitem__)
    assert peak_step == warmup
    assert factors[peak_step] == pytest.approx(0.957, abs=5e-4)
    assert factors[0] == 0.0
    assert factors[total] == 0.0


def test_multiplicative_formula():
    for t in (0, 3, 10, 17, 19):
        expected = 0.5 * (1.0 + math.cos(math.pi * t / TOTAL)) * min(1.0, t / WARMUP)
        factor = multiplicative_warmup_cosine_factor(t, total_steps=TOTAL, warmup_steps=WARMUP)
        assert factor == pytest.approx(expected)


def test_multiplicative_without_warmup():
    assert multiplicative_warmup_cosine_factor(0, total_steps=TOTAL, warmup_steps=0) == 1.0
    assert multiplicative_warmup_cosine_factor(TOTAL + 3, total_steps=TOTAL, warmup_steps=0) == 0.0


def test_constant_factor():
    for t in (0, 5, TOTAL, TOTAL + 5):
        assert constant_factor(t, total_steps=TOTAL, warmup_steps=WARMUP) == 1.0


def test_scheduler_with_adamw_golden_lrs():
    param, optimizer = make_adamw()
    scheduler = build_lr_scheduler(optimizer, "warmup_cosine", total_steps=TOTAL, warmup_steps=WARMUP)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(GOLDEN_LRS, abs=1e-7)


def test_scheduler_first_update_moves_nothing():
    param, optimizer = make_adamw()
    optimizer.param_groups[0]["weight_decay"] = 0.0
    build_lr_scheduler(optimizer, total_steps=TOTAL, warmup_steps=WARMUP)
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert torch.equal(param.detach(), before)


@pytest.mark.parametrize(
    ("name", "factor"),
    [("multiplicative", multiplicative_warmup_cosine_factor), ("constant", constant_factor)],
)
def test_scheduler_other_names(name, factor):
    param, optimizer = make_adamw()
    scheduler = build_lr_scheduler(optimizer, name, total_steps=TOTAL, warmup_steps=WARMUP)
    for t in range(TOTAL + 2):
        expected = BASE_LR * factor(t, total_steps=TOTAL, warmup_steps=WARMUP)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_dict_round_trip():
    param, optimizer = make_adamw()
    scheduler = build_lr_scheduler(optimizer, total_steps=TOTAL, warmup_steps=WARMUP)
    for _ in range(13):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()

    # Build both objects first, then load the states. Building the scheduler
    # after loading the optimizer state would reset the learning rate to f(0).
    resumed_param, resumed_optimizer = make_adamw()
    resumed = build_lr_scheduler(resumed_optimizer, total_steps=TOTAL, warmup_steps=WARMUP)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 13
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    for _ in range(3):
        for p, opt, sched in ((param, optimizer, scheduler), (resumed_param, resumed_optimizer, resumed)):
            p.grad = torch.ones_like(p)
            opt.step()
            sched.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        ({"total_steps": 10.0, "warmup_steps": 1}, "total_steps"),
        ({"total_steps": 10, "warmup_steps": True}, "warmup_steps"),
    ],
)
def test_build_lr_scheduler_invalid_steps(kwargs, argument):
    _, optimizer = make_adamw()
    with pytest.raises(ValueError, match=argument):
        build_lr_scheduler(optimizer, **kwargs)


def test_build_lr_scheduler_unknown_name():
    _, optimizer = make_adamw()
    with pytest.raises(ValueError, match="cosine_restarts") as info:
        build_lr_scheduler(optimizer, "cosine_restarts", total_steps=10, warmup_steps=0)
    for name in LR_SCHEDULES:
        assert name in str(info.value)


@pytest.mark.parametrize("factor", [warmup_cosine_factor, multiplicative_warmup_cosine_factor, constant_factor])
def test_factor_negative_step(factor):
    with pytest.raises(ValueError, match="step"):
        factor(-1, total_steps=10, warmup_steps=2)


@pytest.mark.parametrize("factor", [warmup_cosine_factor, multiplicative_warmup_cosine_factor, constant_factor])
def test_factor_warmup_above_total(factor):
    with pytest.raises(ValueError, match="warmup_steps"):
        factor(0, total_steps=10, warmup_steps=11)
