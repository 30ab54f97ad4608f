"""Training configuration as plain data: defaults, config files and validation.

A run is described by one :class:`TrainConfig`. Its values come, in increasing
priority, from the field defaults (the reference ViT-on-CIFAR recipe), a YAML or JSON
config file, and command-line flags. The resolved config is written to
``config.json`` in the output folder, so every run can be repeated from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .warmup import WARMUP_STRATEGIES

DATASETS = ("cifar10", "cifar100")
OPTIMIZER_NAMES = ("adamw", "adam", "rmsprop", "sgd")
LR_SCHEDULES = ("warmup_cosine", "multiplicative", "constant")
FIRST_GRADIENT_MODES = ("raw", "normalized")
GR_MODES = ("finite_difference", "exact")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a ``gradreg train`` run; the defaults follow the reference recipe."""

    # Data.
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    download: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None

    # Model.
    model: str = "vit_ti"
    drop_rate: Optional[float] = None
    attn_drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None

    # Optimizer and learning rate.
    epochs: int = 300
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    rmsprop_decay: float = 0.99
    lr_schedule: str = "warmup_cosine"
    warmup_epochs: int = 40

    # Gradient regularization.
    r: float = 0.1
    alpha: float = 1.0
    gr_warmup: str = "zero"
    gr_warmup_epochs: Optional[int] = None
    first_gradient: str = "raw"
    max_grad_norm: Optional[float] = 5.0
    gr_probability: float = 1.0
    gr_mode: str = "finite_difference"
    decoupled: bool = False
    perturbation: str = "local"

    # Run.
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    out: str = "runs/train"
    log_every: int = 50
    stats_every: int = 100
    eval_every: int = 1
    tensorboard: bool = True
    tag: Optional[str] = None
    resume: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_gr_warmup_epochs(self) -> int:
        """The GR warmup length in epochs; it defaults to the learning-rate warmup."""
        return self.warmup_epochs if self.gr_warmup_epochs is None else self.gr_warmup_epochs

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first invalid setting and its accepted values."""
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("gr_warmup", self.gr_warmup, WARMUP_STRATEGIES)
        _check_choice("first_gradient", self.first_gradient, FIRST_GRADIENT_MODES)
        _check_choice("gr_mode", self.gr_mode, GR_MODES)
        _check_choice("perturbation", self.perturbation, ("local", "global"))
        _check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "fp16" and self.gr_mode == "exact":
            raise ValueError(
                "Invalid precision: 'fp16' needs gr_mode 'finite_difference', because the loss scaler cannot "
                "follow a double backward pass. Use precision 'bf16' with gr_mode 'exact'."
            )
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"Invalid model: {self.model!r}. Use a preset such as 'vit_ti' or a timm model name.")

        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"Invalid warmup_epochs: {self.warmup_epochs} is more than epochs ({self.epochs}). "
                "Use a warmup no longer than the run."
            )
        if self.gr_warmup_epochs is not None:
            _check_int("gr_warmup_epochs", self.gr_warmup_epochs, minimum=0)
            if self.gr_warmup_epochs > self.epochs:
                raise ValueError(
                    f"Invalid gr_warmup_epochs: {self.gr_warmup_epochs} is more than epochs ({self.epochs}), "
                    "so GR would never run. Use a GR warmup no longer than the run."
                )
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("log_every", self.log_every, minimum=0)
        _check_int("stats_every", self.stats_every, minimum=0)
        _check_int("eval_every", self.eval_every, minimum=1)
        if self.tag is not None and (not isinstance(self.tag, str) or not self.tag):
            raise ValueError(f"Invalid tag: {self.tag!r}. Use a non-empty name such as 'zero_warmup'.")

        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        _check_number("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        _check_number("eps", self.eps, low=0.0)
        _check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _check_number("rmsprop_decay", self.rmsprop_decay, low=0.0, high=1.0)
        _check_number("r", self.r, low=0.0)
        _check_number("alpha", self.alpha, low=0.0, high=1.0)
        _check_number("gr_probability", self.gr_probability, low=0.0, high=1.0, low_open=True)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        for name in ("download", "nesterov", "resume", "tensorboard", "decoupled", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r}. Use true or false.")
        if self.compile and self.gr_mode == "exact":
            raise ValueError(
                "Invalid compile: true with gr_mode 'exact'. A compiled backward pass cannot be differentiated "
                "again, which exact GR needs. Use compile false, or gr_mode 'finite_difference'."
            )
        if self.first_gradient == "normalized" and (self.decoupled or self.gr_mode == "exact"):
            raise ValueError(
                "Invalid first_gradient: 'normalized' works with the coupled finite-difference step only. "
                "Use first_gradient raw with decoupled or gr_mode exact."
            )
        return self


def config_from_mapping(values: Mapping[str, Any], *, base: Optional[TrainConfig] = None, source: str = "config") -> TrainConfig:
    """Return ``base`` (or the defaults) updated with ``values``; keys may use dashes or underscores.

    Raises:
        ValueError: on a key that is not a setting, naming it and the valid keys.
    """
    config = dataclasses.replace(base) if base is not None else TrainConfig()
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise ValueError(f"Unknown setting {raw_key!r} in {source}. Valid settings: {', '.join(sorted(known))}.")
        setattr(config, key, _coerce(key, value))
    return config


def read_mapping(path: Path) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file whose top level is a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}. Pass the path of a YAML or JSON file, for example configs/cpu.yaml.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ImportError("Reading a YAML config needs PyYAML: pip install 'gradreg[vision]'.") from error
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"Invalid YAML in config file {path}: {error}") from error
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Invalid JSON in config file {path}: {error}") from error
    else:
        raise ValueError(f"Invalid config file {path}: use a .yaml, .yml or .json file.")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"Invalid config file {path}: the top level must be a mapping of setting names to values.")
    return values


def load_config_file(path: str | Path, *, base: Optional[TrainConfig] = None) -> TrainConfig:
    """Read a YAML or JSON training config file into a :class:`TrainConfig`."""
    return config_from_mapping(read_mapping(Path(path)), base=base, source=str(path))


def _coerce(key: str, value: Any) -> Any:
    """Convert YAML/JSON scalars to the field's type where that is unambiguous (1 -> 1.0, '1e-3' -> 0.001)."""
    field_type = {field.name: field.type for field in dataclasses.fields(TrainConfig)}[key]
    if value is None:
        return None
    if key == "max_grad_norm" and (value == 0 or str(value).lower() in ("none", "off")):
        return None  # as on the command line, 0 or none turns clipping off
    if "float" in str(field_type) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}. Use one of: {', '.join(choices)}.")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}. Use an integer >= {minimum}.")


def _check_number(
    name: str, value: Any, *, low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = False
) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if valid:
        valid = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not valid:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        upper = "inf" if high is None else f"{high:g}"
        raise ValueError(f"Invalid {name}: {value!r}. Use a number in {left}{low:g}, {upper}{right}.")
