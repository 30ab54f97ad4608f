"""GR in a Hugging Face ``Trainer`` subclass.

The Trainer runs ``training_step`` (forward and backward) and then calls
``optimizer.step()`` without a closure. ``GRTrainer`` wraps the optimizer that the
Trainer builds in a GradientRegularizer, and its ``training_step`` adds the second
pass. After the Trainer's backward pass at theta, ``first_step()`` perturbs the weights
and a second forward and backward pass computes g2. The Trainer's own
``optimizer.step()`` then restores theta, mixes, clips and updates.

Set ``max_grad_norm=0`` in the TrainingArguments and pass ``max_grad_norm`` to the
regularizer instead, because the Trainer would otherwise clip g2 alone, before the mix.

NOTE: gradient accumulation (``gradient_accumulation_steps > 1``) is rejected here,
because the Trainer calls ``training_step`` once per micro-batch. Use
``first_step``/``second_step`` in your own loop for that.

Needs the ``huggingface`` extra: ``pip install "gradreg[huggingface]"``. Run it as a
script for a short demonstration on random data:

    python examples/huggingface_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from gradreg import GradientRegularizer


class GRTrainer(Trainer):
    """A Trainer whose optimizer steps are GR steps (``gr_kwargs`` go to GradientRegularizer)."""

    def __init__(self, *args, gr_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"Invalid gradient_accumulation_steps: {self.args.gradient_accumulation_steps}. "
                "GRTrainer needs 1; use GradientRegularizer.first_step/second_step for accumulation."
            )
        self.gr_kwargs = dict(r=0.05, alpha=1.0) if gr_kwargs is None else dict(gr_kwargs)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(optimizer, GradientRegularizer):
            self.optimizer = GradientRegularizer(optimizer, model=self.model, **self.gr_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # backward pass at theta
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if optimizer.first_step():
            # Second pass at the perturbed point; optimizer.step() finishes the GR step.
            with self.compute_loss_context_manager():
                perturbed = self.compute_loss(model, inputs)
            self.accelerator.backward(perturbed)
        return loss


class TinyClassifier(nn.Module):
    """A model with the Hugging Face calling convention: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 4))

    def forward(self, features, labels=None):
        logits = self.net(features)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class RandomDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 256):
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(size, 20, generator=generator)
        self.labels = torch.randint(0, 4, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"features": self.features[index], "labels": self.labels[index]}


def main(output_dir: str | None = None, max_steps: int = 16) -> GRTrainer:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=max_steps, per_device_train_batch_size=32, learning_rate=1e-3,
            lr_scheduler_type="linear", warmup_steps=4, logging_steps=4, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True,
            # The Trainer would clip g2 before the mix; the regularizer clips the mixed gradient instead.
            max_grad_norm=0.0,
        )
        trainer = GRTrainer(model=TinyClassifier(), args=args, train_dataset=RandomDataset(),
                            gr_kwargs=dict(r=0.05, alpha=1.0, warmup="zero", warmup_steps=8, max_grad_norm=5.0))
        trainer.train()
    stats = trainer.optimizer.optimizer.last_step if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.last_step
    print(f"steps={trainer.state.global_step} ||g1||={stats.grad_norm_first:.4f} gr_applied={stats.gr_applied}")
    return trainer


if __name__ == "__main__":
    main()
