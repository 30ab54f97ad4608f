"""The training loop behind ``gradreg train``: a ViT on CIFAR with any GR variant.

One call of :func:`train` runs one configuration into one output folder:

* ``config.json``: the resolved :class:`~gradreg.config.TrainConfig`;
* ``metrics.jsonl``: a ``"kind": "epoch"`` record per epoch and a ``"kind": "step"``
  record every ``log_every`` optimizer steps with the regularizer's per-step values;
* ``summary.json``: final and best test error (fractions), rewritten after each epoch
  with ``"finished"`` set at the end;
* ``checkpoint.pt``: everything needed to continue, written atomically after each
  epoch. With ``resume=True`` an interrupted run continues from it and ends with the
  same numbers as an uninterrupted run on the same device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import __version__
from .checkpoint import MetricsLog, load_checkpoint, read_metrics, save_checkpoint, truncate_metrics, write_json
from .config import TrainConfig
from .diagnostics import GRDiagnostics
from .regularizer import GradientRegularizer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"

# Settings that may differ between an interrupted run and its resumption.
_RESUME_FREE_SETTINGS = {"resume", "out", "device", "data_dir", "download", "log_every", "tensorboard", "compile"}
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DistributedContext:
    """Rank and world size of a ``torchrun`` launch; one process without it."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.initialized_here = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL on CUDA, gloo on CPU."""
        import torch.distributed as dist

        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.initialized_here = True

    def stop(self) -> None:
        import torch.distributed as dist

        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value: Any) -> List[Any]:
        """Return every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum(self, values: list) -> list:
        """Sum a list of numbers over the ranks."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()


class _NullLog:
    """Stands in for the metrics log and TensorBoard on ranks other than 0."""

    def write(self, record: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NullLog":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``"auto"`` (CUDA when available, else CPU) or a device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Invalid device: {name!r}. Use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device: {name!r}. gradreg train runs on 'cpu' or 'cuda' devices.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r}. CUDA is not available on this machine, so use --device cpu.")
    return device


def build_data(config: TrainConfig, device: torch.device):
    """Load the train and test splits and return their loaders."""
    from .data import NUM_CLASSES, BatchLoader, class_balanced_subset, load_cifar, resolve_data_dir

    folder, chosen_by_user = resolve_data_dir(config.data_dir, name=config.dataset)
    # Download only into the default cache folder, or when the user asks for it.
    download = config.download or not chosen_by_user
    train_set = load_cifar(config.dataset, folder, split="train", download=download)
    test_set = load_cifar(config.dataset, folder, split="test", download=download)
    if config.train_subset is not None and config.train_subset < len(train_set):
        train_set = class_balanced_subset(train_set, config.train_subset, seed=config.seed)
    classes = int(train_set.labels.max()) + 1
    if classes != NUM_CLASSES[config.dataset]:
        raise ValueError(
            f"Invalid data for dataset {config.dataset}: the labels in {folder} span {classes} classes, "
            f"not {NUM_CLASSES[config.dataset]}. Point --data-dir at the {config.dataset} files or change --dataset."
        )
    if config.test_subset is not None and config.test_subset < len(test_set):
        test_set = class_balanced_subset(test_set, config.test_subset, seed=config.seed)
    if config.batch_size > len(train_set):
        raise ValueError(
            f"Invalid batch_size: {config.batch_size} is more than the {len(train_set)} training images, so an "
            "epoch would have no step. Lower --batch-size or raise --train-subset."
        )
    logger.info("Data: %s from %s, %d train and %d test images", config.dataset, folder, len(train_set), len(test_set))

    train_loader = BatchLoader(
        train_set, config.batch_size, shuffle=True, augment=True, drop_last=True, seed=config.seed, device=device
    )
    test_loader = BatchLoader(
        test_set, config.batch_size, shuffle=False, augment=False, drop_last=False, seed=config.seed, device=device
    )
    return train_loader, test_loader, train_set.num_classes


def build_optimization(config: TrainConfig, model: nn.Module, steps_per_epoch: int, module: Optional[nn.Module] = None):
    """Return the GR-wrapped optimizer and its per-step learning-rate scheduler.

    ``module`` is what the training step calls: the model, or its DistributedDataParallel wrapper.
    """
    from .optimizers import build_optimizer
    from .schedules import build_lr_scheduler

    base = build_optimizer(
        config.optimizer,
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        momentum=config.momentum,
        nesterov=config.nesterov,
        rmsprop_decay=config.rmsprop_decay,
    )
    optimizer = GradientRegularizer(
        base,
        r=config.r,
        alpha=config.alpha,
        warmup=config.gr_warmup,
        warmup_steps=config.effective_gr_warmup_epochs * steps_per_epoch,
        first_gradient=config.first_gradient,
        max_grad_norm=config.max_grad_norm,
        gr_probability=config.gr_probability,
        model=module if module is not None else model,
        seed=config.seed,
        mode=config.gr_mode,
        decoupled=config.decoupled,
        perturbation=config.perturbation,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        config.lr_schedule,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
    )
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast_dtype: Optional[torch.dtype] = None) -> Tuple[float, float]:
    """Return (mean cross-entropy, error rate) of the model over every batch of the loader.

    ``autocast_dtype`` (bfloat16 or float16) runs the forward pass under autocast.
    """
    model.eval()
    total_loss, total_wrong, total = 0.0, 0, 0
    for images, labels in loader:
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images).float()
        total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total_wrong += int((logits.argmax(dim=1) != labels).sum())
        total += labels.numel()
    return total_loss / total, total_wrong / total


def _rng_state() -> Dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(checkpoint: Dict[str, Any], context: "DistributedContext") -> None:
    """Put back this rank's random state from a checkpoint written by :func:`_train_on_device`.

    The checkpoint contains one state per rank (``rng_by_rank``), so a resumed
    multi-process run draws the same dropout masks on every rank as an uninterrupted
    one. A checkpoint from another number of processes cannot give that: each rank then
    keeps its fresh seed, and a warning is logged.
    """
    states = checkpoint.get("rng_by_rank") or [checkpoint["rng"]]
    if len(states) == context.world_size:
        _set_rng_state(states[context.rank])
        return
    logger.warning(
        "The checkpoint contains the random state of %d process(es) but this run has %d, so dropout masks "
        "after the resume differ from those of an uninterrupted run. Resume with %d processes to repeat them.",
        len(states), context.world_size, len(states),
    )


def _check_resumable(config: TrainConfig, saved: Dict[str, Any], path: Path) -> None:
    current = config.to_dict()
    different = sorted(
        key for key in current if key not in _RESUME_FREE_SETTINGS and saved.get(key) != current[key]
    )
    if different:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in different)
        raise ValueError(
            f"Cannot resume from {path}: the settings differ from the interrupted run ({details}). "
            "Resume with the same settings, or start a new run with another --out."
        )


class _EpochAccumulator:
    """Running sums of one training epoch."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.wrong = 0
        self.examples = 0
        self.perturbed_loss_sum = 0.0
        self.gr_steps = 0
        self.skipped_steps = 0
        self.steps = 0
        self.grad_norm_sum = 0.0

    def combine(self, context: "DistributedContext") -> None:
        """Sum the loss and error counts over the ranks; GR counts are the same on every rank."""
        self.loss_sum, self.wrong, self.examples = context.sum([self.loss_sum, self.wrong, self.examples])

    def add(self, loss: float, wrong: int, batch_size: int, stats) -> None:
        self.loss_sum += loss * batch_size
        self.wrong += wrong
        self.examples += batch_size
        self.steps += 1
        if not stats.skipped:
            self.grad_norm_sum += stats.grad_norm_after_clip
        if stats.gr_applied:
            self.gr_steps += 1
            self.perturbed_loss_sum += stats.perturbed_loss
        if stats.skipped:
            self.skipped_steps += 1


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train one configuration into ``config.out`` and return its summary.

    Log messages of the run also go to ``train.log`` in the output folder.
    """
    config.validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Invalid out: {out} is a file. Pass a folder for the run's outputs.")
    out.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(out / "train.log", delay=True)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("gradreg")
    package_logger.addHandler(file_handler)
    # The file gets INFO messages even when the application logs only warnings.
    previous_level = package_logger.level
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    try:
        return _train(config)
    except KeyboardInterrupt:
        logger.error(
            "Interrupted. Every finished epoch is saved in %s; run the same command with --resume "
            "(resume=True in Python) to continue.", out,
        )
        raise
    finally:
        package_logger.setLevel(previous_level)
        package_logger.removeHandler(file_handler)
        file_handler.close()


def _train(config: TrainConfig) -> Dict[str, Any]:
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    checkpoint: Optional[Dict[str, Any]] = None
    if checkpoint_path.exists():
        if not config.resume:
            raise FileExistsError(
                f"{checkpoint_path} already exists. Pass --resume to continue that run, "
                "or choose another --out folder."
            )
        checkpoint = load_checkpoint(checkpoint_path)
        _check_resumable(config, checkpoint["config"], checkpoint_path)
        if config.data_dir is None and checkpoint["config"].get("data_dir"):
            # A resumed run reads the data from where the interrupted one did.
            config = dataclasses.replace(config, data_dir=checkpoint["config"]["data_dir"])
        if checkpoint["epoch"] >= config.epochs and (out / SUMMARY_NAME).exists():
            logger.info("Run in %s has already finished all %d epochs, so there is nothing to train.", out, config.epochs)
            return read_summary(out)
    elif config.resume:
        logger.info("No checkpoint in %s, so the run starts from the beginning.", out)

    out.mkdir(parents=True, exist_ok=True)
    context = DistributedContext()
    device = resolve_device(config.device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if config.batch_size % context.world_size:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size} does not split evenly over {context.world_size} processes. "
            "Use a multiple of the number of processes."
        )
    context.start(device)
    try:
        return _train_on_device(config, checkpoint, context, device)
    finally:
        context.stop()


def _train_on_device(config: TrainConfig, checkpoint: Optional[Dict[str, Any]], context: "DistributedContext",
                     device: torch.device) -> Dict[str, Any]:
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    torch.manual_seed(config.seed)

    from .models import create_model

    train_loader, test_loader, num_classes = build_data(config, device)
    model = create_model(
        config.model,
        num_classes=num_classes,
        drop_rate=config.drop_rate,
        attn_drop_rate=config.attn_drop_rate,
        drop_path_rate=config.drop_path_rate,
    ).to(device)
    # Every arm of a study seed must start from these weights; the checksum shows it.
    init_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    module = model
    if context.world_size > 1:
        module = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # Ranks draw different dropout masks; the weights came from the same seed.
        torch.manual_seed(config.seed + 1000 * context.rank)
    steps_per_epoch = len(train_loader)
    optimizer, scheduler = build_optimization(config, model, steps_per_epoch, module=module)
    diagnostics = GRDiagnostics(optimizer, model=model, stats_every=config.stats_every)
    step_setup = _StepSetup.build(config, module, device)

    start_epoch, best_error, best_epoch, elapsed = 0, math.inf, 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint, context)
        diagnostics.load_state_dict(checkpoint["diagnostics"])
        if step_setup.grad_scaler is not None and checkpoint.get("grad_scaler"):
            step_setup.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        init_checksum = checkpoint["init_checksum"]
        start_epoch = checkpoint["epoch"]
        best_error, best_epoch = checkpoint["best_test_error"], checkpoint["best_epoch"]
        elapsed = checkpoint["wall_seconds"]
        if context.is_main:
            truncate_metrics(out / METRICS_NAME, lambda record: record.get("epoch", 0) <= start_epoch)
        logger.info("Resuming %s after epoch %d of %d", out, start_epoch, config.epochs)
    elif context.is_main:
        (out / METRICS_NAME).unlink(missing_ok=True)
        write_json(out / CONFIG_NAME, config.to_dict())

    logger.info(
        "Training %s (%d parameters) on %s (%s%s) for %d epochs of %d steps: optimizer %s, lr %g, "
        "GR r=%g alpha=%g warmup=%s over %d steps",
        config.model,
        sum(p.numel() for p in model.parameters()),
        device,
        config.precision,
        ", compiled" if config.compile else "",
        config.epochs,
        steps_per_epoch,
        config.optimizer,
        config.lr,
        config.r,
        config.alpha,
        config.gr_warmup,
        optimizer.warmup_steps,
    )

    summary: Dict[str, Any] = read_summary(out) if checkpoint is not None and (out / SUMMARY_NAME).exists() else {}
    writer = _tensorboard_writer(out) if config.tensorboard and context.is_main else None
    test_loss, test_error = math.nan, math.nan
    with MetricsLog(out / METRICS_NAME) if context.is_main else _NullLog() as metrics:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            totals = _train_one_epoch(config, step_setup, optimizer, scheduler, diagnostics, train_loader, epoch, metrics, writer, context)
            totals.combine(context)
            evaluated = epoch % config.eval_every == 0 or epoch == config.epochs
            if evaluated:
                test_loss, test_error = evaluate(model, test_loader, step_setup.autocast_dtype)
            seconds = time.perf_counter() - started
            elapsed += seconds

            if evaluated and test_error < best_error:
                best_error, best_epoch = test_error, epoch
            last = optimizer.last_step
            record = {
                "kind": "epoch",
                "epoch": epoch,
                "step": optimizer.step_count,
                "train_loss": totals.loss_sum / totals.examples,
                "train_error": totals.wrong / totals.examples,
                "train_perturbed_loss": totals.perturbed_loss_sum / totals.gr_steps if totals.gr_steps else None,
                "test_loss": test_loss if evaluated else None,
                "test_error": test_error if evaluated else None,
                "lr": last_lr(optimizer),
                "r": last.r,
                "alpha": last.alpha,
                "grad_norm_mean": totals.grad_norm_sum / max(1, totals.steps - totals.skipped_steps),
                "param_norm": float(_parameter_norm(model)),
                "gr_steps": totals.gr_steps,
                "skipped_steps": totals.skipped_steps,
                "seconds": seconds,
            }
            metrics.write(record)
            if writer is not None:
                for key in ("train_loss", "train_error", "test_loss", "test_error", "grad_norm_mean", "param_norm"):
                    if record[key] is not None:
                        writer.add_scalar(f"epoch/{key}", record[key], epoch)
                writer.flush()
            logger.info(
                "Epoch %d/%d: train loss %.4f error %.4f, test loss %.4f error %.4f%s, r %.4g alpha %.4g, "
                "%d GR steps, %.1f s",
                epoch, config.epochs, record["train_loss"], record["train_error"], test_loss, test_error,
                "" if evaluated else " (from an earlier epoch)", last.r, last.alpha, totals.gr_steps, seconds,
            )

            summary = {
                "tag": config.tag,
                "finished": epoch == config.epochs,
                "epochs_completed": epoch,
                "final_test_error": test_error,
                "final_test_loss": test_loss,
                "final_train_loss": record["train_loss"],
                "final_train_error": record["train_error"],
                "best_test_error": best_error,
                "best_epoch": best_epoch,
                "steps": optimizer.step_count,
                "init_checksum": init_checksum,
                "wall_seconds": elapsed,
                "device": str(device),
                "precision": config.precision,
                "compile": config.compile,
                "world_size": context.world_size,
                "gradreg_version": __version__,
            }
            rng_by_rank = context.gather(_rng_state())
            if not context.is_main:
                continue
            save_checkpoint(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_by_rank[0],
                    "rng_by_rank": rng_by_rank,
                    "diagnostics": diagnostics.state_dict(),
                    "grad_scaler": step_setup.grad_scaler.state_dict() if step_setup.grad_scaler is not None else None,
                    "init_checksum": init_checksum,
                    "best_test_error": best_error,
                    "best_epoch": best_epoch,
                    "wall_seconds": elapsed,
                    "config": config.to_dict(),
                    "gradreg_version": __version__,
                },
                checkpoint_path,
            )
            write_json(out / SUMMARY_NAME, summary)

    if writer is not None:
        writer.close()
    diagnostics.close()
    logger.info("Finished: final test error %.4f, best %.4f at epoch %d; results in %s",
                summary["final_test_error"], best_error, best_epoch, out)
    return summary


def last_lr(optimizer: torch.optim.Optimizer) -> float:
    """Return the learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def _parameter_norm(model: nn.Module) -> float:
    from .functional import global_norm

    return float(global_norm([p.detach() for p in model.parameters()]))


def _tensorboard_writer(out: Path):
    """Return a TensorBoard SummaryWriter for ``out/tensorboard``, or None when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed, so no event files are written: pip install tensorboard")
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _write_step(record: Dict[str, Any], epoch: int, metrics: MetricsLog, writer) -> None:
    """Write a diagnostics record to metrics.jsonl (kinds "step" and "stats") and TensorBoard."""
    stats = record.pop("stats", None)
    step = record["step"]
    metrics.write({"kind": "step", "epoch": epoch, **record})
    if stats is not None:
        metrics.write({"kind": "stats", "epoch": epoch, "step": step, **stats})
    if writer is None:
        return
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and key != "step":
            writer.add_scalar(f"step/{key}", value, step)
    if stats is not None:
        for key, value in stats["global"].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"optimizer/{key}", value, step)


@dataclasses.dataclass
class _StepSetup:
    """Model call of a training step: the forward callable, the autocast type and the fp16 loss scaler."""

    module: nn.Module
    """The model or its DistributedDataParallel wrapper, for train() and eval()."""
    forward: Any
    """``module`` itself, or ``torch.compile(module)``."""
    autocast_dtype: Optional[torch.dtype]
    grad_scaler: Optional[Any]

    @classmethod
    def build(cls, config: TrainConfig, module: nn.Module, device: torch.device) -> "_StepSetup":
        forward = torch.compile(module) if config.compile else module
        grad_scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        return cls(module, forward, _AUTOCAST_DTYPES[config.precision], grad_scaler)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the logits (float32) and the mean cross-entropy of one batch."""
        with torch.autocast(images.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.forward(images).float()
        return logits, nn.functional.cross_entropy(logits, labels)

    def backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()


def _train_one_epoch(config, step_setup: _StepSetup, optimizer, scheduler, diagnostics, loader, epoch, metrics, writer, context) -> _EpochAccumulator:
    from tqdm.auto import tqdm

    step_setup.module.train()
    loader.set_epoch(epoch - 1)
    totals = _EpochAccumulator()
    progress = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None if context.is_main else True,
                    dynamic_ncols=True)
    for images, labels in progress:
        if context.world_size > 1:
            # Every rank draws the same global batch and trains on its own share of it.
            images = images.chunk(context.world_size)[context.rank]
            labels = labels.chunk(context.world_size)[context.rank]
        first_logits = []

        def closure():
            optimizer.zero_grad(set_to_none=True)
            logits, loss = step_setup.loss(images, labels)
            if config.gr_mode != "exact":  # exact mode differentiates the loss itself
                step_setup.backward(loss)
            if not first_logits:
                first_logits.append(logits.detach())
            return loss

        optimizer.step(closure, grad_scaler=step_setup.grad_scaler)
        if step_setup.grad_scaler is not None:
            step_setup.grad_scaler.update()
        record = diagnostics.after_step()
        scheduler.step()

        stats = optimizer.last_step
        wrong = int((first_logits[0].argmax(dim=1) != labels).sum())
        totals.add(stats.loss, wrong, labels.numel(), stats)
        if "stats" in record or (config.log_every and stats.step % config.log_every == 0):
            _write_step(record, epoch, metrics, writer)
        progress.set_postfix(loss=f"{stats.loss:.3f}", gr=int(stats.gr_applied), refresh=False)
    progress.close()
    return totals


def read_summary(out: str | Path) -> Dict[str, Any]:
    """Read ``summary.json`` of a run folder."""
    return json.loads((Path(out) / SUMMARY_NAME).read_text())


def read_run(out: str | Path) -> Dict[str, Any]:
    """Read a run folder: its config, summary and metrics records."""
    out = Path(out)
    return {
        "config": json.loads((out / CONFIG_NAME).read_text()),
        "summary": read_summary(out),
        "metrics": read_metrics(out / METRICS_NAME),
    }


