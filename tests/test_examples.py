"""The Lightning and Hugging Face examples train a few GR steps (skipped without their extras)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_lightning_example_trains():
    pytest.importorskip("lightning")
    import lightning
    import torch
    from torch import nn

    example = load_example("lightning_manual_optimization")
    torch.manual_seed(0)
    images, labels = torch.randn(64, 20), torch.randint(0, 4, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    module = example.GRClassifier(nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)), warmup_steps=3)
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)

    optimizer = trainer.optimizers[0]
    assert trainer.global_step == 6
    assert optimizer.step_count == 6
    assert optimizer.last_step.gr_applied
    assert optimizer.last_step.closure_calls == 2


def test_huggingface_example_trains(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load_example("huggingface_trainer")
    trainer = example.main(output_dir=str(tmp_path), max_steps=10)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert trainer.state.global_step == 10
    assert optimizer.step_count == 10
    assert optimizer.last_step.gr_applied  # zero-warmup ended after 8 steps
    assert optimizer.last_step.closure_calls == 2


def test_huggingface_example_rejects_accumulation(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    example = load_example("huggingface_trainer")
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="Invalid gradient_accumulation_steps: 2"):
        example.GRTrainer(model=example.TinyClassifier(), args=args, train_dataset=example.RandomDataset())
