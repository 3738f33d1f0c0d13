"""Lowering: which backend and kernel serves each branch of a pattern.

``make_plan(pattern, backend, device)`` resolves ``auto`` (on CUDA the Triton
kernels where they can serve the pattern, then FlexAttention; on CPU
FlexAttention, then the reference), asks the chosen backend to describe each
branch, and does the same for every per-layer override. The plan is data:
printed by ``nsaflex compile``, embedded by the code generator, and handed to
the backend's ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nsaflex.backends.base import REGISTRY, BranchPlan, get_backend
from nsaflex.errors import BackendUnavailable
from nsaflex.spec import Pattern

AUTO_ORDER = {"cuda": ("triton", "flex", "reference"), "cpu": ("flex", "reference")}


@dataclass(frozen=True)
class Plan:
    """The lowering of one (layer-resolved) pattern.

    Attributes:
        pattern: the pattern the plan serves (base pattern when ``layer`` is None).
        backend: the backend that runs it.
        device: ``cpu`` or ``cuda``.
        branches: one entry per branch, plus the dense text path of hybrid patterns.
        reasons: why ``auto`` passed over backends (backend -> reason).
        layers: sub-plans of the per-layer overrides, as ``(layer indices, plan)``.
        layer: the decoder layer this plan is for (None: the base pattern).
        deterministic: gradients bit-reproducible from run to run (default). False
            lets the Triton backend add the selection branch's dk and dv with fp32
            atomics instead of reducing per-segment partials in order (the order
            of additions, and so the last bits, vary; measured no faster at 128K);
            the other backends are deterministic either way.
    """

    pattern: Pattern
    backend: str
    device: str
    branches: tuple[BranchPlan, ...]
    reasons: tuple[tuple[str, str], ...] = ()
    layers: tuple[tuple[tuple[int, ...], "Plan"], ...] = ()
    layer: int | None = None
    deterministic: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "pattern": self.pattern.name,
            "layer": self.layer,
            "backend": self.backend,
            "device": self.device,
            "branches": [branch.to_dict() for branch in self.branches],
            "passed_over": {name: reason for name, reason in self.reasons},
            "deterministic": self.deterministic,
            "layers": [{"at": list(at), "plan": plan.to_dict()} for at, plan in self.layers],
        }


def _normalise_device(device: str | None) -> str:
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    kind = device.split(":")[0]
    if kind not in AUTO_ORDER:
        raise BackendUnavailable(f"device: expected 'cpu' or 'cuda', found {device!r}")
    return kind


def choose_backend(pattern: Pattern, backend: str, device: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The backend name that serves ``pattern`` and the reasons others were passed over."""
    if backend != "auto":
        reason = get_backend(backend).unsupported(pattern, device)
        if reason is not None:
            raise BackendUnavailable(f"backend {backend!r} cannot serve pattern {pattern.name!r} on {device}: {reason}")
        return backend, ()
    reasons: list[tuple[str, str]] = []
    for name in AUTO_ORDER[device]:
        try:
            reason = get_backend(name).unsupported(pattern, device)
        except BackendUnavailable as error:
            reason = str(error)
        if reason is None:
            return name, tuple(reasons)
        reasons.append((name, reason))
    raise BackendUnavailable(f"no backend serves pattern {pattern.name!r} on {device}: {dict(reasons)}")


def make_plan(pattern: Pattern, backend: str = "auto", device: str | None = None, *, layer: int | None = None,
              deterministic: bool = True) -> Plan:
    """Lower ``pattern`` (resolved for ``layer`` when given) for ``device``
    (``deterministic``: see :class:`Plan`)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in REGISTRY):
        get_backend(backend)  # raises with a did-you-mean
    device = _normalise_device(device)
    resolved = pattern.for_layer(layer) if layer is not None else pattern
    name, reasons = choose_backend(resolved, backend, device)
    branches = get_backend(name).describe(resolved, device)
    sub_plans = ()
    if layer is None and pattern.layers:
        sub_plans = tuple(
            (override.at, make_plan(pattern, backend, device, layer=override.at[0], deterministic=deterministic))
            for override in pattern.layers
        )
    return Plan(resolved, name, device, branches, reasons, sub_plans, layer, deterministic)
