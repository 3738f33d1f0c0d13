"""Lowering: which backend and kernel serves each branch of a pattern.

``make_plan(pattern, backend, device)`` resolves ``auto`` (on CUDA the Triton
kernels where they can serve the pattern, then FlexAttention; on CPU
FlexAttention, then the reference), asks the chosen backend to describe each
branch, and does the same for every per-layer override. In ``videonsa_release``
mode (the released VideoNSA numerics) ``auto`` is FlexAttention on CUDA and the
reference on CPU, and the plan records how each quirk is lowered
(:mod:`nsaflex.release_lowering`). The plan is data:
printed by ``nsaflex compile``, embedded by the code generator, and handed to
the backend's ``build``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nsaflex.backends.base import REGISTRY, BranchPlan, get_backend
from nsaflex.errors import BackendUnavailable, InputError, did_you_mean, one_of
from nsaflex.release_lowering import RELEASE, RELEASE_BACKENDS, ReleaseLowering, check_mode, release_backend
from nsaflex.reference_release import check_release_pattern
from nsaflex.release_lowering import describe as describe_release
from nsaflex.spec import Pattern

AUTO_ORDER = {"cuda": ("triton", "flex", "reference"), "cpu": ("flex", "reference")}

# option -> its allowed values, the first being the default.
OPTION_CHOICES: dict[str, tuple[Any, ...]] = {
    "scoring_kernel": ("auto", "triton", "torch"),
    "score_dtype": ("auto", "float32", "float64"),
    "flex_mode": ("auto", "eager", "compiled"),
    "flex_dynamic": (False, True),
}


@dataclass(frozen=True)
class PlanOptions:
    """Choices that change which kernels run, or the last bits of the numbers,
    for the backends that read them (the others ignore them).

    Attributes:
        scoring_kernel: how the flex backend computes selection scores: ``auto``
            (the Triton scoring kernels on CUDA with float32 ranking, torch
            elsewhere), ``triton`` (always; on CPU under ``TRITON_INTERPRET=1``;
            a kernel failure raises instead of falling back) or ``torch``.
        score_dtype: precision in which the flex backend ranks selection scores:
            ``auto`` (float64 on CPU and for float64 inputs, the reference's choice
            exactly; float32 on CUDA), ``float32`` or ``float64``.
        flex_mode: how the flex backend runs FlexAttention: ``auto`` (compiled
            except float64 inputs and CPU calls that need gradients, which take
            the dense evaluation), ``eager`` (always the dense evaluation) or
            ``compiled``.
        flex_dynamic: compile the flex branches with automatic dynamic shapes (a
            second length recompiles once into a length-generic kernel) instead of
            one static compile per branch and length.
    """

    scoring_kernel: str = "auto"
    score_dtype: str = "auto"
    flex_mode: str = "auto"
    flex_dynamic: bool = False

    def ranking_dtype(self) -> Any:
        """``score_dtype`` as a torch dtype, None for ``auto`` (each ranking
        then takes :func:`nsaflex.scoring.default_score_dtype`)."""
        import torch

        return None if self.score_dtype == "auto" else getattr(torch, self.score_dtype)

    def __post_init__(self) -> None:
        for name, allowed in OPTION_CHOICES.items():
            value = getattr(self, name)
            # bool is checked by type: 1 == True would pass a membership test.
            if type(value) is not type(allowed[0]) or value not in allowed:
                raise InputError(name, one_of(allowed), value)


@dataclass(frozen=True)
class Plan:
    """The lowering of one (layer-resolved) pattern.

    Attributes:
        pattern: the pattern the plan serves (base pattern when ``layer`` is None).
        backend: the backend that runs it.
        device: ``cpu`` or ``cuda``.
        branches: one entry per branch, plus the dense text path of hybrid patterns.
        reasons: why ``auto`` passed over backends (backend -> reason).
        chosen_because: why ``auto`` chose ``backend`` ("" for a named backend).
        layers: sub-plans of the per-layer overrides, as ``(layer indices, plan)``.
        layer: the decoder layer this plan is for (None: the base pattern).
        deterministic: gradients bit-reproducible from run to run (default). False
            lets the Triton backend add the selection branch's dk and dv with fp32
            atomics instead of reducing per-segment partials in order (the order
            of additions, and so the last bits, vary; measured no faster at 128K);
            the other backends are deterministic either way.
        options: the :class:`PlanOptions` (kernel and precision choices).
        mode: ``faithful`` (the pattern's semantics) or ``videonsa_release``
            (:mod:`nsaflex.reference_release`'s numerics).
        release: in ``videonsa_release`` mode, how each of its quirks is lowered
            (:class:`nsaflex.release_lowering.ReleaseLowering`); None otherwise.
    """

    pattern: Pattern
    backend: str
    device: str
    branches: tuple[BranchPlan, ...]
    reasons: tuple[tuple[str, str], ...] = ()
    layers: tuple[tuple[tuple[int, ...], "Plan"], ...] = ()
    layer: int | None = None
    deterministic: bool = True
    options: PlanOptions = PlanOptions()
    mode: str = "faithful"
    release: ReleaseLowering | None = None
    chosen_because: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "pattern": self.pattern.name,
            "layer": self.layer,
            "backend": self.backend,
            "device": self.device,
            "branches": [branch.to_dict() for branch in self.branches],
            "passed_over": {name: reason for name, reason in self.reasons},
            "chosen_because": self.chosen_because,
            "deterministic": self.deterministic,
            "options": asdict(self.options),
            "mode": self.mode,
            **({"release": self.release.to_dict()} if self.release is not None else {}),
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


def choose_release_backend(pattern: Pattern, backend: str, device: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The backend of ``videonsa_release`` mode and the refusals before it: ``auto``
    is the Triton kernels on CUDA (FlexAttention where they cannot serve the
    pattern) and the float64 reference on CPU (the others there only when named,
    as tests do)."""
    name = release_backend(backend, device)
    if name not in RELEASE_BACKENDS:
        raise BackendUnavailable(
            f"backend {name!r} cannot run mode {RELEASE!r}: its quirks are lowered for {', '.join(RELEASE_BACKENDS)} only"
        )
    reason = get_backend(name).unsupported(pattern, device)
    if reason is not None and backend == "auto" and name == "triton":
        refused = ((name, reason),)
        name, reason = "flex", get_backend("flex").unsupported(pattern, device)
        if reason is None:
            return name, refused
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot serve pattern {pattern.name!r} on {device}: {reason}")
    return name, ()


def make_plan(pattern: Pattern, backend: str = "auto", device: str | None = None, *, layer: int | None = None,
              deterministic: bool = True, options: PlanOptions | None = None, mode: str = "faithful",
              **option_values: Any) -> Plan:
    """Lower ``pattern`` (resolved for ``layer`` when given) for ``device``
    (``deterministic``: see :class:`Plan`). Options come as a :class:`PlanOptions`
    or as its fields by name (``make_plan(p, "flex", flex_mode="eager")``).
    ``mode="videonsa_release"`` lowers :mod:`nsaflex.reference_release` (the
    pattern must pass :func:`~nsaflex.reference_release.check_release_pattern`)."""
    options = plan_options(options, **option_values)
    check_mode(mode)
    if not isinstance(backend, str) or (backend != "auto" and backend not in REGISTRY):
        get_backend(backend)  # raises with a did-you-mean
    device = _normalise_device(device)
    resolved = pattern.for_layer(layer) if layer is not None else pattern
    release = None
    if mode == RELEASE:
        check_release_pattern(pattern, layer)
        (name, reasons), release = choose_release_backend(resolved, backend, device), ReleaseLowering()
        branches = describe_release(resolved, name, device, release)
        chosen = (f"videonsa_release runs on {name}: the Triton kernels on CUDA (FlexAttention where they cannot "
                  "serve the pattern), the float64 reference on CPU" if backend == "auto" else "")
    else:
        name, reasons = choose_backend(resolved, backend, device)
        chosen = auto_choice_reason(resolved, name, device) if backend == "auto" else ""
        branches = get_backend(name).describe(resolved, device)
    sub_plans = ()
    if layer is None and pattern.layers:
        sub_plans = tuple(
            (override.at, make_plan(pattern, backend, device, layer=override.at[0], deterministic=deterministic,
                                    options=options, mode=mode))
            for override in pattern.layers
        )
    return Plan(resolved, name, device, branches, reasons, sub_plans, layer, deterministic, options, mode, release,
                chosen)


def auto_choice_reason(pattern: Pattern, name: str, device: str) -> str:
    """Why ``auto`` runs ``pattern`` on backend ``name``: the first of the
    device's order (:data:`AUTO_ORDER`) that serves it, and for query-block
    selection on the Triton kernels what they do with it."""
    order = AUTO_ORDER[device]
    reason = f"the first of {', '.join(order)} on {device} that serves the pattern"
    selection = pattern.selection
    if name == "triton" and selection is not None and selection.granularity == "query_block" and not pattern.dense:
        reason += (f"; query_block (m = {selection.query_block}) served by the Triton kernels: one top-n per "
                   "tile of m queries, its list given to the tile's queries; faster than flex at every length measured "
                   "(H100, videonsa-qblock and videonsa-q8, 4K to 128K, forward and forward+backward: benchmarks/RESULTS.md)")
    return reason


def plan_options(options: PlanOptions | None = None, **values: Any) -> PlanOptions:
    """``options`` (default: all defaults) with the fields named in ``values``
    replaced; an unknown name or a value outside its choices raises InputError."""
    if options is not None and not isinstance(options, PlanOptions):
        raise InputError("options", "a PlanOptions", options)
    for name in values:
        if name not in OPTION_CHOICES:
            hint = did_you_mean(name, OPTION_CHOICES)
            raise InputError("option", "one of " + ", ".join(OPTION_CHOICES) + (f" ({hint})" if hint else ""), name)
    base = asdict(options) if options is not None else {}
    return PlanOptions(**{**base, **values})
