"""``gradreg study`` and ``gradreg report`` on small real CIFAR-10 subsets."""

from __future__ import annotations

import csv
import json

import pytest

from gradreg.cli import main
from gradreg.report import aggregate
from gradreg.study import DEFAULT_ARMS, StudyConfig, load_study_config, run_study

PLOTS = ("test_error.png", "grad_norm.png", "warmup_statistics.png", "gr_schedule.png")


def small_study(cifar10_dir, out, **overrides) -> StudyConfig:
    train = dict(
        data_dir=str(cifar10_dir), train_subset=200, test_subset=100, model="vit_micro", epochs=1,
        batch_size=50, warmup_epochs=1, lr=2e-3, weight_decay=0.05, r=0.05, alpha=1.0,
        log_every=1, stats_every=2, tensorboard=False,
    )
    values = dict(out=str(out), seeds=[0], train=train,
                  arms={"adamw": DEFAULT_ARMS["adamw"], "zero_warmup": DEFAULT_ARMS["zero_warmup"]})
    values.update(overrides)
    return StudyConfig(**values)


@pytest.mark.slow
def test_two_arm_study_writes_outputs_and_report_rebuilds(cifar10_dir, tmp_path, capsys):
    out = tmp_path / "study"
    arms = {"adamw": DEFAULT_ARMS["adamw"], "gr": DEFAULT_ARMS["gr"]}
    record = run_study(small_study(cifar10_dir, out, arms=arms))

    assert [(run["arm"], run["status"]) for run in record["runs"]] == [("adamw", "finished"), ("gr", "finished")]
    for name in ("study.json", "results.csv", "results.md", *PLOTS):
        assert (out / name).is_file(), name
    for arm in arms:
        assert (out / arm / "seed_0" / "summary.json").is_file()

    # Both arms start from the same weights and see the same data.
    checksums = {json.loads((out / arm / "seed_0" / "summary.json").read_text())["init_checksum"] for arm in arms}
    assert len(checksums) == 1

    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [row["arm"] for row in rows] == ["adamw", "gr"]
    adamw_error = json.loads((out / "adamw" / "seed_0" / "summary.json").read_text())["final_test_error"]
    assert float(rows[0]["final_test_error_mean"]) == pytest.approx(100 * adamw_error, abs=1e-4)
    assert float(rows[0]["diff_vs_adamw_mean"]) == 0.0
    assert float(rows[1]["diff_vs_gr_mean"]) == 0.0

    # The stats records feed the warmup plot.
    records = [json.loads(line) for line in open(out / "gr" / "seed_0" / "metrics.jsonl")]
    stats = [r for r in records if r["kind"] == "stats"]
    assert stats
    assert "psi_var" in stats[0]["global"]
    assert "v_drift" in stats[0]["global"]

    rebuilt = tmp_path / "rebuilt"
    assert main(["report", str(out), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "results.md").read_text() == (out / "results.md").read_text()
    assert "| adamw | 1 |" in capsys.readouterr().out
    for name in PLOTS:
        assert (rebuilt / name).is_file()


@pytest.mark.slow
def test_interrupted_study_resumes(cifar10_dir, tmp_path, caplog, interrupt_evaluation):
    out = tmp_path / "study"
    study = small_study(cifar10_dir, out, train={**small_study(cifar10_dir, out).train, "epochs": 2})

    restore = interrupt_evaluation(on_call=4)  # the second run's second epoch
    with pytest.raises(KeyboardInterrupt):
        run_study(study)
    restore()
    assert json.loads((out / "zero_warmup" / "seed_0" / "summary.json").read_text())["epochs_completed"] == 1

    caplog.set_level("INFO")
    record = run_study(study)
    assert all(run["status"] == "finished" for run in record["runs"])
    assert "adamw seed 0: finished earlier, skipped" in caplog.text
    assert "Resuming" in caplog.text
    epochs = [json.loads(line) for line in open(out / "zero_warmup" / "seed_0" / "metrics.jsonl")]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]


@pytest.mark.slow
def test_failed_run_is_recorded_and_others_continue(cifar10_dir, tmp_path):
    out = tmp_path / "study"
    arms = {"broken": {"model": "no_such_model_anywhere"}, "adamw": DEFAULT_ARMS["adamw"]}
    record = run_study(small_study(cifar10_dir, out, arms=arms))
    statuses = {run["arm"]: run["status"] for run in record["runs"]}
    assert statuses == {"broken": "failed", "adamw": "finished"}
    saved = json.loads((out / "study.json").read_text())
    failed = [run for run in saved["runs"] if run["status"] == "failed"]
    assert "no_such_model_anywhere" in failed[0]["error"]
    assert (out / "results.md").is_file()


def test_study_config_validation(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("out: x\nseeds: [0]\nepochs: 3\n")
    with pytest.raises(ValueError, match="Unknown study setting.*'epochs'.*go under 'train'"):
        load_study_config(path)

    path.write_text("out: x\nseeds: [0]\ntrain: {epochs: 2, warmup_epochs: 1}\narms:\n  fast: {lr: -1}\n")
    with pytest.raises(ValueError, match="Arm 'fast': Invalid lr: -1"):
        load_study_config(path).plan()

    path.write_text("out: x\nseeds: []\n")
    with pytest.raises(ValueError, match="Invalid seeds"):
        load_study_config(path).plan()
    path.write_text("out: x\nworkers: 0\n")
    with pytest.raises(ValueError, match="Invalid workers: 0"):
        load_study_config(path).plan()


def test_study_plan_covers_arms_and_seeds(tmp_path):
    study = StudyConfig(out=str(tmp_path), seeds=[1, 2], train={"epochs": 2, "warmup_epochs": 1})
    plan = study.plan()
    assert len(plan) == 2 * len(DEFAULT_ARMS)
    arms = {arm: config for arm, seed, config in plan if seed == 1}
    assert (arms["adamw"].r, arms["adamw"].alpha, arms["adamw"].gr_warmup) == (0.0, 0.0, "none")
    assert arms["lambda_warmup"].gr_warmup == "lambda"
    assert arms["zero_warmup"].tag == "zero_warmup"
    assert arms["gr"].out == str(tmp_path / "gr" / "seed_1")
    assert all(config.resume for _, _, config in plan)


def test_shipped_study_configs_plan(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "study"
    paths = sorted(folder.glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        assert load_study_config(path).plan()


def test_report_errors_on_empty_folder(tmp_path, caplog):
    assert main(["report", str(tmp_path)]) == 2
    assert "No runs found" in caplog.text
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "Run folder not found" in caplog.text


def test_aggregate_pairs_by_seed():
    def run(arm, seed, error):
        return {"arm": arm, "seed": seed, "summary": {"finished": True, "final_test_error": error,
                                                      "best_test_error": error, "wall_seconds": 1.0}}

    rows = aggregate([run("adamw", 0, 0.30), run("adamw", 1, 0.40), run("gr", 0, 0.35), run("gr", 1, 0.41),
                      run("zero_warmup", 1, 0.36)])
    by_arm = {row["arm"]: row for row in rows}
    assert by_arm["adamw"]["final_test_error_mean"] == pytest.approx(35.0)
    assert by_arm["adamw"]["final_test_error_std"] == pytest.approx(7.0710678, rel=1e-6)
    assert by_arm["gr"]["diff_vs_adamw_mean"] == pytest.approx(3.0)
    assert by_arm["gr"]["diff_vs_adamw_pairs"] == 2
    assert by_arm["zero_warmup"]["diff_vs_gr_mean"] == pytest.approx(-5.0)
    assert by_arm["zero_warmup"]["diff_vs_gr_pairs"] == 1


def test_known_arm_names_without_settings(tmp_path):
    study = StudyConfig(out=str(tmp_path), seeds=[0], train={"epochs": 2, "warmup_epochs": 1},
                        arms={"decoupled": {}, "exact": {}, "zero_warmup": {}})
    configs = {arm: config for arm, _, config in study.plan()}
    assert configs["decoupled"].decoupled is True
    assert configs["exact"].gr_mode == "exact"
    assert configs["zero_warmup"].gr_warmup == "zero"
