"""Atomic file writes and the JSON-lines metrics log of a run folder.

A crash or a kill at any moment leaves either the previous or the new version of a
checkpoint or summary, never a partial file. Each write goes to a temporary file in the
same folder, is flushed to disk, and then replaces the target with ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List

import torch


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file readable by its owner only; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        with os.fdopen(descriptor, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is never left half-written."""
    _write_atomic(Path(path), lambda handle: torch.save(state, handle), "wb")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    NOTE: ``weights_only=False`` unpickles arbitrary objects (the generator states and
    the config), so load only checkpoints you wrote yourself.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch.load raises several types for a damaged file
        raise ValueError(
            f"Invalid checkpoint {path}: it cannot be read ({type(error).__name__}: {error}). "
            "Delete it to start the run again, or choose another --out."
        ) from error


def to_json_value(value: Any) -> Any:
    """Replace NaN and infinities by None so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented strict JSON, atomically."""
    text = json.dumps(to_json_value(value), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _write_atomic(Path(path), lambda handle: handle.write(text), "w")


class MetricsLog:
    """An append-only JSON-lines file, one record per line, flushed after every write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._handle.write(json.dumps(to_json_value(record), allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> List[Dict[str, Any]]:
    """Read every record of a JSON-lines metrics file; a torn last line is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # Only the last line can be torn by a kill during a write.
                continue
    return records


def truncate_metrics(path: str | Path, keep: Callable[[Dict[str, Any]], bool]) -> None:
    """Rewrite the metrics file with only the records for which ``keep`` is true.

    A resumed run calls this to drop the records of the epoch that was interrupted,
    which it then trains again.
    """
    path = Path(path)
    if not path.exists():
        return
    kept_records: Iterable[Dict[str, Any]] = [record for record in read_metrics(path) if keep(record)]
    text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in kept_records)
    _write_atomic(path, lambda handle: handle.write(text), "w")
