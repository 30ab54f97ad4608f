"""GR in PyTorch Lightning with manual optimization.

The LightningModule turns automatic optimization off and passes a closure to
``optimizer.step``. The GradientRegularizer calls that closure twice, at theta and at
the perturbed point. Lightning counts
one optimizer step per call, so ``max_steps`` and LR schedulers behave as usual.

Needs the ``lightning`` extra: ``pip install "gradreg[lightning]"``. Run it as a script
for a short demonstration on random data:

    python examples/lightning_manual_optimization.py
"""

from __future__ import annotations

import lightning
import torch
from torch import nn

from gradreg import GradientRegularizer


class GRClassifier(lightning.LightningModule):
    """A classifier trained with AdamW + GR and zero-warmup for ``warmup_steps`` steps."""

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, r: float = 0.05, alpha: float = 1.0, warmup_steps: int = 10):
        super().__init__()
        self.model = model
        self.lr, self.r, self.alpha, self.warmup_steps = lr, r, alpha, warmup_steps
        self.automatic_optimization = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def configure_optimizers(self):
        base = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        return GradientRegularizer(
            base, r=self.r, alpha=self.alpha, warmup="zero", warmup_steps=self.warmup_steps,
            max_grad_norm=5.0, model=self.model,
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        optimizer = self.optimizers()

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self(images), labels)
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure=closure)
        stats = optimizer.optimizer.last_step
        self.log_dict({"train_loss": stats.loss, "gr_applied": float(stats.gr_applied), "grad_norm": stats.grad_norm_after_clip})
        return loss


def main() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(256, 20), torch.randint(0, 4, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=32, shuffle=True)
    module = GRClassifier(nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 4)), warmup_steps=8)
    trainer = lightning.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    stats = trainer.optimizers[0].last_step
    print(f"steps={trainer.global_step} last loss={stats.loss:.4f} gr_applied={stats.gr_applied}")


if __name__ == "__main__":
    main()
