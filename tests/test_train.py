"""``gradreg train`` end to end on real CIFAR-10 subsets: files, learning, resumption."""

from __future__ import annotations

import json

import pytest
import torch

from gradreg import checkpoint as checkpoint_module
from gradreg import train as train_module
from gradreg.checkpoint import read_metrics
from gradreg.cli import main
from gradreg.config import TrainConfig

pytestmark = pytest.mark.slow

EPOCH_KEYS = {"epoch", "train_loss", "train_error", "test_loss", "test_error", "lr", "r", "alpha", "seconds"}
STEP_KEYS = {"step", "lr", "r", "alpha", "lam", "gr_applied", "grad_norm_first", "grad_norm_second", "cosine",
             "grad_norm_before_clip", "grad_norm_after_clip", "loss", "perturbed_loss"}


def small_config(cifar10_dir, out, **overrides) -> TrainConfig:
    values = dict(
        model="vit_micro",
        data_dir=str(cifar10_dir) if cifar10_dir is not None else None,
        train_subset=400,
        test_subset=200,
        epochs=2,
        batch_size=50,
        warmup_epochs=1,
        lr=2e-3,
        weight_decay=0.05,
        r=0.05,
        alpha=1.0,
        gr_warmup="r",
        log_every=2,
        out=str(out),
        seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_cli_trains_below_chance(cifar10_dir, tmp_path, capsys):
    """A short zero-warmup run on 4,000 real images must beat chance (90% error) clearly."""
    out = tmp_path / "run"
    exit_code = main([
        "train", "--model", "vit_micro", "--data-dir", str(cifar10_dir),
        "--train-subset", "4000", "--test-subset", "1000", "--epochs", "3", "--batch-size", "64",
        "--warmup-epochs", "1", "--lr", "2e-3", "--weight-decay", "0.05",
        "--r", "0.05", "--alpha", "1.0", "--gr-warmup", "zero", "--log-every", "10", "--out", str(out),
    ])
    assert exit_code == 0
    assert "final_test_error=" in capsys.readouterr().out

    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "train.log"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["gr_warmup"] == "zero"
    assert config["train_subset"] == 4000

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert summary["epochs_completed"] == 3
    assert summary["final_test_error"] < 0.8
    assert summary["best_test_error"] <= summary["final_test_error"]

    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert EPOCH_KEYS <= set(epochs[0])
    assert epochs[-1]["test_error"] == summary["final_test_error"]
    assert epochs[0]["test_error"] > epochs[-1]["test_error"]
    # Zero-warmup: no GR in the first epoch, GR in every step after it.
    steps_per_epoch = 4000 // 64
    assert epochs[0]["gr_steps"] == 0
    assert epochs[1]["gr_steps"] == steps_per_epoch
    assert epochs[1]["r"] == 0.05
    assert STEP_KEYS <= set(steps[0])
    assert [s["step"] for s in steps][:3] == [0, 10, 20]
    assert all(not s["gr_applied"] for s in steps if s["step"] < steps_per_epoch)
    assert all(s["gr_applied"] for s in steps if s["step"] >= steps_per_epoch)


def test_resume_matches_uninterrupted_run(cifar10_dir, tmp_path, interrupt_evaluation):
    full = train_module.train(small_config(cifar10_dir, tmp_path / "full"))

    # Interrupt the second run during its second epoch's evaluation.
    restore = interrupt_evaluation(on_call=2)
    interrupted_out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train_module.train(small_config(cifar10_dir, interrupted_out))
    restore()

    summary_after_crash = json.loads((interrupted_out / "summary.json").read_text())
    assert summary_after_crash["epochs_completed"] == 1
    assert summary_after_crash["finished"] is False

    with pytest.raises(FileExistsError, match="--resume"):
        train_module.train(small_config(cifar10_dir, interrupted_out))
    resumed = train_module.train(small_config(cifar10_dir, interrupted_out, resume=True))

    assert resumed["final_test_error"] == full["final_test_error"]
    assert resumed["final_test_loss"] == full["final_test_loss"]
    assert resumed["final_train_loss"] == full["final_train_loss"]
    full_state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    resumed_state = torch.load(interrupted_out / "checkpoint.pt", weights_only=False)["model"]
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key

    full_records = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    resumed_records = [r for r in read_metrics(interrupted_out / "metrics.jsonl")]
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(resumed_records) == strip(full_records)

    # A finished run resumed again does nothing and returns its summary.
    again = train_module.train(small_config(cifar10_dir, interrupted_out, resume=True))
    assert again["final_test_error"] == full["final_test_error"]


def test_resume_with_other_settings_raises(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    train_module.train(small_config(cifar10_dir, out, epochs=1, warmup_epochs=0, train_subset=100, test_subset=50))
    with pytest.raises(ValueError, match=r"settings differ .*r: 0.05 -> 0.2"):
        train_module.train(small_config(cifar10_dir, out, epochs=1, warmup_epochs=0, train_subset=100, test_subset=50, r=0.2, resume=True))


def test_checkpoint_write_failure_keeps_previous(cifar10_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = small_config(cifar10_dir, out, train_subset=100, test_subset=50, batch_size=50)
    train_module.train(config)
    before = (out / "checkpoint.pt").read_bytes()

    def broken_save(state, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.save_checkpoint({"epoch": 99}, out / "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("strategy", ["none", "lambda"])
def test_other_strategies_and_optimizers_run(cifar10_dir, tmp_path, strategy):
    optimizer = {"none": "sgd", "lambda": "rmsprop"}[strategy]
    config = small_config(
        cifar10_dir, tmp_path / strategy, gr_warmup=strategy, optimizer=optimizer, lr=1e-3,
        first_gradient="normalized", alpha=0.8, train_subset=100, test_subset=50, lr_schedule="multiplicative",
    )
    summary = train_module.train(config)
    assert summary["finished"]
    records = [r for r in read_metrics(tmp_path / strategy / "metrics.jsonl") if r["kind"] == "step"]
    if strategy == "lambda":
        assert records[0]["alpha"] == 0.0
        assert records[-1]["alpha"] == pytest.approx(0.8)
    else:
        assert all(r["alpha"] == 0.8 for r in records)


@pytest.mark.parametrize("overrides", [dict(gr_mode="exact"), dict(decoupled=True)])
def test_exact_and_decoupled_modes_train(cifar10_dir, tmp_path, overrides):
    out = tmp_path / "run"
    config = small_config(cifar10_dir, out, train_subset=100, test_subset=50, gr_warmup="none", **overrides)
    summary = train_module.train(config)
    assert summary["finished"]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert all(s["gr_applied"] for s in steps)
    expected_calls = 1 if overrides.get("gr_mode") == "exact" else 2
    assert all(s["closure_calls"] == expected_calls for s in steps)


def test_torchrun_two_processes(cifar10_dir, tmp_path):
    """gradreg train under torchrun with 2 CPU processes on gloo: rank 0 writes, both ranks agree."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        "--master_port=29517", "-m", "gradreg.cli", "train", "--model", "vit_micro", "--data-dir", str(cifar10_dir),
        "--train-subset", "200", "--test-subset", "100", "--epochs", "2", "--warmup-epochs", "1",
        "--batch-size", "50", "--gr-warmup", "zero", "--perturbation", "global", "--log-every", "1",
        "--out", str(out),
    ]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert summary["world_size"] == 2
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[1]["gr_steps"] == 200 // 50
    # One metrics line per step, so only rank 0 wrote.
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))


def test_dataset_and_data_mismatch_raises(cifar10_dir, tmp_path):
    config = small_config(cifar10_dir, tmp_path / "run", dataset="cifar100", train_subset=None, test_subset=None)
    with pytest.raises(ValueError, match="labels in .* span 10 classes, not 100"):
        train_module.train(config)


def test_batch_larger_than_subset_raises(cifar10_dir, tmp_path):
    config = small_config(cifar10_dir, tmp_path / "run", train_subset=100, batch_size=128)
    with pytest.raises(ValueError, match="Invalid batch_size: 128 is more than the 100 training images"):
        train_module.train(config)


def test_corrupt_checkpoint_raises_clear_error(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="Invalid checkpoint .* cannot be read"):
        train_module.train(small_config(cifar10_dir, out, resume=True))


def test_resume_reuses_data_dir(cifar10_dir, tmp_path, monkeypatch, interrupt_evaluation):
    out = tmp_path / "run"
    config = small_config(cifar10_dir, out, epochs=2, train_subset=100, test_subset=50)
    restore = interrupt_evaluation(on_call=2)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config)
    restore()
    monkeypatch.delenv("GRADREG_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no cache folder to fall back on
    summary = train_module.train(small_config(None, out, epochs=2, train_subset=100, test_subset=50, resume=True))
    assert summary["finished"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(cifar10_dir, tmp_path, interrupt_evaluation, precision):
    settings = dict(precision=precision, train_subset=100, test_subset=50, gr_warmup="none")
    full = train_module.train(small_config(cifar10_dir, tmp_path / "full", **settings))
    assert full["finished"]
    assert full["precision"] == precision
    assert full["final_train_loss"] < 2.5  # ln 10 = 2.30 at the start; a broken scaler gives NaN or inf

    restore = interrupt_evaluation(on_call=2)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(small_config(cifar10_dir, tmp_path / "resumed", **settings))
    restore()
    assert "Interrupted. Every finished epoch is saved" in (tmp_path / "resumed" / "train.log").read_text()
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    if precision == "fp16":
        assert checkpoint["grad_scaler"]["scale"] > 0
    else:
        assert checkpoint["grad_scaler"] is None
    resumed = train_module.train(small_config(cifar10_dir, tmp_path / "resumed", resume=True, **settings))
    assert resumed["final_test_loss"] == full["final_test_loss"]


def test_compile_runs_forward_through_torch_compile(cifar10_dir, tmp_path, monkeypatch):
    real_compile = torch.compile
    compiled_modules, graphs = [], []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def compile_with_counting_backend(module, **options):
        compiled_modules.append(module)
        return real_compile(module, backend=counting_backend)

    monkeypatch.setattr(torch, "compile", compile_with_counting_backend)
    summary = train_module.train(small_config(cifar10_dir, tmp_path / "run", compile=True, train_subset=200, test_subset=100))
    assert summary["finished"]
    assert len(compiled_modules) == 1
    # 8 steps, most with two passes: the graph is compiled once, not once per pass or step.
    assert 1 <= len(graphs) <= 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(precision="fp8"), "Invalid precision: 'fp8'"),
        (dict(precision="fp16", gr_mode="exact"), "Invalid precision: 'fp16' needs gr_mode 'finite_difference'"),
        (dict(compile="yes"), "Invalid compile: 'yes'"),
        (dict(compile=True, gr_mode="exact"), "Invalid compile: true with gr_mode 'exact'"),
    ],
)
def test_invalid_precision_or_compile_raises(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(None, tmp_path / "run", **overrides).validate()
