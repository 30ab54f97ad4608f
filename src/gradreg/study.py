"""``gradreg study``: every arm (AdamW, AdamW + GR, the GR warmup strategies) over seeds.

A study config is plain data::

    out: runs/study_cpu          # one folder per run: <out>/<arm>/seed_<seed>
    seeds: [0, 1, 2]
    train:                       # TrainConfig settings shared by every arm
      model: vit_micro
      r: 0.1
      alpha: 1.0
    arms:                        # optional; arm name -> the settings that differ
      adamw: {r: 0.0, alpha: 0.0, gr_warmup: none}
      zero_warmup: {gr_warmup: zero}

Every arm of one seed trains from the same initial weights and receives the same
batches in the same order, because both depend only on the seed. Runs go one after the other;
running the command again skips finished runs and resumes interrupted ones. A run that
fails is logged and recorded in ``study.json`` and the others go on. At the end the
tables and plots of :mod:`gradreg.report` are written into ``out``.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .checkpoint import write_json
from .config import TrainConfig, config_from_mapping

logger = logging.getLogger(__name__)

DEFAULT_ARMS: Dict[str, Dict[str, Any]] = {
    "adamw": {"r": 0.0, "alpha": 0.0, "gr_warmup": "none"},
    "gr": {"gr_warmup": "none"},
    "r_warmup": {"gr_warmup": "r"},
    "lambda_warmup": {"gr_warmup": "lambda"},
    "zero_warmup": {"gr_warmup": "zero"},
}
"""The default arms: AdamW, AdamW + GR from the first step, and the three GR warmups."""

EXTRA_ARMS: Dict[str, Dict[str, Any]] = {
    "decoupled": {"gr_warmup": "none", "decoupled": True},
    "exact": {"gr_warmup": "none", "gr_mode": "exact"},
}
"""More arms known by name: a study config may list them with empty settings, ``decoupled: {}``."""


@dataclasses.dataclass
class StudyConfig:
    """Arms x seeds of one study, with the settings that all arms share in ``train``."""

    out: str = "runs/study"
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0])
    workers: int = 1
    train: Dict[str, Any] = dataclasses.field(default_factory=dict)
    arms: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_ARMS))

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.out) / arm / f"seed_{seed}"

    def plan(self) -> List[Tuple[str, int, TrainConfig]]:
        """Return (arm, seed, validated config) for every run, seed by seed.

        Raises:
            ValueError: naming the arm whose settings are invalid.
        """
        if not self.seeds:
            raise ValueError("Invalid seeds: the list is empty. Give at least one seed, for example seeds: [0].")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"Invalid seed {seed!r} in seeds. Use integers >= 0.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"Invalid workers: {self.workers!r}. Use an integer >= 1 (runs trained at the same time).")
        if not self.arms:
            raise ValueError("Invalid arms: the mapping is empty. Leave it out to get the default arms.")
        base = config_from_mapping(self.train, source="the study's train settings")
        runs = []
        for seed in self.seeds:
            for arm, overrides in self.arms.items():
                if not isinstance(overrides, Mapping):
                    raise ValueError(f"Invalid arm {arm!r}: its settings must be a mapping, got {overrides!r}.")
                if not overrides:
                    # An arm listed by a known name without settings gets that arm's settings.
                    overrides = {**DEFAULT_ARMS, **EXTRA_ARMS}.get(arm, {})
                config = config_from_mapping(overrides, base=base, source=f"arm {arm!r}")
                config = dataclasses.replace(config, seed=seed, tag=arm, out=str(self.run_dir(arm, seed)), resume=True)
                try:
                    config.validate()
                except ValueError as error:
                    raise ValueError(f"Arm {arm!r}: {error}") from error
                runs.append((arm, seed, config))
        return runs


def load_study_config(path: str | Path, **overrides: Any) -> StudyConfig:
    """Read a study config (YAML or JSON); keyword overrides that are not None replace its top-level keys."""
    from .config import read_mapping

    values = read_mapping(Path(path))
    known = {field.name for field in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown study setting(s) {', '.join(map(repr, unknown))} in {path}. "
            f"Valid top-level keys: {', '.join(sorted(known))}; training settings go under 'train'."
        )
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    study = StudyConfig(**values)
    if not isinstance(study.train, dict):
        raise ValueError(f"Invalid train settings in {path}: use a mapping of setting names to values.")
    if not isinstance(study.arms, dict):
        raise ValueError(f"Invalid arms in {path}: use a mapping of arm names to settings.")
    return study


def _train_in_worker(config: TrainConfig, threads: int) -> Dict[str, Any]:
    """Train one run in a worker process with ``threads`` intra-op threads."""
    import torch

    from .train import train

    torch.set_num_threads(threads)
    return train(config)


def run_study(study: StudyConfig, *, train_function: Optional[Callable[[TrainConfig], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run every arm and seed that has not finished, then write the report; return the study record.

    With ``study.workers`` > 1, that many runs train at once in separate processes, each
    with an equal share of torch's intra-op threads. On a small model this uses the
    cores better than one process, because the per-operation work is too small to
    split across threads.
    """
    from .report import build_report
    from .train import read_summary, train

    plan = study.plan()
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Study in %s: %d arms x %d seeds = %d runs, %d at a time",
        out, len(study.arms), len(study.seeds), len(plan), study.workers,
    )

    record: Dict[str, Any] = {"arms": study.arms, "seeds": study.seeds, "train": study.train, "runs": []}
    pending = []
    for arm, seed, config in plan:
        run_dir = Path(config.out)
        if (run_dir / "summary.json").exists() and read_summary(run_dir).get("finished"):
            logger.info("%s seed %d: finished earlier, skipped", arm, seed)
            record["runs"].append({"arm": arm, "seed": seed, "out": str(run_dir), "status": "finished"})
        else:
            pending.append((arm, seed, config))

    def finish(arm: str, seed: int, config: TrainConfig, result: Any, error: Optional[BaseException]) -> None:
        entry: Dict[str, Any] = {"arm": arm, "seed": seed, "out": config.out}
        if error is not None:
            logger.error("%s seed %d failed: %s", arm, seed, error)
            logger.debug("%s", "".join(traceback.format_exception(error)))
            entry.update(status="failed", error=f"{type(error).__name__}: {error}")
        else:
            logger.info("%s seed %d: final test error %.4f", arm, seed, result["final_test_error"])
            entry.update(status="finished", final_test_error=result.get("final_test_error"))
        record["runs"].append(entry)
        write_json(out / "study.json", record)

    if study.workers == 1 or train_function is not None:
        train_function = train_function or train
        for index, (arm, seed, config) in enumerate(pending, start=1):
            logger.info("[%d/%d] %s seed %d: training into %s", index, len(pending), arm, seed, config.out)
            try:
                result, error = train_function(config), None
            except Exception as caught:  # noqa: BLE001 - one failed run must not stop the study
                result, error = None, caught
            finish(arm, seed, config, result, error)
    else:
        _run_parallel(study, pending, finish)

    write_json(out / "study.json", record)
    failures = [run for run in record["runs"] if run["status"] == "failed"]
    if failures:
        logger.error(
            "%d of %d runs failed: %s. Fix the cause and run the same command again to retry them.",
            len(failures), len(plan), ", ".join(f"{run['arm']} seed {run['seed']}" for run in failures),
        )
    build_report([out], out)
    return record


def _run_parallel(study: StudyConfig, pending, finish) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // study.workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=study.workers, mp_context=context) as pool:
        futures = {}
        for arm, seed, config in pending:
            logger.info("%s seed %d: queued, training into %s", arm, seed, config.out)
            futures[pool.submit(_train_in_worker, config, threads)] = (arm, seed, config)
        for future in as_completed(futures):
            arm, seed, config = futures[future]
            try:
                result, error = future.result(), None
            except Exception as caught:  # noqa: BLE001 - one failed run must not stop the study
                result, error = None, caught
            finish(arm, seed, config, result, error)
