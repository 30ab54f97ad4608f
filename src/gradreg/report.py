"""Tables and plots from finished runs: ``gradreg report DIR...``.

Any folder below the given ones that contains ``config.json``, ``metrics.jsonl`` and
``summary.json`` is a run, whether ``gradreg study`` or ``gradreg train`` wrote it. Runs
are grouped into arms by their ``tag`` (the arm name in a study) or, without one, by
their optimizer and GR settings. The outputs:

* ``results.csv`` and ``results.md``: final and best test error per arm as mean ± std
  over seeds (in percent), and the differences from AdamW and from AdamW + GR,
  paired by seed where both arms ran that seed;
* ``test_error.png``: test error against epoch, learning-rate warmup shaded;
* ``grad_norm.png``: mean norm of the update gradient (after clipping) against epoch;
* ``warmup_statistics.png``: variance of the adaptive learning rate psi and the drift of
  v_hat from its clean-gradient shadow, over the steps around the warmup;
* ``gr_schedule.png``: the effective r_t and alpha_t against step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .checkpoint import read_metrics

logger = logging.getLogger(__name__)

ADAMW_ARM = "adamw"
GR_ARM = "gr"


def arm_label(config: Dict[str, Any]) -> str:
    """Return the run's tag, or a label made from its optimizer and GR settings."""
    if config.get("tag"):
        return str(config["tag"])
    if config.get("r", 0) == 0 and config.get("alpha", 0) == 0:
        return config.get("optimizer", "adamw")
    return f"{config.get('optimizer', 'adamw')}_r{config.get('r'):g}_alpha{config.get('alpha'):g}_{config.get('gr_warmup')}"


def find_runs(folders: Iterable[str | Path]) -> List[Dict[str, Any]]:
    """Return every finished or partly finished run below the folders, with its records.

    Raises:
        FileNotFoundError: when a folder does not exist.
    """
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Run folder not found: {folder}. Pass folders written by gradreg train or gradreg study.")
        for summary_path in sorted(folder.rglob("summary.json")):
            run_dir = summary_path.parent
            if not (run_dir / "config.json").exists() or not (run_dir / "metrics.jsonl").exists():
                continue
            config = json.loads((run_dir / "config.json").read_text())
            runs.append(
                {
                    "dir": run_dir,
                    "config": config,
                    "summary": json.loads(summary_path.read_text()),
                    "metrics": read_metrics(run_dir / "metrics.jsonl"),
                    "arm": arm_label(config),
                    "seed": config.get("seed", 0),
                }
            )
    return runs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _paired_difference(runs_by_seed: Dict[int, float], baseline_by_seed: Dict[int, float]) -> tuple[float, float, int]:
    seeds = sorted(set(runs_by_seed) & set(baseline_by_seed))
    differences = [runs_by_seed[seed] - baseline_by_seed[seed] for seed in seeds]
    mean, std = _mean_std(differences)
    return mean, std, len(differences)


def aggregate(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Return one row per arm: seeds, mean ± std of final and best test error (percent), and differences."""
    by_arm: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run["summary"].get("finished"):
            by_arm[run["arm"]].append(run)

    final = {arm: {run["seed"]: 100.0 * run["summary"]["final_test_error"] for run in arm_runs} for arm, arm_runs in by_arm.items()}
    best = {arm: {run["seed"]: 100.0 * run["summary"]["best_test_error"] for run in arm_runs} for arm, arm_runs in by_arm.items()}
    rows = []
    for arm in by_arm:
        final_mean, final_std = _mean_std(list(final[arm].values()))
        best_mean, best_std = _mean_std(list(best[arm].values()))
        row: Dict[str, Any] = {
            "arm": arm,
            "seeds": len(final[arm]),
            "final_test_error_mean": final_mean,
            "final_test_error_std": final_std,
            "best_test_error_mean": best_mean,
            "best_test_error_std": best_std,
            "wall_seconds_mean": statistics.fmean(run["summary"].get("wall_seconds", math.nan) for run in by_arm[arm]),
        }
        for baseline, name in ((ADAMW_ARM, "adamw"), (GR_ARM, "gr")):
            if baseline in final:
                mean, std, count = _paired_difference(final[arm], final[baseline])
            else:
                mean, std, count = math.nan, math.nan, 0
            row[f"diff_vs_{name}_mean"] = mean
            row[f"diff_vs_{name}_std"] = std
            row[f"diff_vs_{name}_pairs"] = count
        rows.append(row)
    return rows


def _format(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}"


def _format_difference(mean: float, std: float, pairs: int) -> str:
    if pairs == 0 or math.isnan(mean):
        return "n/a"
    return f"{mean:+.2f} ± {std:.2f}"


def write_tables(rows: Sequence[Dict[str, Any]], out: Path) -> None:
    """Write ``results.csv`` and ``results.md``."""
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()})
    lines = [
        "| arm | seeds | final test error (%) | best test error (%) | final − AdamW | final − AdamW + GR |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['seeds']} "
            f"| {_format(row['final_test_error_mean'], row['final_test_error_std'])} "
            f"| {_format(row['best_test_error_mean'], row['best_test_error_std'])} "
            f"| {_format_difference(row['diff_vs_adamw_mean'], row['diff_vs_adamw_std'], row['diff_vs_adamw_pairs'])} "
            f"| {_format_difference(row['diff_vs_gr_mean'], row['diff_vs_gr_std'], row['diff_vs_gr_pairs'])} |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds. Differences are in percentage points, paired by seed;",
        "negative means a lower test error than the baseline arm.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _epoch_series(runs: Sequence[Dict[str, Any]], key: str) -> Dict[int, List[float]]:
    series: Dict[int, List[float]] = defaultdict(list)
    for run in runs:
        for record in run["metrics"]:
            if record.get("kind") == "epoch" and record.get(key) is not None:
                series[record["epoch"]].append(record[key])
    return series


def _step_series(runs: Sequence[Dict[str, Any]], kind: str, key: str, nested: Optional[str] = None) -> Dict[int, List[float]]:
    series: Dict[int, List[float]] = defaultdict(list)
    for run in runs:
        for record in run["metrics"]:
            if record.get("kind") != kind:
                continue
            value = record.get(nested, {}).get(key) if nested else record.get(key)
            if value is not None:
                series[record["step"]].append(value)
    return series


def _plot_mean(axis, series: Dict[int, List[float]], label: str, scale: float = 1.0) -> None:
    if not series:
        return
    xs = sorted(series)
    means = [scale * statistics.fmean(series[x]) for x in xs]
    line = axis.plot(xs, means, label=label)[0]
    if any(len(series[x]) > 1 for x in xs):
        axis.fill_between(xs, [scale * min(series[x]) for x in xs], [scale * max(series[x]) for x in xs],
                          color=line.get_color(), alpha=0.15, linewidth=0)


def write_plots(runs: Sequence[Dict[str, Any]], out: Path) -> List[Path]:
    """Write the four PNG plots and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)
    first_config = runs[0]["config"]
    warmup_epochs = first_config.get("warmup_epochs", 0)
    steps_per_epoch = max(1, _steps_per_epoch(runs[0]))
    gr_warmup_epochs = first_config.get("gr_warmup_epochs") or warmup_epochs
    warmup_steps = gr_warmup_epochs * steps_per_epoch
    paths = []

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm, arm_runs in by_arm.items():
        _plot_mean(axis, _epoch_series(arm_runs, "test_error"), arm, scale=100.0)
    axis.axvspan(0, warmup_epochs, color="grey", alpha=0.12, label="LR warmup")
    axis.set(xlabel="epoch", ylabel="test error (%)", title="Test error (mean over seeds, band: min to max)")
    axis.legend()
    paths.append(_save(figure, out / "test_error.png"))

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm, arm_runs in by_arm.items():
        _plot_mean(axis, _epoch_series(arm_runs, "grad_norm_mean"), arm)
    axis.axvspan(0, warmup_epochs, color="grey", alpha=0.12, label="LR warmup")
    axis.set(xlabel="epoch", ylabel="mean ||g|| after clipping", title="Norm of the update gradient")
    axis.legend()
    paths.append(_save(figure, out / "grad_norm.png"))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, arm_runs in by_arm.items():
        _plot_mean(axes[0], _step_series(arm_runs, "stats", "psi_var", nested="global"), arm)
        _plot_mean(axes[1], _step_series(arm_runs, "stats", "v_drift", nested="global"), arm)
    for axis, title in zip(axes, ("variance of psi = 1/(sqrt(v_hat)+eps)", "||v_hat - v_hat_clean|| / ||v_hat_clean||")):
        axis.axvline(warmup_steps, color="grey", linestyle="--", label="end of GR warmup")
        axis.set(xlabel="step", title=title)
        if warmup_steps:
            axis.set_xlim(0, 2 * warmup_steps)
        axis.legend()
    axes[0].set_yscale("log")
    paths.append(_save(figure, out / "warmup_statistics.png"))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, arm_runs in by_arm.items():
        _plot_mean(axes[0], _step_series(arm_runs, "step", "r"), arm)
        _plot_mean(axes[1], _step_series(arm_runs, "step", "alpha"), arm)
    for axis, title in zip(axes, ("effective r_t", "effective alpha_t")):
        axis.axvline(warmup_steps, color="grey", linestyle="--", label="end of GR warmup")
        axis.set(xlabel="step", title=title)
        axis.legend()
    paths.append(_save(figure, out / "gr_schedule.png"))
    return paths


def _steps_per_epoch(run: Dict[str, Any]) -> int:
    epochs = [record for record in run["metrics"] if record.get("kind") == "epoch"]
    if not epochs:
        return 0
    return epochs[0]["step"] // epochs[0]["epoch"]


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def build_report(folders: Iterable[str | Path], out: str | Path) -> List[Dict[str, Any]]:
    """Find the runs below ``folders``, write tables and plots into ``out`` and return the table rows."""
    out, folders = Path(out), list(folders)
    runs = find_runs(folders)
    if not runs:
        raise FileNotFoundError(
            f"No runs found below {', '.join(map(str, folders))}. A run folder contains config.json, "
            "metrics.jsonl and summary.json, as written by gradreg train."
        )
    rows = aggregate(runs)
    write_tables(rows, out)
    paths = write_plots(runs, out)
    logger.info("Report of %d runs in %d arms written to %s (%s)", len(runs), len(rows), out,
                ", ".join(path.name for path in paths))
    return rows
