"""The ``gradreg`` command line.

``gradreg train`` trains one configuration (see :mod:`gradreg.train`). Its settings come
from the defaults of :class:`~gradreg.config.TrainConfig`, then ``--config FILE``, then
the flags given on the command line, which win. ``gradreg study`` runs arms x seeds
(:mod:`gradreg.study`) and ``gradreg report`` rebuilds tables and plots from finished
runs (:mod:`gradreg.report`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .config import (
    DATASETS,
    FIRST_GRADIENT_MODES,
    LR_SCHEDULES,
    OPTIMIZER_NAMES,
    PRECISIONS,
    TrainConfig,
    config_from_mapping,
    load_config_file,
)
from .warmup import WARMUP_STRATEGIES

logger = logging.getLogger("gradreg")

DEFAULTS = TrainConfig()


def _optional_float(text: str) -> Optional[float]:
    """Parse a float; 'none' or 0 turns an optional limit off."""
    if text.lower() in ("none", "off"):
        return None
    value = float(text)
    return None if value == 0 else value


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every training flag; unset flags leave the config file's or default value."""
    S = argparse.SUPPRESS  # an unset flag leaves the config file's or the default value
    d = DEFAULTS

    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings; flags override it")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=S, help=f"dataset (default: {d.dataset})")
    data.add_argument(
        "--data-dir",
        default=S,
        help="folder with train.npz/test.npz or the CIFAR python-version folder (default: $GRADREG_DATA_DIR, "
        "else ~/.cache/gradreg/<dataset>, where a missing dataset is downloaded with torchvision)",
    )
    data.add_argument("--download", action="store_true", default=S, help="download with torchvision into --data-dir when no files are there")
    data.add_argument("--train-subset", type=int, metavar="N", default=S, help="train on a seeded class-balanced subset of N images")
    data.add_argument("--test-subset", type=int, metavar="N", default=S, help="evaluate on a seeded class-balanced subset of N images")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=S, help=f"preset (vit_micro, vit_ti, vit_s, vit_b, vit_l) or any timm model name (default: {d.model})"
    )
    model.add_argument("--drop-rate", type=float, default=S, help="dropout rate (default: the preset's, 0.1)")
    model.add_argument("--attn-drop-rate", type=float, default=S, help="attention dropout rate (default: the preset's, 0.1)")
    model.add_argument("--drop-path-rate", type=float, default=S, help="stochastic depth rate (default: the preset's, 0)")

    optim = parser.add_argument_group("optimizer and learning rate")
    optim.add_argument("--epochs", type=int, default=S, help=f"training epochs (default: {d.epochs})")
    optim.add_argument("--batch-size", type=int, default=S, help=f"images per step (default: {d.batch_size})")
    optim.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=S, help=f"base optimizer (default: {d.optimizer})")
    optim.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default: {d.lr:g})")
    optim.add_argument("--weight-decay", type=float, default=S, help=f"weight decay, decoupled for adamw (default: {d.weight_decay:g})")
    optim.add_argument("--beta1", type=float, default=S, help=f"Adam beta1 (default: {d.beta1:g})")
    optim.add_argument("--beta2", type=float, default=S, help=f"Adam beta2 (default: {d.beta2:g})")
    optim.add_argument("--eps", type=float, default=S, help=f"Adam/RMSprop epsilon (default: {d.eps:g})")
    optim.add_argument("--momentum", type=float, default=S, help=f"SGD/RMSprop momentum (default: {d.momentum:g})")
    optim.add_argument("--nesterov", type=_boolean, metavar="BOOL", default=S, help="SGD Nesterov momentum (default: false)")
    optim.add_argument("--rmsprop-decay", type=float, default=S, help=f"RMSprop squared-gradient decay (default: {d.rmsprop_decay:g})")
    optim.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=S,
        help="warmup_cosine: linear warmup then cosine to 0; multiplicative: cosine over all steps "
        f"times min(1, t/W); constant (default: {d.lr_schedule})",
    )
    optim.add_argument("--warmup-epochs", type=int, default=S, help=f"learning-rate warmup in epochs (default: {d.warmup_epochs})")

    gr = parser.add_argument_group("gradient regularization")
    gr.add_argument("--r", type=float, default=S, help=f"perturbation radius r; --r 0 --alpha 0 trains the plain optimizer (default: {d.r:g})")
    gr.add_argument("--alpha", type=float, default=S, help=f"mixing weight alpha in [0, 1], lambda = alpha*r; 1 is SAM (default: {d.alpha:g})")
    gr.add_argument("--gr-warmup", choices=WARMUP_STRATEGIES, default=S, help=f"GR warmup strategy (default: {d.gr_warmup})")
    gr.add_argument("--gr-warmup-epochs", type=int, default=S, help="GR warmup in epochs (default: --warmup-epochs)")
    gr.add_argument(
        "--first-gradient",
        choices=FIRST_GRADIENT_MODES,
        default=S,
        help="interpolate with the raw first gradient, or with the unit one as the reference JAX code does (default: raw)",
    )
    gr.add_argument(
        "--max-grad-norm",
        type=_optional_float,
        default=S,
        help=f"clip the mixed gradient to this global L2 norm; 0 or none turns clipping off (default: {d.max_grad_norm:g})",
    )
    gr.add_argument("--gr-probability", type=float, default=S, help="probability that a step is a GR step (default: 1)")
    gr.add_argument(
        "--gr-mode",
        choices=("finite_difference", "exact"),
        default=S,
        help="finite_difference: a second pass at the perturbed point; exact: double back-propagation (default: finite_difference)",
    )
    gr.add_argument(
        "--perturbation", choices=("local", "global"), default=S,
        help="under torchrun: perturb along each rank's own gradient (local) or the averaged one (global) (default: local)",
    )
    gr.add_argument(
        "--decoupled", type=_boolean, metavar="BOOL", default=S,
        help="feed the optimizer the clean gradient and apply the GR term outside its preconditioner (default: false)",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=S, help=f"seed of the weights, data order and augmentation (default: {d.seed})")
    run.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument(
        "--precision", choices=PRECISIONS, default=S,
        help="fp32; bf16 autocast; or fp16 autocast with a loss scaler (finite_difference only, and slow on CPUs) "
        "(default: fp32)",
    )
    run.add_argument(
        "--compile", type=_boolean, metavar="BOOL", default=S,
        help="run the model's forward through torch.compile; the first steps then compile it (default: false)",
    )
    run.add_argument("--out", default=S, help=f"output folder (default: {d.out})")
    run.add_argument("--log-every", type=int, default=S, help=f"write a step record every N optimizer steps; 0 turns them off (default: {d.log_every})")
    run.add_argument(
        "--stats-every", type=int, default=S,
        help=f"write optimizer statistics (m_hat, v_hat, psi, v_hat drift) every N steps; 0 turns them off (default: {d.stats_every})",
    )
    run.add_argument("--eval-every", type=int, default=S, help="evaluate on the test set every N epochs and after the last (default: 1)")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S, help="write no TensorBoard event files")
    run.add_argument("--tag", default=S, help="label that groups this run in gradreg report (default: derived from the settings)")
    run.add_argument("--resume", action="store_true", default=S, help="continue the run in --out from its last checkpoint")


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the config file and the given flags into one validated config."""
    values = vars(args).copy()
    values.pop("command", None)
    values.pop("handler", None)
    config_path = values.pop("config", None)
    values.pop("verbose", None)
    base = load_config_file(config_path) if config_path else TrainConfig()
    config = config_from_mapping(values, base=base, source="the command line")
    return config.validate()


def run_train(args: argparse.Namespace) -> int:
    from .train import train

    config = resolve_train_config(args)
    out = Path(config.out)
    try:
        summary = train(config)
    except KeyboardInterrupt:
        return 130  # train() has logged where the finished epochs are
    print(
        f"final_test_error={summary['final_test_error']:.4f} best_test_error={summary['best_test_error']:.4f} out={out}"
    )
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    from .study import load_study_config, run_study

    study = load_study_config(args.config, out=args.out, seeds=args.seeds, workers=args.workers)
    if args.arms:
        unknown = [arm for arm in args.arms if arm not in study.arms]
        if unknown:
            raise ValueError(f"Unknown arm(s) {', '.join(unknown)}. The study defines: {', '.join(study.arms)}.")
        study.arms = {arm: study.arms[arm] for arm in args.arms}
    if args.data_dir is not None:
        study.train = {**study.train, "data_dir": args.data_dir}
    if args.device is not None:
        study.train = {**study.train, "device": args.device}
    record = run_study(study)
    failed = sum(run["status"] == "failed" for run in record["runs"])
    print(f"runs={len(record['runs'])} failed={failed} results={Path(study.out) / 'results.md'}")
    return 1 if failed else 0


def run_report_command(args: argparse.Namespace) -> int:
    from .report import build_report

    out = Path(args.out) if args.out else Path(args.dirs[0])
    rows = build_report(args.dirs, out)
    print((out / "results.md").read_text(), end="")
    return 0 if rows else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradreg", description="Gradient regularization (GR) with GR warmup for Vision Transformers on CIFAR."
    )
    parser.add_argument("--version", action="version", version=f"gradreg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v also works after the sub-command, as in "gradreg train -v".
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train_parser = commands.add_parser(
        "train",
        parents=[verbose],
        help="train one model with one GR variant",
        description="Train a Vision Transformer on CIFAR with gradient regularization. Settings come from "
        "the defaults (the reference recipe), then --config FILE, then the flags given here, which win.",
    )
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=run_train)

    study_parser = commands.add_parser(
        "study",
        parents=[verbose],
        help="run arms x seeds and compare them",
        description="Run every arm of a study config for every seed, skip finished runs, resume "
        "interrupted ones, and write results.csv, results.md and plots into the study folder.",
    )
    study_parser.add_argument("--config", required=True, metavar="FILE", help="study config (YAML or JSON), for example configs/study/cpu.yaml")
    study_parser.add_argument("--out", help="study folder (default: the config's out)")
    study_parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds to run (default: the config's seeds)")
    study_parser.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms of the config")
    study_parser.add_argument("--data-dir", help="data folder for every run (default: the config's, else $GRADREG_DATA_DIR)")
    study_parser.add_argument("--device", help="device for every run: auto, cpu, cuda or cuda:N")
    study_parser.add_argument("--workers", type=int, help="runs to train at the same time, each in its own process (default: the config's, else 1)")
    study_parser.set_defaults(handler=run_study_command)

    report_parser = commands.add_parser(
        "report",
        parents=[verbose],
        help="tables and plots from finished runs",
        description="Collect the runs below the given folders (from gradreg study or gradreg train), group "
        "them by arm, and write results.csv, results.md and PNG plots.",
    )
    report_parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders that contain run folders")
    report_parser.add_argument("--out", help="where to write the report (default: the first DIR)")
    report_parser.set_defaults(handler=run_report_command)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Invalid settings, missing data or an occupied output folder: a message, not a traceback.
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
