"""What the adapter itself allocates and keeps for the backward in one patched
decoder layer, around the kernels: the gate network, token-class packing, the
dense text path and unpacking (everything between the q/k/v projections and
o_proj that is not the sparse kernels).

Counted on the CPU, per aten op (a ``TorchDispatchMode`` sees every tensor an op
allocates) and per tensor saved for the backward (``saved_tensors_hooks``), in a
model of the 7B's GQA shape (7 query heads per kv head), and bounded by
formulas in the layer's shape: one more materialised ``[B, Hq, L, D]`` tensor, a
gather that keeps all of q for the backward, the text mask kept once per head of
a group or the gate's GELU output kept beside its input fails them. (Bytes, not
timings: at 128K tokens one ``[B, Hq, L, D]`` bf16 tensor is 0.9 GB, about
0.3 ms of an H100's memory bandwidth each time it is written.)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nsaflex.adapters import qwen2_5_vl as adapter_module
from nsaflex.gates import GateNetwork
from tests.adapter_support import make_batch, position_ids_from_mask, randomise_gates, small_pattern, tiny_model

HEADS, KV_HEADS, HIDDEN = 14, 2, 224  # head dim 16, 7 query heads per kv head (as 28 / 4)
LENGTH = 96
# Two rows: vision spans of different lengths (packed with cu_seqlens), few text tokens (as in video inputs).
SPANS, LENGTHS = [[(2, 94)], [(3, 47), (48, 94)]], [LENGTH, LENGTH]


@dataclass
class Ledger:
    """Bytes of fresh storages per region (forward) and of tensors saved for the
    backward per region; ``full``: storages at least ``full_bytes`` large."""

    full_bytes: int
    allocated: dict[str, int] = field(default_factory=dict)
    full: dict[str, list[str]] = field(default_factory=dict)
    saved: dict[str, int] = field(default_factory=dict)


class _Regions:
    """Which part of the layer runs: 'adapter' (the adapter's attention call),
    'gates' (the gate network inside it), 'kernel' (the sparse kernels), or None."""

    def __init__(self) -> None:
        self.stack: list[str | None] = [None]

    @contextlib.contextmanager
    def inside(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    def wrap(self, name: str, function):
        def wrapped(*args, **kwargs):
            with self.inside(name):
                return function(*args, **kwargs)

        return wrapped


class _Allocations(TorchDispatchMode):
    """Fresh storages made by each aten op, by region."""

    def __init__(self, regions: _Regions, ledger: Ledger) -> None:
        super().__init__()
        self.regions, self.ledger = regions, ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        region = self.regions.stack[-1]
        if region is None:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue  # a view, or an op writing into its input
            self.ledger.allocated[region] = self.ledger.allocated.get(region, 0) + storage.nbytes()
            if storage.nbytes() >= self.ledger.full_bytes:
                self.ledger.full.setdefault(region, []).append(func.overloadpacket.__name__)
        return out


def measure(monkeypatch) -> tuple[Ledger, dict[str, int]]:
    """A forward and backward of a one-layer patched model (triton backend): the
    forward's ledger and the sizes its formulas take."""
    from nsaflex.kernels import ops

    model = tiny_model(layers=1, heads=HEADS, kv_heads=KV_HEADS, hidden=HIDDEN)
    adapter = adapter_module.apply(model, small_pattern(), backend="triton")
    randomise_gates(adapter, seed=3)
    ids, mask, mm = make_batch(SPANS, LENGTHS, LENGTH)
    batch, head_dim = len(LENGTHS), HIDDEN // HEADS
    vision = int((mm != 0).sum())
    text = int((mm == 0).sum(dim=1).max())
    sizes = dict(B=batch, L=LENGTH, Hq=HEADS, Hkv=KV_HEADS, D=head_dim, G=HEADS // KV_HEADS, hidden=HIDDEN,
                 nb=len(small_pattern().branches), N=vision, Nt=text, e=4)
    ledger = Ledger(full_bytes=batch * HEADS * LENGTH * head_dim * 4)
    regions = _Regions()
    monkeypatch.setattr(adapter_module.Qwen25VLAdapter, "_attend",
                        regions.wrap("adapter", adapter_module.Qwen25VLAdapter._attend))
    monkeypatch.setattr(GateNetwork, "forward", regions.wrap("gates", GateNetwork.forward))
    monkeypatch.setattr(ops, "nsa_attention", regions.wrap("kernel", ops.nsa_attention))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_storages: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        region, key = regions.stack[-1], tensor.untyped_storage().data_ptr()
        if region is not None and key not in parameters and key not in saved_storages:
            saved_storages.add(key)
            ledger.saved[region] = ledger.saved.get(region, 0) + tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with _Allocations(regions, ledger), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.model(input_ids=ids, mm_token_type_ids=mm, position_ids=position_ids_from_mask(mask))
    out.last_hidden_state.sum().backward()  # the layer's backward runs with what was kept
    return ledger, sizes


@pytest.fixture(scope="module")
def measured():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend on CPU runs under TRITON_INTERPRET=1")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return measure(monkeypatch)


def test_the_adapter_materialises_two_full_tensors(measured):
    """Outside the kernels and the gates, the adapter's forward makes two
    tensors of the size of q ``[B, Hq, L, D]``: the text path's output and the
    unpacked sparse output (which the text output is added into, laid out as
    the output projection reads it). Packing reads the sparse tokens in one
    indexing op each (``(Hq + 2 Hkv) N D + Hq N nb`` elements), and the text
    path works on its ``Nt`` queries: ``O(Nt L)`` for its mask and scores. A
    gather-then-mask packing, a ``where`` to combine or a copy to the model's
    layout each add at least one more full tensor."""
    ledger, s = measured
    assert len(ledger.full.get("adapter", [])) == 2, ledger.full  # the text output's zeros, the unpacked output
    packed = ((s["Hq"] + 2 * s["Hkv"]) * s["N"] * s["D"] + s["Hq"] * s["N"] * s["nb"]) * s["e"]
    compressed = 2 * 2 * s["Hkv"] * s["N"] * s["D"] * s["e"] // 4  # mean pooling (stride 4) per row, then joined
    text_queries = 5 * s["B"] * s["Hq"] * s["Nt"] * s["D"] * s["e"]  # gathered, folded, SDPA's out and lse, masked
    text_mask = (s["G"] * s["e"] + s["G"] + 4) * s["B"] * s["Nt"] * s["L"]  # comparisons, G repeats, SDPA's float mask
    indices = 8 * 16 * s["B"] * s["L"]  # layout and index tensors (int64)
    bound = packed + 2 * ledger.full_bytes + compressed + text_queries + text_mask + indices
    assert ledger.allocated["adapter"] <= bound, (ledger.allocated, bound)
    assert bound - (packed + 2 * ledger.full_bytes) < ledger.full_bytes  # the slack holds no third full tensor


def test_the_adapter_keeps_the_text_paths_inputs_for_the_backward(measured):
    """Outside the kernels (which keep their packed q, k, v and gates) and the
    gates, the backward keeps the text path's inputs: the kv heads' k and v
    ``[B, Hkv, L, D]``, the gathered text queries ``[B, Hq, Nt, D]`` and one
    boolean mask ``[B, Nt, L]`` (not its G repeats), plus index tensors (on
    CUDA, where SDPA's memory-efficient kernel serves, also the text
    attention's output and log-sum-exp, ``[B, Hq, Nt, D]`` and ``[B, Hq, Nt]``).
    Packing by gather would keep all of q ``[B, Hq, L, D]`` as well."""
    ledger, s = measured
    indices = 8 * 8 * s["B"] * s["L"]  # index tensors (int64) and small masks
    bound = ((2 * s["Hkv"] * s["L"] + s["Hq"] * s["Nt"]) * s["D"] * s["e"] + s["Nt"] * s["L"]) * s["B"] + indices
    assert ledger.saved["adapter"] <= bound, (ledger.saved, bound)
    assert indices < s["B"] * s["Hq"] * s["L"] * s["D"] * s["e"]  # the allowance cannot hide all of q


def test_the_gate_network_keeps_no_hidden_sized_activation(measured):
    """The ``mlp`` gate keeps only its input (the attention's input, which the
    q/k/v projections keep anyway): g_proj_1's and GELU's outputs ``[B, L,
    hidden]`` are recomputed in the backward. Plus the sigmoid's output
    ``[B, L, Hq, nb]``."""
    ledger, s = measured
    hidden_sized = s["B"] * s["L"] * s["hidden"] * s["e"]
    bound = hidden_sized + s["B"] * s["L"] * s["Hq"] * s["nb"] * s["e"]
    assert ledger.saved["gates"] <= bound, (ledger.saved, bound)
