"""The reference backend: :func:`nsaflex.reference.reference_attention` (float64,
dense masks), cast back to the input dtype. Exact and slow: for tests, small
inputs and as the last resort of ``auto``."""

from __future__ import annotations

from typing import Any

import torch

from nsaflex.backends.base import BranchPlan
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
