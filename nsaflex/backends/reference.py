"""The reference backend: :func:`nsaflex.reference.reference_attention` (float64,
dense masks), cast back to the input dtype. Exact and slow: for tests, small
inputs and as the last resort of ``auto``."""

from __future__ import annotations

from typing import Any

import torch

from nsaflex.backends.base import BranchPlan
from nsaflex.decoding import check_step, extend_state, tiled, unsupported
from nsaflex.errors import InputError
from nsaflex.pooling import MLPPooling
from nsaflex.reference import reference_attention
from nsaflex.spec import Pattern


class ReferenceBackend:
    name = "reference"

    def unsupported(self, pattern: Pattern, device: str) -> str | None:
        return None

    def describe(self, pattern: Pattern, device: str) -> tuple[BranchPlan, ...]:
        mask = "dense [L, L] boolean mask per batch row, float64"
        if pattern.dense:
            return (BranchPlan("dense", self.name, "masked softmax (float64)", "causal " + mask),)
        plans = []
        for branch in pattern.branches:
            plans.append(BranchPlan(branch, self.name, "masked softmax (float64)", mask, _constants(pattern, branch)))
        if pattern.hybrid is not None:
            plans.append(BranchPlan("text", self.name, "masked softmax (float64)", "causal " + mask))
        return tuple(plans)

    def build(self, pattern: Pattern, plan: Any):
        def kernel(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            gates: torch.Tensor | None,
            token_types: torch.Tensor | None,
            pooler: MLPPooling | None,
            *,
            scale: float | None = None,
            info: dict | None = None,
        ) -> torch.Tensor:
            """``info``: a dict that receives :func:`reference_attention`'s
            ``return_branches`` values (moved to q's device, float64 kept)."""
            values = reference_attention(q, k, v, pattern, gates, token_types, pooler, scale=scale,
                                         return_branches=info is not None)
            if info is None:
                return values.to(dtype=q.dtype, device=q.device)
            info.update(_to_device(values, q.device))
            return values["out"].to(dtype=q.dtype, device=q.device)

        return kernel

    def describe_decode(self, pattern: Pattern, device: str) -> BranchPlan:
        if tiled(pattern):
            return BranchPlan("decode", self.name, "none: the exact decode refuses this pattern", "-",
                              notes=(_TILED_REASON,))
        return BranchPlan(
            "decode", self.name, "reference_attention (float64) on each row's real prefix, last row",
            "dense [n, n] masks per row and new token", {"rows": "one at a time", "new_tokens": "one at a time"},
            ("the specification decode is tested against; reads lengths back to the host",),
        )

    def build_decode(self, pattern: Pattern, plan: Any):
        def decode(q, k_cache, v_cache, lengths, state, gates, token_types, pooler, *, scale=None, has_text=True):
            """Each new query ``q [B, Hq, T, D]`` as the last row of
            :func:`reference_attention` on its row's real tokens up to its own
            slot (the state says which slots are real and which vision); only
            the last query's row is read, so earlier queries are zeros.
            ``has_text`` (a speed hint of the batched decode) changes nothing here."""
            reason = unsupported(pattern) or (_TILED_REASON if tiled(pattern) else None)
            if reason is not None:
                raise InputError("pattern", "a pattern the decode entry serves", reason)
            check_step(pattern, state, q, k_cache, v_cache, lengths, gates, token_types)
            batch, heads, new, dim = q.shape
            extend_state(state, pattern, k_cache, v_cache, lengths, new, token_types, pooler)
            out = torch.zeros(batch, heads, new, dim, dtype=torch.float64)
            ends = lengths.tolist()
            for b in range(batch):
                for i in range(new):
                    slot = ends[b] - new + i
                    real = torch.nonzero(state.real[b, : slot + 1]).flatten()
                    queries = q.new_zeros(1, heads, real.numel(), dim)
                    queries[0, :, -1] = q[b, :, i]
                    row_gates = None
                    if gates is not None:
                        row_gates = gates.new_zeros(1, heads, real.numel(), gates.shape[-1])
                        row_gates[0, :, -1] = gates[b, :, i]
                    types = state.vision[b, real].long()[None] if pattern.hybrid is not None else None
                    row = reference_attention(queries, k_cache[b : b + 1, :, real], v_cache[b : b + 1, :, real], pattern,
                                              row_gates, types, pooler, scale=scale)
                    out[b, :, i] = row[0, :, -1]
            return out.to(dtype=q.dtype, device=q.device)

        return decode


# The exact decode evaluates each new query alone (earlier queries zero), which
# token granularity allows: a tile's shared selection would need the tile's queries.
_TILED_REASON = ("query_block selection: the reference backend's decode evaluates each query alone; "
                 "the exact per-row path with the tile's queries is nsaflex.adapters.decode")


def _to_device(values: dict, device: torch.device) -> dict:
    moved: dict = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, dict):
            moved[key] = {name: tensor.to(device) for name, tensor in value.items()}
    return moved


def _constants(pattern: Pattern, branch: str) -> dict[str, Any]:
    section = getattr(pattern, branch)
    return {k: v for k, v in section.to_dict().items()}


BACKEND = ReferenceBackend()
