"""Cost of a GR step relative to a plain step, measured in one process.

Round-robin over the step kinds on the same model and batch, so that slow drifts of the
machine affect all kinds alike, and print the median time of each kind and its ratio
to the plain AdamW step:

* ``plain``: forward, backward, AdamW step;
* ``gr``: GradientRegularizer step (two forward and two backward passes), alpha = 1;
* ``gr_mixed``: the same with alpha = 0.5, which keeps g1 for the mixing;
* ``gr_off``: GradientRegularizer in zero-warmup, a plain single-pass step through the wrapper;
* ``exact``: mode="exact" (one forward, a double backward);
* ``peer_sam``: the SAM optimizer of the ``pytorch_optimizer`` package with AdamW as base,
  when that package is installed.

The floor for ``gr`` is 2.0: two forward and two backward passes. It also prints the
peak tensor memory of one step of each kind, in units of the parameters' size, and its
excess over the plain step: measured by :class:`gradreg.memory.TensorMemoryTracker` on
any device and, on CUDA, by the caching allocator too. AdamW's multi-tensor step has
temporaries of its own, which can hide the GR step's buffers. ``--no-foreach`` uses
the per-tensor AdamW in every kind, so that they show.

    python benchmarks/step_cost.py --model vit_ti --batch-size 128 --repeats 5
    python benchmarks/step_cost.py --model mlp --batch-size 128 --repeats 50 --no-foreach
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from gradreg import GradientRegularizer
from gradreg.memory import TensorMemoryTracker
from gradreg.models import create_model


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
    return create_model(name, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_ti", help="'mlp', a preset such as vit_ti, or a timm name (default: vit_ti)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps of each kind (default: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-foreach", action="store_true", help="use the per-tensor AdamW (foreach=False) in every kind")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    kinds: Dict[str, Callable[[], None]] = {}
    models: Dict[str, nn.Module] = {}

    def make(kind: str) -> nn.Module:
        torch.manual_seed(0)
        model = build_model(args.model).to(device)
        models[kind] = model
        return model

    plain_model = make("plain")
    adamw_options = dict(lr=1e-4, foreach=False) if args.no_foreach else dict(lr=1e-4)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), **adamw_options)

    def plain_step() -> None:
        plain_optimizer.zero_grad()
        nn.functional.cross_entropy(plain_model(images), labels).backward()
        plain_optimizer.step()

    kinds["plain"] = plain_step

    def wrapper_step(kind: str, alpha: float = 1.0, **options) -> Callable[[], None]:
        model = make(kind)
        optimizer = GradientRegularizer(torch.optim.AdamW(model.parameters(), **adamw_options), r=0.05, alpha=alpha, model=model, **options)
        exact = options.get("mode") == "exact"

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            if not exact:
                loss.backward()
            return loss

        return lambda: optimizer.step(closure)

    kinds["gr"] = wrapper_step("gr")
    kinds["gr_mixed"] = wrapper_step("gr_mixed", alpha=0.5)
    kinds["gr_off"] = wrapper_step("gr_off", warmup="zero", warmup_steps=10**9)
    kinds["exact"] = wrapper_step("exact", mode="exact")

    try:
        from pytorch_optimizer import SAM
    except ImportError:
        print("pytorch_optimizer is not installed: skipping the peer SAM step (pip install pytorch_optimizer)")
    else:
        sam_model = make("peer_sam")
        sam = SAM(sam_model.parameters(), torch.optim.AdamW, rho=0.05, **adamw_options)

        def sam_step() -> None:
            sam.zero_grad()
            nn.functional.cross_entropy(sam_model(images), labels).backward()
            sam.first_step(zero_grad=True)
            nn.functional.cross_entropy(sam_model(images), labels).backward()
            sam.second_step(zero_grad=True)

        kinds["peer_sam"] = sam_step

    parameter_bytes = sum(p.numel() * p.element_size() for p in plain_model.parameters())
    times: Dict[str, List[float]] = {kind: [] for kind in kinds}
    tracked_peaks: Dict[str, int] = {}
    allocator_peaks: Dict[str, int] = {}
    for kind, run in kinds.items():  # warm up every kind, then measure its peak memory
        for _ in range(2):
            run()
        for p in models[kind].parameters():  # the step starts without gradients, as after zero_grad()
            p.grad = None
        synchronize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            run()
            synchronize()
            allocator_peaks[kind] = torch.cuda.max_memory_allocated(device) - baseline
            for p in models[kind].parameters():
                p.grad = None
        with TensorMemoryTracker(device=device.type) as tracker:
            run()
        tracked_peaks[kind] = tracker.peak_bytes

    for _ in range(args.repeats):
        for kind, run in kinds.items():
            synchronize()
            started = time.perf_counter()
            run()
            synchronize()
            times[kind].append(time.perf_counter() - started)

    plain = statistics.median(times["plain"])
    print(
        f"model={args.model} ({parameter_bytes / 2**20:.1f} MiB of parameters) batch={args.batch_size} "
        f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} "
        f"adamw={'per-tensor' if args.no_foreach else 'default'} torch={torch.__version__}"
    )
    print(
        f"{'kind':<10} {'median ms':>10} {'ratio':>7} {'peak memory (x params)':>23} {'excess':>7} "
        f"{'CUDA allocator excess':>22}"
    )
    for kind in kinds:
        median = statistics.median(times[kind])
        peak = tracked_peaks[kind] / parameter_bytes
        excess = (tracked_peaks[kind] - tracked_peaks["plain"]) / parameter_bytes
        allocator = (
            f"{(allocator_peaks[kind] - allocator_peaks['plain']) / parameter_bytes:+.2f}" if allocator_peaks else "n/a"
        )
        print(f"{kind:<10} {median * 1e3:>10.1f} {median / plain:>7.3f} {peak:>23.2f} {excess:>+7.2f} {allocator:>22}")

if __name__ == "__main__":
    main()
