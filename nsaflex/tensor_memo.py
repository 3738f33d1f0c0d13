"""Results read off a GPU tensor's values, reused while the tensor is unchanged.

Reading values on the host (``bool(t.all())``, ``t.tolist()``) synchronises
with the device: the host waits for every queued kernel, and the GPU then
idles while the host launches the next ones. A model hands the same token-type
tensor to every layer, so what is read off it (that its values are valid, the
sparse layout) is read once and remembered here.

An entry is reused only for the same tensor object (a weak reference, so a new
tensor at a recycled address does not match) at the same version counter, which
every in-place write bumps, also through views. Writes that bypass the counter
(``.data``, DLPack) are not seen. CPU tensors are never remembered: reading
them costs no synchronisation, and writes through ``.numpy()`` would not bump
the counter.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

_ENTRIES: dict[tuple[int, Hashable], tuple[weakref.ref, int, object]] = {}
_MAX_ENTRIES = 32


def cacheable(tensor: torch.Tensor) -> bool:
    """Whether results read off ``tensor`` are remembered (GPU tensors only)."""
    return tensor.device.type != "cpu"


def remembered(tensor: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned for ``(tensor, key)`` while ``tensor``
    has not been written since. An exception from ``compute`` is not remembered."""
    if not cacheable(tensor):
        return compute()
    slot = (id(tensor), key)
    entry = _ENTRIES.get(slot)
    if entry is not None and entry[0]() is tensor and entry[1] == tensor._version:
        return entry[2]  # type: ignore[return-value]
    value = compute()
    _ENTRIES.pop(slot, None)
    if len(_ENTRIES) >= _MAX_ENTRIES:
        _ENTRIES.pop(next(iter(_ENTRIES)))
    # The entry goes when the tensor does, so no layout outlives its token types.
    _ENTRIES[slot] = (weakref.ref(tensor, lambda _dead, slot=slot: _ENTRIES.pop(slot, None)), tensor._version, value)
    return value
