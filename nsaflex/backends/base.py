"""The contract between the plan and the backends.

A backend is a module in ``nsaflex.backends`` exposing ``BACKEND``, an object
with:

* ``name``: its registry name;
* ``unsupported(pattern, device) -> str | None``: why it cannot serve the
  pattern on that device (``None`` when it can);
* ``describe(pattern, device) -> tuple[BranchPlan, ...]``: what it would run
  for each branch (kernel, how masks are built, the constants it specialises on);
* ``build(pattern, plan) -> Kernel``: the callable that computes the output;
* optionally ``build_decode(pattern, plan) -> DecodeKernel`` and
  ``describe_decode(pattern, device) -> BranchPlan``: the decode entry (new
  queries against a KV cache, :mod:`nsaflex.decoding` for layouts and
  semantics). A backend without them is served by the batched torch decode
  (:func:`nsaflex.decoding.decode_step`): all rows, heads and new tokens in one
  set of tensor operations, no host synchronisation, CUDA-graph capturable.

The plan decides which backend serves a pattern; the backend executes. Adding
a backend is one new module and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nsaflex.decoding import decode_step
from nsaflex.decoding import tiled as decode_tiled
from nsaflex.decoding import unsupported as decode_unsupported
from nsaflex.errors import BackendUnavailable, did_you_mean
from nsaflex.pooling import MLPPooling
from nsaflex.spec import Pattern

# name -> module holding BACKEND (imported lazily: triton and flex pull in heavy imports).
REGISTRY: dict[str, str] = {
    "reference": "nsaflex.backends.reference",
    "flex": "nsaflex.backends.flex",
    "triton": "nsaflex.backends.triton",
}


@dataclass(frozen=True)
class BranchPlan:
    """How one branch (or the dense path) is executed."""

    branch: str
    backend: str
    kernel: str
    mask: str
    constants: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "backend": self.backend,
            "kernel": self.kernel,
            "mask": self.mask,
            "constants": dict(self.constants),
            "notes": list(self.notes),
        }


class Kernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor | None,
        token_types: torch.Tensor | None,
        pooler: MLPPooling | None,
    ) -> torch.Tensor: ...


class DecodeKernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        state: Any,
        gates: torch.Tensor | None,
        token_types: torch.Tensor | None,
        pooler: MLPPooling | None,
        *,
        scale: float | None = None,
        has_text: bool = True,
    ) -> torch.Tensor: ...


class Backend(Protocol):
    name: str

    def unsupported(self, pattern: Pattern, device: str) -> str | None: ...

    def describe(self, pattern: Pattern, device: str) -> tuple[BranchPlan, ...]: ...

    def build(self, pattern: Pattern, plan: Any) -> Kernel: ...


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    if not isinstance(name, str) or name not in REGISTRY:
        hint = did_you_mean(name, REGISTRY) if isinstance(name, str) else f"a backend name is a str, not {type(name).__name__}"
        raise BackendUnavailable(f"backend: expected one of {', '.join(REGISTRY)} or 'auto', found {name!r}" + (f" ({hint})" if hint else ""))
    try:
        module = importlib.import_module(REGISTRY[name])
    except ImportError as error:
        raise BackendUnavailable(f"backend {name!r} cannot be imported here: {error}") from None
    return module.BACKEND


def describe_decode(name: str, pattern: Pattern, device: str) -> BranchPlan:
    """How backend ``name`` serves decode steps of ``pattern`` (its own
    ``describe_decode``, else the batched torch decode)."""
    backend = get_backend(name)
    own = getattr(backend, "describe_decode", None)
    if own is not None:
        return own(pattern, device)
    reason = decode_unsupported(pattern)
    if reason is not None:
        return BranchPlan("decode", name, "none: the decode entry refuses this pattern", "-", notes=(reason,))
    if pattern.dense:
        kernel, mask = "torch SDPA over the cache", "real keys at or before the query's slot, [B, 1, T, S]"
    else:
        kernel = ("batched torch (nsaflex.decoding): compressed tokens kept per row and extended as blocks complete; "
                  "Eq. 9 scores, forced blocks, top-n (torch.topk on a unique key, stable sort in float64); "
                  "selected blocks and window gathered through the per-row slot map")
        mask = "per-row lengths and counts (device tensors), no host synchronisation: CUDA-graph capturable"
    notes = ("text queries: torch SDPA over the row's real keys",) if pattern.hybrid is not None else ()
    if decode_tiled(pattern):
        notes += ("query_block: the current tile's compression probabilities summed in the state "
                  "(decode_state needs the cached queries)",)
    return BranchPlan("decode", name, kernel, mask, {"rows": "batched", "new_tokens": "batched"}, notes)


def build_decode(name: str, pattern: Pattern, plan: Any) -> DecodeKernel:
    """The decode entry of backend ``name`` for ``pattern`` (its own
    ``build_decode``, else the batched torch decode, ranking in the plan's
    ``score_dtype``)."""
    backend = get_backend(name)
    own = getattr(backend, "build_decode", None)
    if own is not None:
        return own(pattern, plan)
    options = getattr(plan, "options", None)
    score_dtype = options.ranking_dtype() if options is not None else None

    def kernel(q, k_cache, v_cache, lengths, state, gates, token_types, pooler, *, scale=None, has_text=True):
        return decode_step(pattern, q, k_cache, v_cache, lengths, state, gates, token_types, pooler,
                           scale=scale, score_dtype=score_dtype, has_text=has_text)

    return kernel
