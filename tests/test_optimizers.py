import pytest
import torch

from gradreg.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS, build_optimizer


def make_params():
    return [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.zeros(3))]


def test_optimizer_names():
    assert OPTIMIZERS == ("adamw", "adam", "rmsprop", "sgd")
    assert DEFAULT_OPTIMIZER == "adamw"


def test_adamw_hyperparameters():
    optimizer = build_optimizer(
        "adamw", make_params(), lr=3e-4, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6
    )
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.AdamW
    assert group["lr"] == 3e-4
    assert group["weight_decay"] == 0.05
    assert group["betas"] == (0.8, 0.95)
    assert group["eps"] == 1e-6
    assert group["decoupled_weight_decay"] is True
    assert group["foreach"] is None


def test_adam_hyperparameters():
    optimizer = build_optimizer(
        "adam", make_params(), lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.98), eps=1e-7
    )
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.Adam
    assert group["lr"] == 1e-3
    assert group["weight_decay"] == 1e-4
    assert group["betas"] == (0.9, 0.98)
    assert group["eps"] == 1e-7
    assert group["decoupled_weight_decay"] is False
    assert group["foreach"] is None


def test_rmsprop_hyperparameters():
    optimizer = build_optimizer(
        "rmsprop", make_params(), lr=1e-2, weight_decay=1e-5, eps=1e-5, momentum=0.5, rmsprop_decay=0.9
    )
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.RMSprop
    assert group["lr"] == 1e-2
    assert group["weight_decay"] == 1e-5
    assert group["eps"] == 1e-5
    assert group["momentum"] == 0.5
    assert group["alpha"] == 0.9
    assert group["foreach"] is None


def test_sgd_hyperparameters():
    optimizer = build_optimizer(
        "sgd", make_params(), lr=0.1, weight_decay=5e-4, momentum=0.8, nesterov=True
    )
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.SGD
    assert group["lr"] == 0.1
    assert group["weight_decay"] == 5e-4
    assert group["momentum"] == 0.8
    assert group["nesterov"] is True
    assert group["foreach"] is None


def test_sgd_defaults():
    group = build_optimizer("sgd", make_params(), lr=0.1).param_groups[0]
    assert group["momentum"] == 0.9
    assert group["nesterov"] is False
    assert group["weight_decay"] == 0.0


def test_parameter_groups_accepted():
    first, second = make_params()
    optimizer = build_optimizer(
        "adamw", [{"params": [first]}, {"params": [second], "weight_decay": 0.0}], lr=1e-3, weight_decay=0.1
    )
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_changes_parameters(name):
    params = make_params()
    optimizer = build_optimizer(name, params, lr=0.1)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p, old in zip(params, before):
        assert not torch.equal(p.detach(), old)


def test_nesterov_requires_momentum():
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer("sgd", make_params(), lr=0.1, momentum=0.0, nesterov=True)


def test_nesterov_only_for_sgd():
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer("adamw", make_params(), lr=0.1, nesterov=True)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="lamb") as info:
        build_optimizer("lamb", make_params(), lr=0.1)
    for name in OPTIMIZERS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": 0.1, "eps": 0.0}, "eps"),
        ({"lr": 0.1, "eps": -1e-8}, "eps"),
        ({"lr": 0.1, "betas": (1.0, 0.999)}, r"betas\[0\]"),
        ({"lr": 0.1, "betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"lr": 0.1, "betas": (0.9,)}, "betas"),
        ({"lr": 0.1, "betas": 0.9}, "betas"),
        ({"lr": 0.1, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": -0.5}, "momentum"),
        ({"lr": 0.1, "rmsprop_decay": 1.0}, "rmsprop_decay"),
        ({"lr": 0.1, "nesterov": 1}, "nesterov"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        build_optimizer("adamw", make_params(), **kwargs)


def test_error_message_states_value_and_range():
    with pytest.raises(ValueError) as info:
        build_optimizer("adam", make_params(), lr=-0.5)
    assert "-0.5" in str(info.value)
    assert "[0.0, inf)" in str(info.value)
