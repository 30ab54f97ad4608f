"""Does the data pipeline keep up with training? Measured in one process on real CIFAR-10.

It times ``BatchLoader`` over the training images for a few epochs, with shuffling,
crop and flip, and normalisation, as ``gradreg train`` uses it. Then it times plain
AdamW steps and GR steps of a model on batches from that loader. It prints images per
second of each and their ratio: the loader keeps up while its rate is well above the
training rate.

    python benchmarks/loader_throughput.py --data-dir ../shared/data/cifar10
    python benchmarks/loader_throughput.py --model vit_ti --epochs 1 --steps 3

The data folder comes from ``--data-dir``, else from ``GRADREG_DATA_DIR``, else from
gradreg's cache folder (see ``gradreg.data.resolve_data_dir``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradreg import GradientRegularizer
from gradreg.data import BatchLoader, load_cifar
from gradreg.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with train.npz (default: GRADREG_DATA_DIR)")
    parser.add_argument("--model", default="vit_micro", help="model preset or timm name (default: vit_micro)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs to time (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="training steps of each kind to time (default: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.epochs < 1 or args.steps < 1:
        parser.error(f"--epochs and --steps must be >= 1, got {args.epochs} and {args.steps}")

    device = torch.device(args.device)
    dataset = load_cifar("cifar10", args.data_dir, split="train")
    loader = BatchLoader(dataset, args.batch_size, shuffle=True, augment=True, drop_last=True, seed=0, device=device)

    loader_rates = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        images_seen = 0
        for images, _ in loader:
            images_seen += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        loader_rates.append(images_seen / (time.perf_counter() - started))

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4)
    regularized = GradientRegularizer(torch.optim.AdamW(model.parameters(), lr=1e-4), r=0.05, alpha=1.0, model=model)
    batches = iter(loader)

    def train_rate(optimizer, use_closure: bool) -> float:
        durations = []
        for step in range(args.steps + 1):  # the first step warms up
            started = time.perf_counter()
            images, labels = next(batches)

            def closure():
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                return loss

            if use_closure:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:
                durations.append(time.perf_counter() - started)
        return args.batch_size / statistics.median(durations)

    plain_rate = train_rate(plain, use_closure=False)
    gr_rate = train_rate(regularized, use_closure=True)
    loader_rate = statistics.median(loader_rates)

    print(
        f"{len(dataset)} images, batch {args.batch_size}, device={device}, threads={torch.get_num_threads()}, "
        f"torch={torch.__version__}"
    )
    epochs = f"{args.epochs} epoch" if args.epochs == 1 else f"median of {args.epochs} epochs"
    print(f"loader: {loader_rate:,.0f} images/s ({epochs}; range {min(loader_rates):,.0f} to {max(loader_rates):,.0f})")
    print(f"{args.model} plain AdamW step: {plain_rate:,.0f} images/s; loader / training = {loader_rate / plain_rate:,.1f}")
    print(f"{args.model} GR step: {gr_rate:,.0f} images/s; loader / training = {loader_rate / gr_rate:,.1f}")


if __name__ == "__main__":
    main()
