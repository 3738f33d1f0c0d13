"""The runtime callable: ``nsaflex.compile(pattern, backend=...)``.

Returns a :class:`CompiledAttention`, an ``nn.Module`` that validates its inputs
and runs the plan's backend. It owns the learned pieces of the attention
itself (the compression MLP of ``pooling: mlp``); gate networks live with the
model (see :mod:`nsaflex.gates` and the adapters).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from nsaflex.backends.base import get_backend
from nsaflex.errors import InputError, PatternError
from nsaflex.inputs import check_inputs
from nsaflex.loader import load_pattern
from nsaflex.plan import Plan, make_plan
from nsaflex.pooling import MLPPooling, check_head_dim
from nsaflex.spec import Pattern


class CompiledAttention(nn.Module):
    """``attn(q, k, v, gates=None, token_types=None) -> out``.

    q ``[B, Hq, L, D]``, k and v ``[B, Hkv, L, D]``, gates ``[B, Hq, L, nb]`` in
    the order compression, selection, window (None for constant gates),
    token_types ``[B, L]`` (0 text, 1 vision; hybrid patterns only); out
    ``[B, Hq, L, D]`` in the dtype of q.
    """

    def __init__(self, pattern: Pattern, plan: Plan, head_dim: int | None = None) -> None:
        super().__init__()
        self.pattern = plan.pattern
        self.plan = plan
        self.pooler: MLPPooling | None = None
        if head_dim is not None:
            check_head_dim(head_dim)  # also where no MLP needs it: a bad value is a mistake either way
        compression = self.pattern.compression
        if compression is not None and compression.pooling == "mlp" and not self.pattern.dense:
            dim = head_dim if head_dim is not None else self.pattern.model.head_dim
            if dim is None:
                raise PatternError("model.head_dim", "a head dim (or compile(..., head_dim=...)) for mlp pooling", None)
            self.pooler = MLPPooling(compression, dim)
        self._kernel = get_backend(plan.backend).build(self.pattern, plan)
        # For run_heads: the same checks without the model's head counts. Built once,
        # since constructing a Pattern re-validates it (budget included).
        any_heads = dataclasses.replace(self.pattern.model, query_heads=None, kv_heads=None)
        self._any_heads_pattern = dataclasses.replace(self.pattern, model=any_heads)

    def __getstate__(self) -> dict:
        # The kernel is a closure (or holds per-shape mask caches): pickles and
        # copies rebuild it from the plan instead.
        state = super().__getstate__()
        state.pop("_kernel", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kernel = get_backend(self.plan.backend).build(self.pattern, self.plan)

    @property
    def backend(self) -> str:
        return self.plan.backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_inputs(self.pattern, q, k, v, gates, token_types, layer=self.plan.layer)
        if self.pooler is not None and self.pooler.head_dim != q.shape[-1]:
            raise InputError("q", f"head dim {self.pooler.head_dim} (the compression MLP's)", q.shape[-1])
        return self._kernel(q, k, v, gates, token_types, self.pooler)

    def run_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like ``forward`` on a subset of whole GQA groups: the pattern's
        ``model.query_heads``/``kv_heads`` are not enforced (sequence-parallel
        ranks each run some of the heads); everything else is checked."""
        check_inputs(self._any_heads_pattern, q, k, v, gates, token_types, layer=self.plan.layer)
        return self._kernel(q, k, v, gates, token_types, self.pooler)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern.name!r}, backend={self.plan.backend!r}, branches={self.pattern.branches}"


def compile(
    pattern: Pattern | str | os.PathLike[str],
    backend: str = "auto",
    *,
    layer: int | None = None,
    device: str | None = None,
    head_dim: int | None = None,
    deterministic: bool = True,
    **options: Any,
) -> CompiledAttention:
    """Compile a pattern (object, file path or bundled name) into an attention module.

    ``backend``: ``reference``, ``flex``, ``triton`` or ``auto`` (the plan
    chooses for ``device``, default: CUDA when available). ``layer`` resolves
    the pattern's per-layer overrides for that decoder layer.
    ``deterministic=False`` allows atomic (faster, not bit-reproducible)
    gradient accumulation where a backend has it (Triton: the selection
    branch's dk and dv); the plan records the choice.
    ``options``: kernel and precision choices by name (``scoring_kernel``,
    ``score_dtype``, ``flex_mode``, ``flex_dynamic``; see
    :class:`nsaflex.plan.PlanOptions`), recorded in the plan.
    """
    if not isinstance(pattern, Pattern):
        pattern = load_pattern(pattern)
    if not isinstance(deterministic, bool):
        raise InputError("deterministic", "True or False", deterministic)
    plan = make_plan(pattern, backend, device, layer=layer, deterministic=deterministic, **options)
    return CompiledAttention(pattern, plan, head_dim)
