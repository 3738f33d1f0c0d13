"""The contract between the plan and the backends.

A backend is a module in ``nsaflex.backends`` exposing ``BACKEND``, an object
with:

* ``name``: its registry name;
* ``unsupported(pattern, device) -> str | None``: why it cannot serve the
  pattern on that device (``None`` when it can);
* ``describe(pattern, device) -> tuple[BranchPlan, ...]``: what it would run
  for each branch (kernel, how masks are built, the constants it specialises on);
* ``build(pattern, plan) -> Kernel``: the callable that computes the output.

The plan decides which backend serves a pattern; the backend executes. Adding
a backend is one new module and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

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
