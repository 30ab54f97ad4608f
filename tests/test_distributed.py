"""GR under DistributedDataParallel: two CPU processes on the gloo backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradreg import GradientRegularizer

STEPS = 3
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def global_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,), generator=generator)


def make_optimizer(model, module, perturbation):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return GradientRegularizer(base, r=0.1, alpha=0.7, max_grad_norm=1.0, model=module, perturbation=perturbation)


def train(module, optimizer, x, y):
    first_norms = []
    for _ in range(STEPS):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        first_norms.append(optimizer.last_step.grad_norm_first)
    return first_norms


def _worker(rank: int, world_size: int, init_file: str, perturbation: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = make_model()
        module = nn.parallel.DistributedDataParallel(model)
        x, y = global_batch()
        rows = slice(4 * rank, 4 * rank + 4)
        first_norms = train(module, make_optimizer(model, module, perturbation), x[rows], y[rows])
        torch.save({"params": [p.detach() for p in model.parameters()], "first_norms": first_norms},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, perturbation):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), perturbation, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.slow
def test_global_perturbation_equals_single_process(tmp_path):
    ranks = run_ranks(tmp_path, "global")

    model = make_model()
    x, y = global_batch()
    single_norms = train(model, make_optimizer(model, model, "global"), x, y)
    for rank in ranks:
        for actual, expected in zip(rank["params"], model.parameters()):
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-12, atol=1e-14)
        assert rank["first_norms"] == pytest.approx(single_norms, rel=1e-12)


@pytest.mark.slow
def test_local_perturbation_differs_but_parameters_agree(tmp_path):
    ranks = run_ranks(tmp_path, "local")
    for first, second in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(first, second)
    # Each rank perturbs along its own gradient, whose norm differs from the other rank's.
    assert ranks[0]["first_norms"][0] != pytest.approx(ranks[1]["first_norms"][0], rel=1e-6)

    model = make_model()
    x, y = global_batch()
    train(model, make_optimizer(model, model, "global"), x, y)
    difference = max(float((a - b.detach()).abs().max()) for a, b in zip(ranks[0]["params"], model.parameters()))
    assert difference > 1e-8  # local and global perturbation are different methods


def test_invalid_perturbation_raises():
    with pytest.raises(ValueError, match="Invalid perturbation: 'ring'"):
        GradientRegularizer(torch.optim.SGD(make_model().parameters(), lr=0.1), r=0.1, alpha=1.0, perturbation="ring")


def _rng_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from gradreg.train import DistributedContext, _rng_state, restore_rng_state

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        context = DistributedContext()
        context.world_size, context.rank = world_size, rank
        torch.manual_seed(1000 * rank)
        checkpoint = {"rng_by_rank": context.gather(_rng_state())}
        uninterrupted = torch.rand(4)
        torch.manual_seed(12345)  # a resumed process starts from another state
        restore_rng_state(checkpoint, context)
        resumed = torch.rand(4)
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "states": len(checkpoint["rng_by_rank"])},
                   os.path.join(out_dir, f"rng{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_resume_restores_every_ranks_random_state(tmp_path):
    mp.spawn(_rng_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rng{rank}.pt") for rank in range(2)]
    assert [r["states"] for r in ranks] == [2, 2]
    for r in ranks:
        assert torch.equal(r["resumed"], r["uninterrupted"])
    assert not torch.equal(ranks[0]["uninterrupted"], ranks[1]["uninterrupted"])


def test_resume_with_another_process_count_warns(caplog):
    from gradreg.train import DistributedContext, _rng_state, restore_rng_state

    context = DistributedContext()
    context.world_size, context.rank = 3, 1
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    checkpoint = {"rng": _rng_state(), "rng_by_rank": [_rng_state(), _rng_state()]}
    torch.manual_seed(99)
    with caplog.at_level("WARNING", logger="gradreg.train"):
        restore_rng_state(checkpoint, context)
    assert "random state of 2 process(es) but this run has 3" in caplog.text
    assert not torch.equal(torch.rand(3), expected)  # the fresh seed stays


def test_single_process_checkpoint_without_per_rank_states_restores():
    from gradreg.train import DistributedContext, _rng_state, restore_rng_state

    torch.manual_seed(5)
    checkpoint = {"rng": _rng_state()}
    expected = torch.rand(3)
    torch.manual_seed(6)
    restore_rng_state(checkpoint, DistributedContext())
    assert torch.equal(torch.rand(3), expected)


def test_subtraction_restore_with_local_perturbation_raises(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = make_model()
        module = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="Invalid restore: 'subtract' with perturbation='local'"):
            GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5, model=module,
                                restore="subtract")
        GradientRegularizer(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5, model=module,
                            restore="subtract", perturbation="global")
    finally:
        dist.destroy_process_group()
