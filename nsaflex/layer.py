"""A self-contained sparse attention layer for new models: projections, gate
network, rotary embedding and a compiled pattern in one ``nn.Module``.

:class:`SparseAttentionLayer` offers what fla's ``NativeSparseAttention`` layer
offers (q/k/v/o projections, GQA, per-head branch gates, RoPE), with the
branches, pooling, selection rule and gate kind taken from a pattern, so a
pattern can be trained from scratch in any model. For hidden states
``x [B, L, hidden]``::

    q = rope(x W_q^T + b_q)   viewed [B, Hq, L, D]
    k = rope(x W_k^T + b_k)   viewed [B, Hkv, L, D]
    v = x W_v^T + b_v         viewed [B, Hkv, L, D]
    g = GateNetwork(x)        [B, Hq, L, nb]   (None for constant gates)
    o = attention(q, k, v, g, token_types)     [B, Hq, L, D]
    y = o' W_o^T + b_o        o' = o as [B, L, Hq * D];  y [B, L, hidden]

``attention`` is ``nsaflex.compile(pattern, backend, layer=layer_idx)``: it
holds the compression MLP of ``pooling: mlp``, which trains with the rest.
``nb`` is the number of branches of the layer's *resolved* pattern (per-layer
overrides applied): see ``docs/layer.md``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from nsaflex.errors import InputError
from nsaflex.gates import GateNetwork, gate_for_pattern
from nsaflex.loader import load_pattern
from nsaflex.runtime import CompiledAttention, compile
from nsaflex.spec import Model, Pattern


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``cos, sin`` ``[B, 1, L, D]`` for positions ``[B, L]``.

    Frequency ``j`` of ``D / 2`` is ``theta ** (-2j / D)``; the angle of position
    ``p`` is ``p * theta ** (-2j / D)``, repeated for both halves of the head
    (the rotate-half convention of Llama, Qwen and fla). Computed in float32
    (float64 for float64 inputs): positions of long sequences lose their last
    digits in half precision.
    """
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, dtype=table_dtype, device=position_ids.device) / head_dim
    inverse_frequencies = theta ** (-exponents)  # [D/2]
    angles = position_ids.to(table_dtype)[..., None] * inverse_frequencies  # [B, L, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, L, D]``: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half([a, b]) = [-b, a]`` (halves of the head dim)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _positive_int(argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(argument, "an integer >= 1", value)
    return value


class SparseAttentionLayer(nn.Module):
    """``layer(hidden_states [B, L, hidden], token_types=None, position_ids=None)
    -> [B, L, hidden]``: one attention layer running a sparse-attention pattern.

    Args:
        pattern: a :class:`~nsaflex.spec.Pattern`, a pattern file or a bundled
            pattern name. Its ``model`` section is replaced by this layer's
            shape (heads, kv heads, head dim, hidden size; no layer count), so
            a pattern written for one model serves any.
        hidden_size: width of the hidden state.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (a divisor of ``Hq``; default ``Hq``).
        head_dim: ``D`` (default ``hidden_size // num_heads``, which must then divide).
        qkv_bias: biases on the q, k and v projections (Qwen: True).
        o_bias: a bias on the output projection.
        rope_theta: RoPE base; ``None`` for no rotary embedding.
        backend: ``auto``, ``reference``, ``flex`` or ``triton`` (see
            :func:`nsaflex.compile`).
        layer_idx: the decoder layer this is, for the pattern's per-layer
            overrides; required when the pattern has overrides.
        deterministic: bit-reproducible gradients (see :func:`nsaflex.compile`).
        init_std: standard deviation of the initial projection and gate weights
            (biases start at zero, the gate's last bias at the pattern's ``gate.bias``).
        device, dtype: of the parameters; ``device`` also chooses the backend
            for ``auto`` (default: CUDA when available).

    Attributes:
        q_proj, k_proj, v_proj, o_proj: the projections.
        gate: the :class:`~nsaflex.gates.GateNetwork` of the layer's resolved
            pattern (``nb`` branches), or ``None`` for constant gates and dense layers.
        attention: the :class:`~nsaflex.runtime.CompiledAttention` (holds the
            compression MLP of ``pooling: mlp``).
        pattern: the layer's resolved pattern (overrides applied).

    Forward: ``token_types`` ``[B, L]`` (0 text, 1 vision) for hybrid patterns;
    ``position_ids`` ``[B, L]`` or ``[L]`` for RoPE (default ``0 .. L-1``).
    Sequences are unpadded and there is no KV cache: prefill and training.
    """

    def __init__(
        self,
        pattern: Pattern | str | os.PathLike[str],
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        rope_theta: float | None = 10000.0,
        backend: str = "auto",
        layer_idx: int | None = None,
        deterministic: bool = True,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_size = _positive_int("hidden_size", hidden_size)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise InputError("num_kv_heads", f"a divisor of num_heads = {num_heads}", num_kv_heads)
        if head_dim is None:
            if hidden_size % num_heads:
                raise InputError(
                    "hidden_size", f"a multiple of num_heads = {num_heads} (or an explicit head_dim)", hidden_size
                )
            head_dim = hidden_size // num_heads
        head_dim = _positive_int("head_dim", head_dim)
        if rope_theta is not None:
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
                raise InputError("rope_theta", "a number > 0, or None for no rotary embedding", rope_theta)
            if head_dim % 2:
                raise InputError("head_dim", "an even head dim (RoPE rotates pairs; rope_theta=None turns it off)", head_dim)
        for argument, flag in (("qkv_bias", qkv_bias), ("o_bias", o_bias)):
            if not isinstance(flag, bool):
                raise InputError(argument, "True or False", flag)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
            raise InputError("init_std", "a number > 0", init_std)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError("dtype", "a floating torch dtype (torch.float32, torch.bfloat16, ...) or None", dtype)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                raise InputError("device", "a torch device ('cpu', 'cuda', 'cuda:1', ...) or None", device) from None

        base = pattern if isinstance(pattern, Pattern) else load_pattern(pattern)
        base = self._sized(base, hidden_size, num_heads, num_kv_heads, head_dim)
        if layer_idx is None and base.layers:
            overridden = sorted({index for override in base.layers for index in override.at})
            raise InputError(
                "layer_idx",
                f"a decoder layer index: pattern {base.name!r} has per-layer overrides (at layers {overridden})",
                None,
            )
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise InputError("layer_idx", "an integer >= 0", layer_idx)

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.layer_idx = layer_idx
        self.init_std = init_std
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias, **factory)
        self.attention: CompiledAttention = compile(
            base,
            backend,
            layer=layer_idx,
            device=None if device is None else device.type,
            head_dim=head_dim,
            deterministic=deterministic,
        )
        self.attention.to(**factory)
        self.pattern: Pattern = self.attention.pattern
        # Constant gates have no parameters: the compiled attention reads them from the pattern.
        self.gate: GateNetwork | None = None
        if self.pattern.gate.kind != "constant":
            self.gate = gate_for_pattern(self.pattern, hidden_size, num_heads, init_std=init_std, **factory)
        self.reset_parameters()

    @staticmethod
    def _sized(pattern: Pattern, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> Pattern:
        """The pattern with its ``model`` section describing this layer. The layer
        count is left open: a layer does not know its model's depth (overrides
        at indices past it simply never apply)."""
        model = Model(query_heads=num_heads, kv_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size)
        return dataclasses.replace(pattern, model=model)

    @property
    def branches(self) -> tuple[str, ...]:
        """The layer's branches, in gate-column order (empty for a dense layer)."""
        return self.pattern.branches

    def reset_parameters(self) -> None:
        """Projection weights normal(0, ``init_std``), biases zero; the gate network
        and compression MLP re-initialised their own way."""
        with torch.no_grad():
            for projection in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                if projection.weight.device.type == "meta":
                    continue
                projection.weight.normal_(0.0, self.init_std)
                if projection.bias is not None:
                    projection.bias.zero_()
        if self.gate is not None:
            self.gate.reset_parameters()
        if self.attention.pooler is not None:
            self.attention.pooler.reset_parameters()

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_types: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, L, hidden]`` of ``hidden_states`` ``[B, L, hidden]``."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            found = list(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            raise InputError("hidden_states", f"a tensor [B, L, {self.hidden_size}]", found)
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rotary_cos_sin(self._positions(position_ids, batch, length, hidden_states.device),
                                      self.head_dim, self.rope_theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif position_ids is not None:
            raise InputError("position_ids", "None: the layer has no rotary embedding (rope_theta=None)", "a tensor")
        gates = self.gate(hidden_states) if self.gate is not None else None
        out = self.attention(q, k, v, gates, token_types)  # [B, Hq, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    @staticmethod
    def _positions(position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Positions ``[B, L]``: the given ``[B, L]`` or ``[L]`` tensor, or ``0 .. L-1``."""
        if position_ids is None:
            return torch.arange(length, device=device).expand(batch, length)
        if not isinstance(position_ids, torch.Tensor):
            raise InputError("position_ids", f"a tensor [{batch}, {length}] or [{length}]", type(position_ids).__name__)
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise InputError("position_ids", "an integer tensor", str(position_ids.dtype))
        if tuple(position_ids.shape) not in ((batch, length), (length,)):
            raise InputError("position_ids", f"shape [{batch}, {length}] or [{length}]", list(position_ids.shape))
        if position_ids.device != device:
            raise InputError("position_ids", f"device {device} (as hidden_states)", str(position_ids.device))
        return position_ids.expand(batch, length)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"rope_theta={self.rope_theta}, layer_idx={self.layer_idx}, branches={self.branches}"
        )
