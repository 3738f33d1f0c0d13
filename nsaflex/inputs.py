"""Checks on the tensors a compiled attention is called with.

Every backend calls :func:`check_inputs` before touching data, so a bad shape,
dtype, device, head count, gate or token-class tensor is refused with an
:class:`~nsaflex.errors.InputError` naming the argument, the expected and the
actual value, instead of an index error deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsaflex.errors import InputError
from nsaflex.spec import Pattern
from nsaflex.tensor_memo import remembered

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Shapes:
    """Sizes read off valid inputs."""

    batch: int
    query_heads: int
    kv_heads: int
    length: int
    head_dim: int

    @property
    def group(self) -> int:
        """G = Hq / Hkv: query heads per kv head."""
        return self.query_heads // self.kv_heads


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Elementwise whether ``x`` is inf or NaN, as ``isnan(x - x)``: two kernels
    where ``~torch.isfinite(x)`` launches five (the checks run on every call)."""
    return torch.isnan(x - x)


def value_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x``'s values in float32 (float64 for float64 inputs): one
    number that is inf or NaN wherever ``x`` holds one, with no bool tensor of
    ``x``'s size (a float32 overflow of finite values also reads as
    non-finite, which only sends a caller down its exact path)."""
    return x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(
    pattern: Pattern,
    q: object,
    k: object,
    v: object,
    gates: object = None,
    token_types: object = None,
    *,
    layer: int | None = None,
) -> Shapes:
    """Validate ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``, ``gates
    [B, Hq, L, nb]`` and ``token_types [B, L]`` for ``pattern`` (resolved for
    decoder layer ``layer`` when given, which error messages then name).

    Token classes are those ``mm_token_type_ids`` writes: 0 text, 1 image and
    2 video; images and video are both vision tokens."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise InputError(name, "a torch.Tensor", type(tensor).__name__)
        if tensor.dim() != 4:
            raise InputError(name, f"a 4-d tensor [B, {'Hq' if name == 'q' else 'Hkv'}, L, D]", _shape(tensor))
        if tensor.dtype not in FLOAT_DTYPES:
            raise InputError(name, "a floating dtype (float16, bfloat16, float32, float64)", str(tensor.dtype))
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    batch, query_heads, length, head_dim = q.shape
    if k.shape != v.shape:
        raise InputError("v", f"the shape of k {_shape(k)}", _shape(v))
    if k.shape[0] != batch:
        raise InputError("k", f"batch size {batch} (as q)", k.shape[0])
    if k.shape[2] != length:
        raise InputError("k", f"length {length} (as q)", k.shape[2])
    if k.shape[3] != head_dim:
        raise InputError("k", f"head dim {head_dim} (as q)", k.shape[3])
    kv_heads = k.shape[1]
    if kv_heads == 0 or query_heads % kv_heads:
        raise InputError("k", f"a number of kv heads dividing the {query_heads} query heads", kv_heads)
    if batch == 0 or query_heads == 0 or length == 0 or head_dim == 0:
        raise InputError("q", "non-empty batch, heads, length and head dim", _shape(q))
    if q.device.type not in ("cpu", "cuda"):
        raise InputError("q", "a cpu or cuda tensor", str(q.device))
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise InputError(name, f"dtype {q.dtype} (as q)", str(tensor.dtype))
        if tensor.device != q.device:
            raise InputError(name, f"device {q.device} (as q)", str(tensor.device))
    model = pattern.model
    if model.query_heads is not None and model.query_heads != query_heads:
        raise InputError("q", f"{model.query_heads} query heads (pattern model.query_heads)", query_heads)
    if model.kv_heads is not None and model.kv_heads != kv_heads:
        raise InputError("k", f"{model.kv_heads} kv heads (pattern model.kv_heads)", kv_heads)
    if model.head_dim is not None and model.head_dim != head_dim:
        raise InputError("q", f"head dim {model.head_dim} (pattern model.head_dim)", head_dim)

    branches = len(pattern.branches)
    if gates is not None:
        if not isinstance(gates, torch.Tensor):
            raise InputError("gates", "a torch.Tensor", type(gates).__name__)
        expected = (batch, query_heads, length, branches)
        if tuple(gates.shape) != expected:
            order = ", ".join(pattern.branches) or "none"
            # Per-layer overrides change the branch count, so say whose branches these are.
            owner = f"layer {layer}" if layer is not None else f"pattern {pattern.name!r}"
            found = _shape(gates) + (f" (width {gates.shape[-1]})" if gates.dim() else "")
            raise InputError(
                "gates",
                f"shape [{', '.join(map(str, expected))}] ([B, Hq, L, branches]; {owner} has {branches} "
                f"branch{'' if branches == 1 else 'es'}: {order}; per-layer overrides change the count)",
                found,
            )
        if not gates.is_floating_point():
            raise InputError("gates", "a floating dtype", str(gates.dtype))
        if gates.device != q.device:
            raise InputError("gates", f"device {q.device} (as q)", str(gates.device))
    elif branches and pattern.gate.kind != "constant":
        raise InputError("gates", f"a tensor [B, Hq, L, {branches}] for gate kind {pattern.gate.kind!r}", None)

    if pattern.hybrid is None:
        if token_types is not None:
            raise InputError("token_types", "None: the pattern has no hybrid section", _shape(token_types) if isinstance(token_types, torch.Tensor) else token_types)
    elif token_types is None:
        raise InputError("token_types", "a [B, L] tensor of token classes (0 text; 1 image or 2 video: vision) for a hybrid pattern", None)
    if token_types is not None:
        if not isinstance(token_types, torch.Tensor):
            raise InputError("token_types", "a torch.Tensor", type(token_types).__name__)
        if tuple(token_types.shape) != (batch, length):
            raise InputError("token_types", f"shape [{batch}, {length}] ([B, L])", _shape(token_types))
        if token_types.is_floating_point() or token_types.is_complex():
            raise InputError("token_types", "an integer or bool tensor", str(token_types.dtype))
        if token_types.device != q.device:
            raise InputError("token_types", f"device {q.device} (as q)", str(token_types.device))
        check_token_values(token_types)
    return Shapes(batch, query_heads, kv_heads, length, head_dim)


def check_token_values(token_types: torch.Tensor) -> None:
    """Refuse token classes other than 0, 1 and 2: one host read, once per
    unchanged GPU tensor (:mod:`nsaflex.tensor_memo`)."""
    remembered(token_types, "token classes are 0, 1 or 2", lambda: _check_token_values(token_types))


def _check_token_values(token_types: torch.Tensor) -> bool:
    unknown = (token_types < 0) | (token_types > 2)
    if token_types.numel() and bool(unknown.any()):
        raise InputError("token_types", "values 0 (text), 1 (image) or 2 (video)", token_types[unknown][0].item())
    return True


def resolve_gates(pattern: Pattern, gates: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Gate values ``[B, Hq, L, nb]``: the given tensor, or the pattern's constants."""
    if gates is not None:
        return gates
    batch, query_heads, length, _ = like.shape
    values = torch.tensor(pattern.gate.values or (), dtype=like.dtype, device=like.device)
    return values.expand(batch, query_heads, length, len(pattern.branches))
