"""Measure what GRDiagnostics adds to a GR step, in one process.

The per-step part (the shadow average of clean squared gradients and the per-step
record) is measured by alternating GR steps with and without it on the same model and
batch. The periodic part (optimizer statistics) is timed on its own and amortised over
``--stats-every`` steps. The script prints the median times and the total overhead as a
fraction of a GR step.

    python benchmarks/diagnostics_overhead.py --model vit_ti --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradreg import GradientRegularizer
from gradreg.diagnostics import GRDiagnostics
from gradreg.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_ti", help="model preset or timm name (default: vit_ti)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each kind (default: 20)")
    parser.add_argument("--stats-every", type=int, default=100, help="statistics interval (default: 100)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-4), r=0.05, alpha=1.0,
                                    max_grad_norm=5.0, model=model)
    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=args.stats_every)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    hooks = optimizer._first_gradient_hooks
    shadow_hook = dict(hooks)

    def timed(with_diagnostics: bool) -> float:
        # Detach the shadow hook for the steps measured without diagnostics.
        hooks.clear()
        if with_diagnostics:
            hooks.update(shadow_hook)
        synchronize()
        started = time.perf_counter()
        optimizer.step(closure)
        if with_diagnostics:
            diagnostics.after_step()
        synchronize()
        return time.perf_counter() - started

    diagnostics.stats_every = 0  # statistics are timed separately below
    for _ in range(2):
        timed(True)
    without, with_step_part = [], []
    for _ in range(args.steps):
        without.append(timed(False))
        with_step_part.append(timed(True))

    statistics_times = []
    for _ in range(5):
        synchronize()
        started = time.perf_counter()
        diagnostics.optimizer_statistics()
        synchronize()
        statistics_times.append(time.perf_counter() - started)

    step = statistics.median(without)
    per_step = statistics.median(with_step_part) - step
    periodic = statistics.median(statistics_times) / args.stats_every
    print(f"model={args.model} batch={args.batch_size} device={device} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"GR step without diagnostics: median {step * 1e3:.1f} ms")
    print(f"per-step diagnostics: {per_step * 1e3:+.2f} ms ({100 * per_step / step:+.2f}% of a GR step)")
    print(f"optimizer statistics: {statistics.median(statistics_times) * 1e3:.1f} ms per call, "
          f"{periodic * 1e3:.2f} ms per step at stats_every={args.stats_every} ({100 * periodic / step:.2f}%)")
    print(f"total overhead: {100 * (per_step + periodic) / step:+.2f}% of a GR step")


if __name__ == "__main__":
    main()
