"""Shared fixtures: where the real CIFAR-10 copy and the reference golden files are.

``GRADREG_DATA_DIR`` names the CIFAR-10 folder (``train.npz`` / ``test.npz``) and
``GRADREG_GOLDEN_DIR`` the folder of golden vectors from the authors' JAX code. Both
default to the ``shared/`` folder beside the repository, which is where CI has them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPOSITORY_ROOT.parent / "shared"


def _folder_from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return (Path(value) if value else default).resolve()


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    folder = _folder_from_env("GRADREG_DATA_DIR", SHARED_DIR / "data" / "cifar10")
    if not (folder / "train.npz").is_file():
        pytest.skip(f"real CIFAR-10 not found in {folder}; set GRADREG_DATA_DIR to a folder with train.npz and test.npz")
    return folder


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
)
def device(request) -> torch.device:
    """Run the test on the CPU, and again on the GPU where one is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    folder = _folder_from_env("GRADREG_GOLDEN_DIR", SHARED_DIR / "golden")
    if not (folder / "common.npz").is_file():
        pytest.skip(f"golden files not found in {folder}; set GRADREG_GOLDEN_DIR to the folder with common.npz")
    return folder


@pytest.fixture
def interrupt_evaluation(monkeypatch):
    """Return a function that makes the n-th test-set evaluation raise KeyboardInterrupt.

    It simulates a run killed after its checkpoint of epoch n - 1 was written. Calling
    the returned ``restore()`` puts the real evaluation back.
    """
    from gradreg import train as train_module

    real_evaluate = train_module.evaluate

    def install(on_call: int):
        calls = []

        def evaluate_then_interrupt(*args, **kwargs):
            calls.append(1)
            if len(calls) == on_call:
                raise KeyboardInterrupt
            return real_evaluate(*args, **kwargs)

        monkeypatch.setattr(train_module, "evaluate", evaluate_then_interrupt)
        return lambda: monkeypatch.setattr(train_module, "evaluate", real_evaluate)

    return install
