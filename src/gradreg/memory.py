"""Peak tensor memory of a block of code, measured on any device.

``torch.cuda.max_memory_allocated`` reports the peak memory of a step on CUDA only.
:class:`TensorMemoryTracker` measures it on every device, the CPU included, from the
tensors that operators create: it is a ``TorchDispatchMode`` (the
mechanism of ``torch.utils._python_dispatch``) that counts the bytes of each new
storage until the storage is freed. The GR benchmarks and tests use it to check the
memory target (at most one extra copy of the parameters) without a GPU.

Example:
    >>> model = torch.nn.Linear(64, 64)
    >>> with TensorMemoryTracker() as tracker:
    ...     model(torch.randn(8, 64)).sum().backward()
    >>> tracker.peak_bytes >= 64 * 64 * 4  # the weight's gradient was created inside
    True
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Track the bytes of the tensor storages created inside the context.

    A storage is counted from the operator that allocates it until it is freed. Results
    that the operator's schema marks as aliases of an input (views, in-place and
    ``out=`` operators) add nothing. :attr:`peak_bytes` is the largest total
    reached inside the context and :attr:`live_bytes` the total still alive.

    Storages that existed before the context are not subtracted when they are freed
    inside it. Free them before entering (for example with ``zero_grad()``), so that
    the peak is not overstated. The dispatch mode follows the autograd engine into backward passes run
    from the same thread. Memory that operators allocate and free internally
    (workspaces) is not counted, but on CUDA ``torch.cuda.max_memory_allocated``
    includes it.

    NOTE: tensors made without an operator, such as ``torch.tensor([...])`` from Python
    data and ``torch.from_numpy``, are not seen, and a storage that grows in place
    (``resize_``) keeps the size it had when it was first counted.

    Args:
        device: count only storages on this device: a ``torch.device`` or a string such
            as ``"cpu"``, ``"cuda"`` (every CUDA device) or ``"cuda:1"``. ``None``
            counts every device.
    """

    def __init__(self, device: "Optional[str | torch.device]" = None) -> None:
        super().__init__()
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"Invalid device: {device!r}. Use a torch.device or a string such as 'cpu', 'cuda' or 'cuda:0', "
                    "or None for every device."
                ) from error
        self.device: Optional[torch.device] = device
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: Dict[int, int] = {}
        self._references: Dict[int, Any] = {}
        self._lock = threading.Lock()

    def reset_peak(self) -> None:
        """Set :attr:`peak_bytes` to the bytes alive now."""
        self.peak_bytes = self.live_bytes

    def _release(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._sizes.pop(key, 0)
            self._references.pop(key, None)

    def _record(self, tensor: torch.Tensor) -> None:
        if self.device is not None and (
            tensor.device.type != self.device.type
            or (self.device.index is not None and tensor.device.index != self.device.index)
        ):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        with self._lock:
            if key in self._sizes:
                return
            self._sizes[key] = storage.nbytes()
            self._references[key] = weakref.ref(storage, lambda _, key=key: self._release(key))
            self.live_bytes += self._sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if _returns_new_storage(func):
            for value in tree_flatten(output)[0]:
                if isinstance(value, torch.Tensor) and not value.is_meta and value.layout == torch.strided:
                    self._record(value)
        return output


def _returns_new_storage(func: Any) -> bool:
    """Return True unless the operator's schema marks a result as an alias of an input.

    Views (``t``, ``view``), in-place operators (``add_``) and ``out=`` variants return
    storages that already exist, which may predate the tracker.
    """
    schema = getattr(func, "_schema", None)
    if schema is None:
        return True
    return all(result.alias_info is None for result in schema.returns)
