"""Tests for gradreg.data: loading, subsets, augmentation and the batch loader.

The real-data tests read CIFAR-10 (train.npz and test.npz) from the folder in
GRADREG_DATA_DIR, or from shared/data/cifar10 next to the repository, and
skip when neither exists. All other tests build small files under tmp_path.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradreg import data
from gradreg.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATA_DIR_ENV,
    NUM_CLASSES,
    BatchLoader,
    DatasetNotFoundError,
    ImageDataset,
    augment_batch,
    class_balanced_subset,
    load_cifar,
    normalize_batch,
    resolve_data_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    from_env = os.environ.get(DATA_DIR_ENV)
    candidates = [Path(from_env)] if from_env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "cifar10")
    for candidate in candidates:
        if (candidate / "train.npz").is_file() and (candidate / "test.npz").is_file():
            return candidate.resolve()  # absolute, so that symbolic links to it work anywhere
    return None


@pytest.fixture(scope="module")
def real_dir() -> Path:
    folder = _real_data_dir()
    if folder is None:
        pytest.skip(
            f"real CIFAR-10 not found: set {DATA_DIR_ENV} to a folder with train.npz and "
            f"test.npz, or place them in {REPO_ROOT.parent / 'shared' / 'data' / 'cifar10'}"
        )
    return folder


@pytest.fixture(scope="module")
def real_train(real_dir: Path) -> ImageDataset:
    return load_cifar("cifar10", real_dir, split="train")


@pytest.fixture(scope="module")
def real_test(real_dir: Path) -> ImageDataset:
    return load_cifar("cifar10", real_dir, split="test")


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest sets up module-scoped fixtures first, so real_dir still reads the
    # variable. Removing it keeps load_cifar(..., None) away from real data.
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------
# Helpers that write small files in the accepted formats


def _random_hwc(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump(obj, file)


def _write_cifar10_python(root: Path, rows_per_batch: int = 4, seed: int = 0) -> dict[str, dict]:
    """Write a small cifar-10-batches-py folder and return its batches by file name."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = {}
    for file_name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": file_name.encode(),
            b"data": rng.integers(0, 256, (rows_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, rows_per_batch).tolist(),
            b"filenames": [f"{file_name}_{i}.png".encode() for i in range(rows_per_batch)],
        }
        _write_pickle(folder / file_name, batch)
        batches[file_name] = batch
    return batches


def _write_cifar100_python(root: Path, rows: int = 6, seed: int = 1) -> dict[str, dict]:
    """Write a small cifar-100-python folder and return its batches by file name."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    batches = {}
    for file_name in ("train", "test"):
        fine = rng.integers(0, 100, rows).tolist()
        fine[0] = 99  # The largest fine label must be accepted.
        batch = {
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
        }
        _write_pickle(folder / file_name, batch)
        batches[file_name] = batch
    return batches


def _index_dataset(count: int, num_classes: int | None = None) -> ImageDataset:
    """Build a dataset whose labels are the row numbers, so a batch shows which rows it has."""
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(7),
                           dtype=torch.uint8)
    labels = torch.arange(count)
    return ImageDataset(images, labels, num_classes or count, "index")


# ---------------------------------------------------------------------------
# Constants and resolve_data_dir


def test_constants_match_reference_values():
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert NUM_CLASSES == {"cifar10": 10, "cifar100": 100}
    assert DATA_DIR_ENV == "GRADREG_DATA_DIR"


def test_resolve_data_dir_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None, name="cifar100") == (
        tmp_path / "home" / ".cache" / "gradreg" / "cifar100",
        False,
    )

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from_env"))
    assert resolve_data_dir(None, name="cifar10") == (tmp_path / "from_env", True)

    explicit = tmp_path / "explicit"
    assert resolve_data_dir(explicit, name="cifar10") == (explicit, True)
    assert resolve_data_dir("~/x", name="cifar10") == (tmp_path / "home" / "x", True)


def test_resolve_data_dir_ignores_empty_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert resolve_data_dir(None, name="cifar10") == (
        tmp_path / ".cache" / "gradreg" / "cifar10",
        False,
    )


def test_load_cifar_uses_env_dir(monkeypatch, tmp_path):
    images = _random_hwc(3, seed=0)
    _write_npz(tmp_path / "test.npz", images=images, labels=np.array([1, 2, 3], np.uint8))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))

    dataset = load_cifar("cifar10", None, split="test")

    assert dataset.labels.tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------
# Real CIFAR-10


def test_real_train_counts_and_layout(real_dir, real_train):
    assert len(real_train) == 50_000
    assert real_train.images.shape == (50_000, 3, 32, 32)
    assert real_train.images.dtype == torch.uint8
    assert real_train.images.is_contiguous()
    assert real_train.labels.dtype == torch.int64
    assert real_train.num_classes == 10
    assert real_train.name == "cifar10"
    assert torch.bincount(real_train.labels, minlength=10).tolist() == [5_000] * 10
    # The file is sorted by class.
    assert real_train.labels[:3].tolist() == [0, 0, 0]
    assert real_train.labels[4_999:5_001].tolist() == [0, 1]
    assert real_train.labels[-1].item() == 9

    with np.load(real_dir / "train.npz") as archive:
        raw = archive["images"][[0, 1, 12_345, 49_999]]
    for row, index in enumerate([0, 1, 12_345, 49_999]):
        expected = torch.from_numpy(raw[row]).permute(2, 0, 1)
        assert torch.equal(real_train.images[index], expected), f"row {index}"


def test_real_test_counts(real_test):
    assert len(real_test) == 10_000
    assert real_test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(real_test.labels, minlength=10).tolist() == [1_000] * 10
    assert real_test.labels[0].item() == 0
    assert real_test.labels[-1].item() == 9


def test_real_train_channel_means(real_train):
    # This JPEG-decoded copy has means (0.49125, 0.48209, 0.44652), which are
    # close to the reference CIFAR10_MEAN.
    sums = real_train.images.numpy().sum(axis=(0, 2, 3), dtype=np.int64)
    means = sums / (50_000 * 32 * 32 * 255)
    np.testing.assert_allclose(means, [0.49125, 0.48209, 0.44652], atol=2e-5)
    np.testing.assert_allclose(means, CIFAR10_MEAN, atol=5e-4)


def test_real_npz_found_in_name_subfolder(real_dir, tmp_path):
    # data_dir/<name>/{split}.npz is the second place searched.
    link = tmp_path / "cifar10"
    link.symlink_to(real_dir, target_is_directory=True)

    dataset = load_cifar("cifar10", tmp_path, split="test")

    assert len(dataset) == 10_000


# ---------------------------------------------------------------------------
# npz format


def test_npz_roundtrip_hwc_to_chw(tmp_path):
    images = _random_hwc(5, seed=1)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.int32)
    _write_npz(tmp_path / "train.npz", images=images, labels=labels)

    dataset = load_cifar("cifar10", tmp_path, split="train")

    assert dataset.images.shape == (5, 3, 32, 32)
    assert torch.equal(dataset.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert dataset.images[2, 1, 5, 7].item() == images[2, 5, 7, 1]
    assert dataset.labels.dtype == torch.int64
    assert dataset.labels.tolist() == [0, 9, 3, 3, 1]


def test_npz_preferred_over_python_version(tmp_path):
    _write_cifar10_python(tmp_path)
    _write_npz(tmp_path / "test.npz", images=_random_hwc(2, seed=2),
               labels=np.array([4, 5], np.uint8))

    dataset = load_cifar("cifar10", tmp_path, split="test")

    assert dataset.labels.tolist() == [4, 5]


def test_npz_cifar100_label_range(tmp_path):
    _write_npz(tmp_path / "cifar100" / "test.npz", images=_random_hwc(2, seed=3),
               labels=np.array([0, 99], np.uint8))

    dataset = load_cifar("cifar100", tmp_path, split="test")

    assert dataset.num_classes == 100
    assert dataset.labels.tolist() == [0, 99]


@pytest.mark.parametrize(
    "arrays, expected_words",
    [
        (
            {"images": np.zeros((2, 3, 32, 32), np.uint8), "labels": np.zeros(2, np.uint8)},
            ["shape (2, 3, 32, 32)", "(N, 32, 32, 3)"],
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.float32), "labels": np.zeros(2, np.uint8)},
            ["dtype float32", "uint8"],
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, 10])},
            ["'labels'", "from 0 to 10", "0 to 9"],
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(3, np.uint8)},
            ["3 entries", "2 images"],
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(2, np.float64)},
            ["'labels'", "float64", "integer"],
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8)},
            ["missing key 'labels'", "'images'"],
        ),
    ],
    ids=["nchw-shape", "float-images", "label-out-of-range", "label-count", "float-labels",
         "missing-key"],
)
def test_npz_malformed_names_file(tmp_path, arrays, expected_words):
    path = tmp_path / "train.npz"
    _write_npz(path, **arrays)

    with pytest.raises(ValueError) as excinfo:
        load_cifar("cifar10", tmp_path, split="train")

    message = str(excinfo.value)
    assert str(path) in message
    for word in expected_words:
        assert word in message
    assert "numpy.savez" in message


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "test.npz"
    path.write_bytes(b"this is not a zip file")

    with pytest.raises(ValueError, match="cannot read the archive") as excinfo:
        load_cifar("cifar10", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


def test_npz_single_array_file(tmp_path):
    path = tmp_path / "test.npz"
    with open(path, "wb") as file:
        np.save(file, np.zeros(3))

    with pytest.raises(ValueError, match="not an .npz archive") as excinfo:
        load_cifar("cifar10", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


# ---------------------------------------------------------------------------
# Python-version format


@pytest.mark.parametrize("use_folder_itself", [False, True], ids=["parent", "folder"])
def test_cifar10_python_roundtrip(tmp_path, use_folder_itself):
    batches = _write_cifar10_python(tmp_path)
    data_dir = tmp_path / "cifar-10-batches-py" if use_folder_itself else tmp_path

    train = load_cifar("cifar10", data_dir, split="train")
    test = load_cifar("cifar10", data_dir, split="test")

    train_data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert len(train) == 20
    assert train.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == train_labels
    assert torch.equal(train.images, torch.from_numpy(train_data).view(20, 3, 32, 32))

    # Each row contains the red plane, then green, then blue, each row-major.
    row = train_data[6]
    assert train.images[6, 0, 0, 0].item() == row[0]
    assert train.images[6, 0, 0, 1].item() == row[1]
    assert train.images[6, 0, 1, 0].item() == row[32]
    assert train.images[6, 1, 0, 0].item() == row[1024]
    assert train.images[6, 2, 31, 31].item() == row[3071]

    assert len(test) == 4
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal(
        test.images, torch.from_numpy(batches["test_batch"][b"data"]).view(4, 3, 32, 32)
    )


@pytest.mark.parametrize("use_folder_itself", [False, True], ids=["parent", "folder"])
def test_cifar100_python_roundtrip(tmp_path, use_folder_itself):
    batches = _write_cifar100_python(tmp_path)
    data_dir = tmp_path / "cifar-100-python" if use_folder_itself else tmp_path

    for split in ("train", "test"):
        dataset = load_cifar("cifar100", data_dir, split=split)

        assert dataset.num_classes == 100
        assert dataset.name == "cifar100"
        assert dataset.labels.tolist() == batches[split][b"fine_labels"]
        assert torch.equal(
            dataset.images, torch.from_numpy(batches[split][b"data"]).view(6, 3, 32, 32)
        )


class _Python2Pickler(pickle._Pickler):
    """Pickler that writes every str and bytes object as a Python 2 str, as cPickle did.

    The official CIFAR archives were written by Python 2, so their strings and
    the raw array buffers use the BINSTRING opcodes that Python 3 never emits.
    It builds on the pure-Python pickle._Pickler, whose dispatch table is private.
    """

    def save_python2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def test_python_version_python2_pickle(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, (3, 3072), dtype=np.uint8)
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(
        {"batch_label": "testing batch 1 of 1", "data": data, "labels": [7, 0, 9]}
    )
    # Python 2 numpy pickled arrays under the module name numpy.core.multiarray.
    stream = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in stream
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(stream)

    dataset = load_cifar("cifar10", tmp_path, split="test")

    assert dataset.labels.tolist() == [7, 0, 9]
    assert torch.equal(dataset.images, torch.from_numpy(data).view(3, 3, 32, 32))


def test_python_version_missing_label_key(tmp_path):
    batches = _write_cifar10_python(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    del batches["test_batch"][b"labels"]
    _write_pickle(path, batches["test_batch"])

    with pytest.raises(ValueError, match="missing key 'labels'") as excinfo:
        load_cifar("cifar10", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


def test_python_version_bad_data_shape(tmp_path):
    batches = _write_cifar10_python(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batches["data_batch_2"][b"data"] = np.zeros((4, 3, 32, 32), np.uint8)
    _write_pickle(path, batches["data_batch_2"])

    with pytest.raises(ValueError, match=r"\(N, 3072\)") as excinfo:
        load_cifar("cifar10", tmp_path, split="train")

    assert str(path) in str(excinfo.value)


def test_python_version_label_out_of_range(tmp_path):
    batches = _write_cifar100_python(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    batches["test"][b"fine_labels"][1] = 100
    _write_pickle(path, batches["test"])

    with pytest.raises(ValueError, match="0 to 99") as excinfo:
        load_cifar("cifar100", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


def test_python_version_incomplete_folder(tmp_path):
    _write_cifar10_python(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()

    with pytest.raises(ValueError, match="incomplete") as excinfo:
        load_cifar("cifar10", tmp_path, split="train")

    assert "data_batch_3" in str(excinfo.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(excinfo.value)


def test_python_version_not_a_dict(tmp_path):
    path = tmp_path / "cifar-100-python" / "test"
    _write_pickle(path, [1, 2, 3])

    with pytest.raises(ValueError, match="expected a pickled dict") as excinfo:
        load_cifar("cifar100", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


def test_python_version_truncated_pickle(tmp_path):
    path = tmp_path / "cifar-100-python" / "test"
    _write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    path.write_bytes(path.read_bytes()[:40])

    with pytest.raises(ValueError, match="cannot unpickle") as excinfo:
        load_cifar("cifar100", tmp_path, split="test")

    assert str(path) in str(excinfo.value)


# ---------------------------------------------------------------------------
# Missing data and download


def test_missing_data_lists_searched_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_cifar("cifar10", tmp_path, split="train")

    assert isinstance(excinfo.value, FileNotFoundError)
    message = str(excinfo.value)
    for path in (
        tmp_path / "train.npz",
        tmp_path / "cifar10" / "train.npz",
        tmp_path / "cifar-10-batches-py",
    ):
        assert str(path) in message
    assert "data_batch_1" in message
    assert DATA_DIR_ENV in message
    assert "--download" in message


def test_missing_data_other_split_only(tmp_path):
    _write_npz(tmp_path / "test.npz", images=_random_hwc(1, seed=4), labels=np.zeros(1, np.uint8))

    with pytest.raises(DatasetNotFoundError, match="train split not found"):
        load_cifar("cifar10", tmp_path, split="train")


def test_missing_data_cifar100_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_cifar("cifar100", tmp_path / "absent", split="test")

    message = str(excinfo.value)
    assert str(tmp_path / "absent" / "cifar-100-python") in message
    assert "does not exist" in message


def test_missing_data_dir_is_file(tmp_path):
    path = tmp_path / "train.npz"
    _write_npz(path, images=_random_hwc(1, seed=5), labels=np.zeros(1, np.uint8))

    with pytest.raises(DatasetNotFoundError, match="pass the folder that contains it"):
        load_cifar("cifar10", path, split="train")


class _FakeCifar:
    """Stands in for torchvision.datasets.CIFAR10/100 and records its calls."""

    calls: list[dict] = []
    writer = None

    def __init__(self, root, train=True, transform=None, target_transform=None,
                 download=False):
        type(self).calls.append({"root": root, "train": train, "download": download})
        type(self).writer(Path(root))


@pytest.fixture
def fake_torchvision(monkeypatch):
    torchvision_datasets = pytest.importorskip("torchvision.datasets")

    def install(class_name: str, writer):
        fake = type(class_name, (_FakeCifar,), {"calls": [], "writer": staticmethod(writer)})
        monkeypatch.setattr(torchvision_datasets, class_name, fake)
        return fake

    return install


def test_torchvision_classes_accept_download_arguments():
    torchvision_datasets = pytest.importorskip("torchvision.datasets")
    for class_name in ("CIFAR10", "CIFAR100"):
        parameters = inspect.signature(getattr(torchvision_datasets, class_name)).parameters
        assert {"root", "train", "download"} <= set(parameters), class_name


def test_download_cifar10_reads_written_folder(tmp_path, fake_torchvision):
    written = {}
    fake = fake_torchvision("CIFAR10", lambda root: written.update(_write_cifar10_python(root)))
    data_dir = tmp_path / "new" / "cache"

    dataset = load_cifar("cifar10", data_dir, split="test", download=True)

    assert fake.calls == [{"root": str(data_dir), "train": False, "download": True}]
    assert dataset.labels.tolist() == written["test_batch"][b"labels"]
    assert torch.equal(
        dataset.images, torch.from_numpy(written["test_batch"][b"data"]).view(4, 3, 32, 32)
    )


def test_download_cifar100_train(tmp_path, fake_torchvision):
    written = {}
    fake = fake_torchvision("CIFAR100", lambda root: written.update(_write_cifar100_python(root)))

    dataset = load_cifar("cifar100", tmp_path, split="train", download=True)

    assert fake.calls == [{"root": str(tmp_path), "train": True, "download": True}]
    assert dataset.labels.tolist() == written["train"][b"fine_labels"]


def test_download_skipped_when_data_present(tmp_path, fake_torchvision):
    _write_cifar10_python(tmp_path)

    def fail(root):
        raise AssertionError("download must not run when the data is on disk")

    fake = fake_torchvision("CIFAR10", fail)

    dataset = load_cifar("cifar10", tmp_path, split="train", download=True)

    assert len(dataset) == 20
    assert fake.calls == []


def test_download_failure_is_dataset_not_found(tmp_path, fake_torchvision):
    def fail(root):
        raise OSError("connection refused")

    fake_torchvision("CIFAR10", fail)

    with pytest.raises(DatasetNotFoundError, match="connection refused") as excinfo:
        load_cifar("cifar10", tmp_path, split="train", download=True)

    assert isinstance(excinfo.value.__cause__, OSError)
    assert "cifar-10-batches-py" in str(excinfo.value)


def test_download_without_folder_raises(tmp_path, fake_torchvision):
    fake_torchvision("CIFAR10", lambda root: None)

    with pytest.raises(DatasetNotFoundError, match="no test files were found") as excinfo:
        load_cifar("cifar10", tmp_path, split="test", download=True)

    assert str(tmp_path / "cifar-10-batches-py") in str(excinfo.value)


# ---------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"name": "mnist", "split": "train"}, r"name must be one of 'cifar10', 'cifar100', got 'mnist'"),
        ({"name": "cifar10", "split": "val"}, r"split must be one of 'train', 'test', got 'val'"),
    ],
)
def test_load_cifar_rejects_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_cifar(kwargs["name"], tmp_path, split=kwargs["split"])


def test_image_dataset_validates_fields():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="torch.uint8"):
        ImageDataset(images.float(), torch.zeros(2, dtype=torch.int64), 10, "x")
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(images, torch.zeros(2, dtype=torch.int32), 10, "x")
    with pytest.raises(ValueError, match="must have the same length"):
        ImageDataset(images, torch.zeros(3, dtype=torch.int64), 10, "x")
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        ImageDataset(images, torch.tensor([0, 10]), 10, "x")
    with pytest.raises(ValueError, match="contiguous"):
        ImageDataset(images.transpose(2, 3), torch.zeros(2, dtype=torch.int64), 10, "x")
    assert len(ImageDataset(images, torch.tensor([0, 9]), 10, "x")) == 2


# ---------------------------------------------------------------------------
# class_balanced_subset


def test_subset_real_data_is_balanced(real_train):
    subset = class_balanced_subset(real_train, 1_000, seed=0)

    assert len(subset) == 1_000
    assert torch.bincount(subset.labels, minlength=10).tolist() == [100] * 10
    assert subset.images.shape == (1_000, 3, 32, 32)
    assert subset.images.is_contiguous()
    assert subset.num_classes == 10
    assert subset.name == "cifar10"
    # Rows come back shuffled, not grouped by class.
    assert not torch.all(subset.labels[1:] >= subset.labels[:-1])


def test_subset_remainder_spread(real_train):
    counts = torch.bincount(class_balanced_subset(real_train, 1_005, seed=3).labels, minlength=10)

    assert sorted(counts.tolist()) == [100] * 5 + [101] * 5


def test_subset_rows_match_source():
    dataset = _index_dataset(300, num_classes=300)
    # Ten classes of 30 rows each, class-sorted like the real files.
    dataset = ImageDataset(dataset.images, torch.arange(300) // 30, 10, "sorted")

    subset = class_balanced_subset(dataset, 57, seed=11)

    # Find the source row of every subset image by its pixels.
    flat_source = dataset.images.view(300, -1)
    source_rows = [
        int(torch.nonzero((flat_source == image.view(1, -1)).all(dim=1))[0])
        for image in subset.images
    ]
    assert len(set(source_rows)) == 57
    assert subset.labels.tolist() == [row // 30 for row in source_rows]
    assert sorted(torch.bincount(subset.labels, minlength=10).tolist()) == [5] * 3 + [6] * 7


def test_subset_deterministic_per_seed():
    dataset = ImageDataset(_index_dataset(200).images, torch.arange(200) % 10, 10, "x")

    first = class_balanced_subset(dataset, 50, seed=5)
    again = class_balanced_subset(dataset, 50, seed=5)
    other = class_balanced_subset(dataset, 50, seed=6)

    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_subset_full_size_returns_dataset():
    dataset = ImageDataset(_index_dataset(20).images, torch.arange(20) % 4, 4, "x")

    assert class_balanced_subset(dataset, 20, seed=0) is dataset


@pytest.mark.parametrize(
    "size, seed, pattern",
    [
        (21, 0, r"size must be in \[1, 20\].*got 21"),
        (0, 0, "size must be an integer >= 1, got 0"),
        (-3, 0, "size must be an integer >= 1, got -3"),
        (2.5, 0, "size must be an integer >= 1, got 2.5"),
        (True, 0, "size must be an integer >= 1, got True"),
        (8, -1, "seed must be an integer >= 0, got -1"),
    ],
)
def test_subset_rejects_bad_arguments(size, seed, pattern):
    dataset = ImageDataset(_index_dataset(20).images, torch.arange(20) % 4, 4, "x")

    with pytest.raises(ValueError, match=pattern):
        class_balanced_subset(dataset, size, seed=seed)


def test_subset_rejects_short_class():
    # Class 0 has 2 images, and size 12 over 3 classes needs 4 of each.
    labels = torch.tensor([0, 0] + [1] * 9 + [2] * 9)
    dataset = ImageDataset(_index_dataset(20).images, labels, 3, "x")

    with pytest.raises(ValueError, match="needs 4 images of class 0, but the dataset has only 2"):
        class_balanced_subset(dataset, 12, seed=0)


# ---------------------------------------------------------------------------
# Augmentation and normalisation


def _coordinate_images(count: int) -> torch.Tensor:
    """Images whose channel 0 is the row number and channel 1 the column number."""
    rows = torch.arange(32, dtype=torch.uint8).view(32, 1).expand(32, 32)
    cols = torch.arange(32, dtype=torch.uint8).view(1, 32).expand(32, 32)
    image = torch.stack([rows, cols, torch.zeros(32, 32, dtype=torch.uint8)])
    return image.expand(count, 3, 32, 32).contiguous()


def _reflect_by_hand(position: int, size: int = 32) -> int:
    if position < 0:
        return -position
    if position > size - 1:
        return 2 * (size - 1) - position
    return position


def test_augment_matches_hand_reflection():
    out = augment_batch(_coordinate_images(2_000), torch.Generator().manual_seed(0))

    offsets_seen = set()
    flips = 0
    for image in out:
        source_rows = image[0, :, 0].tolist()
        source_cols = image[1, 0, :].tolist()
        # Every row of the crop has the same source columns, and vice versa.
        assert torch.equal(image[0], image[0, :, :1].expand(32, 32))
        assert torch.equal(image[1], image[1, :1, :].expand(32, 32))
        row_offset = next(
            o for o in range(9) if source_rows == [_reflect_by_hand(o + i - 4) for i in range(32)]
        )
        matches = [
            (o, flipped)
            for o in range(9)
            for flipped in (False, True)
            if source_cols
            == [_reflect_by_hand(o + j - 4) for j in (range(31, -1, -1) if flipped else range(32))]
        ]
        assert len(matches) == 1, source_cols
        col_offset, flipped = matches[0]
        offsets_seen.add((row_offset, col_offset))
        flips += flipped

    assert len(offsets_seen) == 81
    assert 850 < flips < 1_150  # Binomial(2000, 0.5) has std 22.


def test_augment_equals_crop_of_padded_input():
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")

    out = augment_batch(images, torch.Generator().manual_seed(2)).float()

    assert out.shape == images.shape
    for n in range(len(images)):
        candidates = [
            crop.flip(-1) if flipped else crop
            for dy in range(9)
            for dx in range(9)
            for crop in [padded[n, :, dy : dy + 32, dx : dx + 32]]
            for flipped in (False, True)
        ]
        assert sum(torch.equal(out[n], candidate) for candidate in candidates) == 1, n


def test_augment_deterministic_per_seed():
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)

    first = augment_batch(images, torch.Generator().manual_seed(9))
    again = augment_batch(images, torch.Generator().manual_seed(9))
    other = augment_batch(images, torch.Generator().manual_seed(10))

    assert first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_augment_keeps_float_dtype():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    out = augment_batch(images, torch.Generator().manual_seed(0), padding=2)

    assert out.dtype == torch.float32
    assert out.shape == (4, 3, 8, 8)


def test_augment_rejects_bad_arguments():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="4-D tensor"):
        augment_batch(torch.zeros(3, 32, 32, dtype=torch.uint8), generator)
    with pytest.raises(ValueError, match=r"padding must be in \[0, 7\].*got 8"):
        augment_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), generator, padding=8)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        augment_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)


def test_normalize_matches_formula():
    images = torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(4),
                           dtype=torch.uint8)

    out = normalize_batch(images, CIFAR10_MEAN, CIFAR10_STD)

    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean.double()) / std.double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # Spot check one value: pixel 255 in the blue channel.
    single = normalize_batch(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert single[0, 2, 0, 0].item() == pytest.approx((1 - 0.4465) / 0.2616, abs=1e-6)


def test_normalize_rejects_bad_arguments():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="torch.uint8"):
        normalize_batch(images.float())
    with pytest.raises(ValueError, match="mean must have 3 values"):
        normalize_batch(images, (0.5,), CIFAR10_STD)
    with pytest.raises(ValueError, match="std must contain only values > 0"):
        normalize_batch(images, CIFAR10_MEAN, (0.2, 0.0, 0.2))


# ---------------------------------------------------------------------------
# BatchLoader


def _epoch_rows(loader: BatchLoader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_train_loader_batches_and_coverage():
    dataset = _index_dataset(1_000)
    loader = BatchLoader(dataset, 128, shuffle=True, augment=True, drop_last=True, seed=0)

    batches = list(loader)

    assert len(loader) == 7
    assert len(batches) == 7
    for images, labels in batches:
        assert images.shape == (128, 3, 32, 32)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert images.device.type == "cpu"
    rows = torch.cat([labels for _, labels in batches])
    assert len(set(rows.tolist())) == 896
    assert rows.tolist() != sorted(rows.tolist())


def test_train_loader_covers_each_row_once():
    loader = BatchLoader(_index_dataset(1_000), 128, shuffle=True, augment=True, drop_last=False,
                         seed=1)

    rows = sum(_epoch_rows(loader), [])

    assert len(loader) == 8
    assert sorted(rows) == list(range(1_000))


def test_test_loader_keeps_order_and_last_batch(real_test):
    loader = BatchLoader(real_test, 384, shuffle=False, augment=False, drop_last=False, seed=0)

    batches = list(loader)

    assert len(loader) == 27
    assert [len(labels) for _, labels in batches] == [384] * 26 + [16]
    assert torch.equal(torch.cat([labels for _, labels in batches]), real_test.labels)
    assert torch.equal(batches[0][0], normalize_batch(real_test.images[:384]))
    assert torch.equal(batches[-1][0], normalize_batch(real_test.images[-16:]))


def test_loader_epochs_differ_and_repeat():
    dataset = _index_dataset(500)
    loader = BatchLoader(dataset, 100, shuffle=True, augment=True, drop_last=True, seed=3)

    epoch0 = list(loader)
    epoch0_again = list(loader)
    loader.set_epoch(1)
    epoch1 = list(loader)

    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch0, epoch0_again))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch0_again))
    assert [b[1].tolist() for b in epoch0] != [b[1].tolist() for b in epoch1]


def test_loader_resume_matches_uninterrupted():
    dataset = _index_dataset(300)

    def make_loader(seed: int) -> BatchLoader:
        return BatchLoader(dataset, 64, shuffle=True, augment=True, drop_last=True, seed=seed)

    uninterrupted = make_loader(seed=4)
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        expected = list(uninterrupted)

    resumed = make_loader(seed=4)
    resumed.set_epoch(2)
    actual = list(resumed)
    other_seed = make_loader(seed=5)
    other_seed.set_epoch(2)

    assert len(actual) == len(expected) == 4
    for (images, labels), (expected_images, expected_labels) in zip(actual, expected):
        assert torch.equal(labels, expected_labels)
        assert torch.equal(images, expected_images)
    assert _epoch_rows(other_seed) != [labels.tolist() for _, labels in expected]


def test_loader_augmented_batch_is_crop_of_source():
    dataset = _index_dataset(40)
    loader = BatchLoader(dataset, 40, shuffle=True, augment=True, drop_last=True, seed=6)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    images, labels = next(iter(loader))

    pixels = (images * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    pixels = pixels.round().to(torch.uint8)
    padded = F.pad(dataset.images[labels].float(), (4, 4, 4, 4), mode="reflect")
    flipped_count = 0
    for n in range(len(labels)):
        matches = [
            (dy, dx, flipped)
            for dy in range(9)
            for dx in range(9)
            for flipped in (False, True)
            if torch.equal(
                pixels[n].float(),
                padded[n, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flipped
                else padded[n, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert len(matches) == 1, n
        flipped_count += matches[0][2]
    assert 0 < flipped_count < len(labels)


def test_loader_without_augment_is_exact():
    dataset = _index_dataset(50)
    loader = BatchLoader(dataset, 50, shuffle=True, augment=False, drop_last=False, seed=0)

    images, labels = next(iter(loader))

    assert torch.equal(images, normalize_batch(dataset.images[labels]))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 11, "drop_last": True}, r"batch_size must be in \[1, 10\].*got 11"),
        ({"seed": -2}, "seed must be an integer >= 0, got -2"),
        ({"pin_memory": True}, "pin_memory=True needs a CUDA device"),
        ({"mean": (0.5, 0.5)}, "mean and std must have 3 values"),
        ({"std": (0.2, 0.2, -1.0)}, "std must contain only values > 0"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, pattern):
    arguments = {"batch_size": 4, "shuffle": True, "augment": True, "drop_last": False, "seed": 0}
    arguments.update(kwargs)
    batch_size = arguments.pop("batch_size")

    with pytest.raises(ValueError, match=pattern):
        BatchLoader(_index_dataset(10), batch_size, **arguments)


def test_loader_set_epoch_rejects_negative():
    loader = BatchLoader(_index_dataset(10), 4, shuffle=True, augment=False, drop_last=False,
                         seed=0)

    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        loader.set_epoch(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_cuda_matches_cpu():
    dataset = _index_dataset(300)
    arguments = {"shuffle": True, "augment": True, "drop_last": False, "seed": 8}
    cpu_loader = BatchLoader(dataset, 128, device="cpu", **arguments)
    cuda_loader = BatchLoader(dataset, 128, device="cuda", **arguments)

    assert cuda_loader.pin_memory
    for (cpu_images, cpu_labels), (cuda_images, cuda_labels) in zip(cpu_loader, cuda_loader):
        assert cuda_images.device.type == "cuda"
        assert cuda_labels.device.type == "cuda"
        assert torch.equal(cuda_labels.cpu(), cpu_labels)
        torch.testing.assert_close(cuda_images.cpu(), cpu_images, rtol=0, atol=1e-6)


def test_module_exports_public_names():
    assert set(data.__all__) >= {
        "BatchLoader", "DatasetNotFoundError", "ImageDataset", "augment_batch",
        "class_balanced_subset", "load_cifar", "normalize_batch", "resolve_data_dir",
    }
