"""The ``gradreg`` command line and training configs: merging, validation and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradreg.cli import build_parser, main, resolve_train_config
from gradreg.config import TrainConfig, config_from_mapping, load_config_file

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    return resolve_train_config(build_parser().parse_args(["train", *argv]))


def test_defaults_are_reference_recipe():
    config = parse([])
    assert config == TrainConfig()
    assert (config.model, config.epochs, config.batch_size, config.lr) == ("vit_ti", 300, 256, 1e-3)
    assert (config.weight_decay, config.warmup_epochs, config.max_grad_norm) == (0.3, 40, 5.0)
    assert config.effective_gr_warmup_epochs == 40


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: vit_s\nepochs: 10\nwarmup_epochs: 2\nr: 0.05\ngr-warmup: lambda\nlr: 1e-3\n")
    config = parse(["--config", str(path), "--epochs", "3", "--alpha", "0.5"])
    assert config.model == "vit_s"
    assert config.epochs == 3
    assert config.r == 0.05
    assert config.alpha == 0.5
    assert config.gr_warmup == "lambda"
    assert config.lr == 1e-3


def test_json_config_and_float_coercion(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": "2e-3", "max_grad_norm": 1, "gr_warmup_epochs": 5}))
    config = load_config_file(path)
    assert config.lr == 2e-3
    assert config.max_grad_norm == 1.0
    assert config.effective_gr_warmup_epochs == 5


def test_max_grad_norm_can_be_turned_off():
    assert parse(["--max-grad-norm", "0"]).max_grad_norm is None
    assert parse(["--max-grad-norm", "none"]).max_grad_norm is None
    assert parse(["--max-grad-norm", "2"]).max_grad_norm == 2.0


def test_precision_and_compile_flags():
    config = parse(["--precision", "bf16", "--compile", "true"])
    assert config.precision == "bf16"
    assert config.compile is True
    assert parse([]).precision == "fp32"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "Invalid epochs: 0. Use an integer >= 1."),
        ({"lr": -1.0}, "Invalid lr: -1.0"),
        ({"alpha": 2.0}, "Invalid alpha: 2.0. Use a number in [0, 1]."),
        ({"r": -0.1}, "Invalid r: -0.1"),
        ({"gr_warmup": "slow"}, "Invalid gr_warmup: 'slow'. Use one of: none, r, lambda, zero."),
        ({"dataset": "mnist"}, "Invalid dataset: 'mnist'"),
        ({"warmup_epochs": 50, "epochs": 10}, "Invalid warmup_epochs: 50 is more than epochs (10)"),
        ({"gr_probability": 0.0}, "Invalid gr_probability: 0.0"),
        ({"batch_size": 2.5}, "Invalid batch_size: 2.5"),
        ({"download": "yes"}, "Invalid download: 'yes'"),
    ],
)
def test_invalid_settings_raise(values, message):
    with pytest.raises(ValueError) as error:
        config_from_mapping(values).validate()
    assert message in str(error.value)


def test_unknown_config_key_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="Unknown setting 'learning_rate'.*Valid settings:.*lr"):
        load_config_file(path)


def test_bad_config_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="Invalid JSON"):
        load_config_file(tmp_path / "broken.json")
    (tmp_path / "run.toml").write_text("")
    with pytest.raises(ValueError, match="use a .yaml, .yml or .json file"):
        load_config_file(tmp_path / "run.toml")


def test_invalid_flag_exits_with_message(tmp_path, caplog):
    exit_code = main(["train", "--alpha", "3", "--out", str(tmp_path / "run")])
    assert exit_code == 2
    assert "Invalid alpha: 3.0. Use a number in [0, 1]." in caplog.text


def test_missing_data_exits_with_paths(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    exit_code = main(["train", "--model", "vit_micro", "--data-dir", str(empty), "--epochs", "1",
                      "--warmup-epochs", "0", "--out", str(tmp_path / "run")])
    assert exit_code == 2
    assert str(empty / "train.npz") in caplog.text
    assert "--download" in caplog.text


def test_help_lists_gr_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--gr-warmup", "--gr-warmup-epochs", "--first-gradient", "--max-grad-norm", "--gr-probability",
                 "--lr-schedule", "--resume", "--train-subset"):
        assert flag in text


def test_shipped_configs_are_valid():
    paths = sorted((REPOSITORY_ROOT / "configs" / "reference").rglob("*.yaml")) + [REPOSITORY_ROOT / "configs" / "cpu.yaml"]
    assert len(paths) == 31
    for path in paths:
        load_config_file(path).validate()


def test_yaml_max_grad_norm_zero_turns_clipping_off(tmp_path):
    path = tmp_path / "run.yaml"
    for value in ("0", "none", "off"):
        path.write_text(f"max_grad_norm: {value}\n")
        assert load_config_file(path).max_grad_norm is None


def test_gr_warmup_longer_than_run_raises():
    with pytest.raises(ValueError, match="Invalid gr_warmup_epochs: 5 is more than epochs \\(1\\)"):
        config_from_mapping({"epochs": 1, "warmup_epochs": 0, "gr_warmup_epochs": 5}).validate()


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_unsupported_device_exits_with_message(tmp_path, caplog, device):
    exit_code = main(["train", "--device", device, "--epochs", "1", "--warmup-epochs", "0", "--out", str(tmp_path / "run")])
    assert exit_code == 2
    assert f"Invalid device: '{device}'" in caplog.text


def test_out_that_is_a_file_exits_with_message(tmp_path, caplog):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["train", "--epochs", "1", "--warmup-epochs", "0", "--out", str(path)]) == 2
    assert "is a file" in caplog.text


def test_verbose_flag_after_subcommand():
    args = build_parser().parse_args(["train", "-v"])
    assert args.verbose is True
