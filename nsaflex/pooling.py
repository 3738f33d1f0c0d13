"""Compression pooling: blocks of keys/values to compressed tokens.

Layouts: ``x`` is ``[B, H, L, D]``; compressed tokens are ``[B, H, N, D]`` with
``N = (L - l) // d + 1`` complete blocks (0 when ``L < l``); token ``i`` pools
positions ``[i*d, i*d + l)``.

* mean: ``K_i = (1/l) * sum_{p<l} k[i*d + p]`` (VideoNSA, fla).
* mlp (NSA paper): ``K_i = W2 · gelu(W1 · flatten(k[i*d : i*d+l] + P) + b1) + b2``
  with learned intra-block position embeddings ``P`` ``[l, D]``; one MLP for keys
  and one for values, shared by all heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from nsaflex.errors import InputError, describe_value
from nsaflex.spec import Compression

#: Largest head dim the pooling MLP is built for. Attention heads in use are
#: 64 to 256 wide; the bound refuses a typo before it allocates
#: ``block * head_dim * hidden`` weights.
MAX_HEAD_DIM = 1024
#: Most weights one pooling MLP (keys or values) may hold: 2**28, 1 GiB in fp32.
MAX_POOLING_WEIGHTS = 2**28


def check_head_dim(head_dim: object, argument: str = "head_dim") -> int:
    """``head_dim`` if it is an int in ``[1, MAX_HEAD_DIM]`` (not a bool);
    InputError naming ``argument`` otherwise."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise InputError(argument, f"an int in [1, {MAX_HEAD_DIM}]", describe_value(head_dim))
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise InputError(argument, f"an int in [1, {MAX_HEAD_DIM}]", head_dim)
    return head_dim


def block_windows(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The compression blocks of ``x`` ``[B, H, L, D]`` as ``[B, H, N, l, D]``."""
    batch, heads, length, dim = x.shape
    if length < block:
        return x.new_zeros(batch, heads, 0, block, dim)
    # unfold over the sequence gives [B, H, N, D, l]; move l before D.
    return x.unfold(2, block, stride).transpose(-1, -2)


def mean_pool(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Mean of each compression block: ``[B, H, L, D] -> [B, H, N, D]``."""
    return block_windows(x, block, stride).mean(dim=-2)


def mlp_pool(
    x: torch.Tensor,
    block: int,
    stride: int,
    position: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: torch.Tensor,
    bias2: torch.Tensor,
) -> torch.Tensor:
    """MLP pooling (NSA Eq. 7): ``[B, H, L, D] -> [B, H, N, D]``.

    ``position`` ``[l, D]``, ``weight1`` ``[hidden, l*D]``, ``weight2`` ``[D, hidden]``.
    """
    windows = block_windows(x, block, stride) + position  # [B, H, N, l, D]
    flat = windows.flatten(-2)  # [B, H, N, l*D]
    return F.linear(F.gelu(F.linear(flat, weight1, bias1)), weight2, bias2)


class MLPPooling(nn.Module):
    """Learned compression of keys and values (``pooling: mlp``)."""

    def __init__(self, compression: Compression, head_dim: int, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        check_head_dim(head_dim)
        self.block = compression.block
        self.stride = compression.stride
        self.head_dim = head_dim
        hidden = compression.mlp_hidden or head_dim
        factory = {"dtype": dtype, "device": device}
        flat = compression.block * head_dim
        weights = (flat + 1) * hidden + (hidden + 1) * head_dim + flat
        if weights > MAX_POOLING_WEIGHTS:
            raise InputError(
                "compression",
                f"a pooling MLP of at most {MAX_POOLING_WEIGHTS} weights (block {compression.block} x head dim "
                f"{head_dim} x hidden {hidden})",
                weights,
            )
        for name in ("key", "value"):
            self.register_parameter(f"{name}_position", nn.Parameter(torch.zeros(compression.block, head_dim, **factory)))
            self.add_module(f"{name}_fc1", nn.Linear(flat, hidden, **factory))
            self.add_module(f"{name}_fc2", nn.Linear(hidden, head_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Start near mean pooling's scale so early training sees sensible keys.
        for name in ("key", "value"):
            nn.init.normal_(getattr(self, f"{name}_position"), std=0.02)
            getattr(self, f"{name}_fc1").reset_parameters()
            getattr(self, f"{name}_fc2").reset_parameters()

    def params(self, name: str, like: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(position, W1, b1, W2, b2) for ``name`` in {key, value}, cast (differentiably)
        to the dtype and device of ``like``: the float64 reference reuses these weights."""
        fc1, fc2 = getattr(self, f"{name}_fc1"), getattr(self, f"{name}_fc2")
        tensors = (getattr(self, f"{name}_position"), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if like is None:
            return tensors
        return tuple(t.to(dtype=like.dtype, device=like.device) for t in tensors)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys and values ``[B, Hkv, N, D]`` in the dtype and device of ``k``."""
        return (
            mlp_pool(k, self.block, self.stride, *self.params("key", k)),
            mlp_pool(v, self.block, self.stride, *self.params("value", v)),
        )


def compress(
    k: torch.Tensor, v: torch.Tensor, compression: Compression, pooler: MLPPooling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed keys and values ``[B, Hkv, N, D]`` of a pattern's compression section."""
    if compression.pooling == "mean":
        return mean_pool(k, compression.block, compression.stride), mean_pool(v, compression.block, compression.stride)
    if pooler is None:
        raise ValueError("mlp pooling needs its MLPPooling module")
    return pooler(k, v)


def compressed_counts(compression: Compression, lengths: torch.Tensor) -> torch.Tensor:
    """:meth:`Compression.num_tokens` of each of ``lengths`` (a device tensor, no
    read-back): ``max(0, floor((n - l) / d) + 1)``."""
    return torch.clamp(torch.div(lengths - compression.block, compression.stride, rounding_mode="floor") + 1, min=0)


def softmax_scale(head_dim: int) -> float:
    """The attention scale ``1/sqrt(D)`` used by every branch."""
    return 1.0 / math.sqrt(head_dim)
