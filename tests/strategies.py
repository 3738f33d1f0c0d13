"""Hypothesis strategies shared by the test suites.

* :func:`patterns` draws random *valid* :class:`nsaflex.spec.Pattern` objects
  (every field covered; options restrict the draw for kernel tests);
* :func:`lengths_for` draws sequence lengths suited to a pattern;
* :func:`gqa_shapes` draws ``(B, Hkv, G, D)``;
* :func:`token_types` draws ``[B, L]`` 0/1 token-class tensors.

``torch`` is imported only when :func:`token_types` is drawn, so DSL tests that
only need patterns stay light.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Collection, Iterable
from typing import Any

from hypothesis import strategies as st

from nsaflex.spec import (
    BRANCH_ORDER,
    FORCED_BLOCKS,
    GATE_KINDS,
    GRANULARITIES,
    Budget,
    Compression,
    Gate,
    Hybrid,
    LayerOverride,
    Model,
    Pattern,
    Selection,
    Window,
)

__all__ = [
    "all_power_of_two",
    "gqa_shapes",
    "lengths_for",
    "patterns",
    "pattern_block_sizes",
    "token_types",
]

SMALL_BLOCKS = (2, 4, 8, 16)
POW2_BLOCKS = (1, 2, 4, 8, 16, 32, 64, 128)
HYBRID_SETTINGS = (None, "vision", "all")
HAS_BUDGET_MODULE = importlib.util.find_spec("nsaflex.budget") is not None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Options:
    """The validated options of one :func:`patterns` call."""

    def __init__(
        self,
        *,
        small: bool,
        power_of_two_blocks: bool,
        allow_legacy: bool,
        allow_mlp_pooling: bool,
        allow_layers: bool,
        branches: Collection[str] | None,
        granularities: Iterable[str],
        hybrid: Iterable[str | None],
        gate_kinds: Iterable[str],
        allow_budget: bool,
        allow_model: bool,
        allow_dense: bool,
    ) -> None:
        self.small = small
        self.pow2 = power_of_two_blocks or small
        self.allow_legacy = allow_legacy
        self.allow_mlp_pooling = allow_mlp_pooling
        self.allow_layers = allow_layers
        if branches is not None:
            if isinstance(branches, str):
                branches = (branches,)
            unknown = set(branches) - set(BRANCH_ORDER)
            if unknown or not branches:
                raise ValueError(f"branches: a non-empty subset of {BRANCH_ORDER}, got {branches!r}")
            if "selection" in branches and "compression" not in branches:
                raise ValueError("branches: selection needs compression (it is scored from it)")
            self.branches: tuple[str, ...] | None = tuple(b for b in BRANCH_ORDER if b in branches)
        else:
            self.branches = None
        self.allow_dense = allow_dense
        self.granularities = (granularities,) if isinstance(granularities, str) else tuple(granularities)
        if not self.granularities or set(self.granularities) - set(GRANULARITIES):
            raise ValueError(f"granularities: a non-empty subset of {GRANULARITIES}, got {self.granularities!r}")
        self.hybrid = (hybrid,) if isinstance(hybrid, str) or hybrid is None else tuple(hybrid)
        if not self.hybrid or set(self.hybrid) - set(HYBRID_SETTINGS):
            raise ValueError(f"hybrid: a non-empty subset of {HYBRID_SETTINGS}, got {self.hybrid!r}")
        self.gate_kinds = (gate_kinds,) if isinstance(gate_kinds, str) else tuple(gate_kinds)
        if not self.gate_kinds or set(self.gate_kinds) - set(GATE_KINDS):
            raise ValueError(f"gate_kinds: a non-empty subset of {GATE_KINDS}, got {self.gate_kinds!r}")
        self.allow_budget = allow_budget
        self.allow_model = allow_model

    # -- sizes ---------------------------------------------------------------
    def block(self) -> st.SearchStrategy[int]:
        """A compression block length l."""
        if self.small:
            return st.sampled_from(SMALL_BLOCKS)
        if self.pow2:
            return st.sampled_from(POW2_BLOCKS)
        return st.one_of(st.sampled_from((16, 32, 64, 128)), st.integers(1, 96))

    def selection_blocks(self, stride: int) -> list[int]:
        """Selection block lengths l' (multiples of ``stride``)."""
        if self.small:
            return [b for b in SMALL_BLOCKS if b % stride == 0] or [stride]
        limit = max(256, stride)
        if self.pow2:
            return [b for b in (*POW2_BLOCKS, 256) if b % stride == 0 and b <= limit]
        return list(range(stride, limit + 1, stride))

    def window(self) -> st.SearchStrategy[int]:
        if self.small:
            return st.sampled_from((1, 2, 4, 8, 16, 32)) if self.pow2 else st.integers(1, 40)
        if self.pow2:
            return st.sampled_from(tuple(2**i for i in range(11)))
        return st.one_of(st.sampled_from((256, 512, 1024)), st.integers(1, 1024))

    def max_count(self) -> int:
        return 8 if self.small else 48


# -- sections --------------------------------------------------------------------
_finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def _compression(draw: Any, opts: _Options) -> Compression:
    block = draw(opts.block())
    stride = draw(st.one_of(st.just(block), st.sampled_from(_divisors(block))))
    poolings = ("mean", "mlp") if opts.allow_mlp_pooling else ("mean",)
    pooling = draw(st.sampled_from(poolings))
    visibility = draw(st.sampled_from(("causal", "videonsa_legacy") if opts.allow_legacy else ("causal",)))
    mlp_hidden = draw(st.one_of(st.none(), st.integers(1, 256))) if pooling == "mlp" else None
    return Compression(block=block, stride=stride, pooling=pooling, visibility=visibility, mlp_hidden=mlp_hidden)


@st.composite
def _selection(draw: Any, opts: _Options, stride: int) -> Selection:
    block = draw(st.sampled_from(opts.selection_blocks(stride)))
    forced = tuple(draw(st.lists(st.sampled_from(FORCED_BLOCKS), unique=True, max_size=3)))
    low = max(1, len(forced))
    count = draw(st.integers(low, low + opts.max_count()))
    scoring = draw(st.sampled_from(("group", "head")))
    granularity = draw(st.sampled_from(opts.granularities))
    query_block = draw(st.sampled_from(_divisors(block))) if granularity == "query_block" else None
    return Selection(
        block=block, count=count, scoring=scoring, forced=forced,
        granularity=granularity, query_block=query_block,
    )


@st.composite
def _window(draw: Any, opts: _Options) -> Window:
    return Window(size=draw(opts.window()))


@st.composite
def _gate(draw: Any, opts: _Options, num_branches: int) -> Gate:
    kind = draw(st.sampled_from(opts.gate_kinds))
    if kind == "constant":
        values = draw(
            st.lists(
                st.one_of(st.floats(-4, 4, **_finite), st.integers(-3, 3)),
                min_size=num_branches, max_size=num_branches,
            )
        )
        return Gate(kind="constant", values=tuple(values))
    temperature = draw(st.one_of(st.just(1.0), st.floats(1e-3, 100, **_finite), st.integers(1, 5)))
    bias = draw(st.one_of(st.just(0.0), st.floats(-10, 10, **_finite)))
    return Gate(kind=kind, temperature=temperature, bias=bias)


@st.composite
def _model(draw: Any, min_layers: int = 1) -> Model:
    kv_heads = draw(st.one_of(st.none(), st.integers(1, 8)))
    group = draw(st.integers(1, 8))
    query_heads = draw(st.one_of(st.none(), st.just((kv_heads or 1) * group)))
    head_dim = draw(st.one_of(st.none(), st.sampled_from((16, 32, 64, 128))))
    hidden_size = draw(st.one_of(st.none(), st.integers(1, 8192)))
    num_layers = draw(st.one_of(st.none(), st.integers(min_layers, 64)))
    return Model(
        query_heads=query_heads, kv_heads=kv_heads, head_dim=head_dim,
        hidden_size=hidden_size, num_layers=num_layers,
    )


def _branch_sets(opts: _Options) -> list[tuple[str, ...]]:
    """Every valid non-empty set of branches (selection only beside compression)."""
    out = []
    for mask in range(1, 8):
        chosen = tuple(b for i, b in enumerate(BRANCH_ORDER) if mask >> i & 1)
        if "selection" in chosen and "compression" not in chosen:
            continue
        out.append(chosen)
    return out


@st.composite
def _override(draw: Any, opts: _Options, base: dict[str, Any], gate: Gate, at: tuple[int, ...]) -> LayerOverride:
    """A valid override of the base sections ``base`` (branch name -> section)."""
    base_branches = tuple(b for b in BRANCH_ORDER if base.get(b) is not None)
    if draw(st.integers(0, 3)) == 0:
        return LayerOverride(at=at, dense=True)
    if opts.branches is not None or gate.kind == "constant":
        # The branch set stays (constant gates have one value per base branch).
        target = base_branches
    else:
        target = draw(st.sampled_from(_branch_sets(opts)))
    sections: dict[str, Any] = {}
    for name in target:
        if name not in base_branches or draw(st.booleans()):
            sections[name] = None  # to be drawn
    if target == base_branches and not sections:
        sections[draw(st.sampled_from(target))] = None
    # Draw the replaced sections so that compression and selection stay compatible.
    if "compression" in sections:
        sections["compression"] = draw(_compression(opts))
    compression = sections.get("compression") or base.get("compression")
    if "selection" in target:
        assert compression is not None
        kept = base.get("selection") if "selection" not in sections else None
        if kept is not None and kept.block % compression.stride:
            sections["selection"] = None  # the kept one no longer fits the new stride
        if "selection" in sections:
            sections["selection"] = draw(_selection(opts, compression.stride))
    if "window" in sections:
        sections["window"] = draw(_window(opts))
    remove = tuple(b for b in base_branches if b not in target)
    return LayerOverride(at=at, remove=remove, **sections)


@st.composite
def _patterns(draw: Any, opts: _Options) -> Pattern:
    names = opts.branches if opts.branches is not None else draw(st.sampled_from(_branch_sets(opts)))
    compression = draw(_compression(opts)) if "compression" in names else None
    selection = draw(_selection(opts, compression.stride)) if "selection" in names else None
    window = draw(_window(opts)) if "window" in names else None
    gate = draw(_gate(opts, len(names)))
    vision_keys = draw(st.sampled_from(opts.hybrid))
    hybrid = None if vision_keys is None else Hybrid(vision_keys=vision_keys)
    model = draw(_model()) if opts.allow_model and draw(st.booleans()) else Model()

    dense = opts.allow_dense and draw(st.integers(0, 4)) == 0
    layers: list[LayerOverride] = []
    if opts.allow_layers and not dense and draw(st.booleans()):
        num_layers = model.num_layers or 64
        indices = draw(st.lists(st.integers(0, num_layers - 1), unique=True, min_size=1, max_size=min(6, num_layers)))
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(indices) - 1)), unique=True, max_size=2)))
        groups = [tuple(indices[a:b]) for a, b in zip([0, *cuts], [*cuts, len(indices)]) if indices[a:b]]
        base = {"compression": compression, "selection": selection, "window": window}
        layers = [draw(_override(opts, base, gate, at)) for at in groups]

    name = draw(st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True), st.text(min_size=1, max_size=12)))
    description = draw(st.one_of(st.just(""), st.text(max_size=40)))
    pattern = Pattern(
        name=name, compression=compression, selection=selection, window=window, gate=gate,
        hybrid=hybrid, model=model, layers=tuple(layers), description=description, dense=dense,
    )
    if not (opts.allow_budget and draw(st.booleans())):
        return pattern
    # A budget the pattern meets.
    keys = max(1, pattern.keys_per_query)
    max_keys = draw(st.one_of(st.none(), st.just(keys), st.integers(keys, keys * 4)))
    fraction = at_length = None
    if HAS_BUDGET_MODULE and draw(st.booleans()):
        from nsaflex.budget import attended_fraction

        at_length = draw(st.integers(1, 2048))
        actual = attended_fraction(pattern, at_length)  # may exceed 1: pairs are counted per branch
        if actual <= 1:
            fraction = draw(st.one_of(st.just(max(actual, 1e-9)), st.floats(max(actual, 1e-9), 1.0)))
        else:
            at_length = None
    budget = Budget(max_keys_per_query=max_keys, max_attended_fraction=fraction, at_length=at_length)
    return dataclasses.replace(pattern, budget=budget)


def patterns(
    *,
    small: bool = False,
    power_of_two_blocks: bool = False,
    allow_legacy: bool = True,
    allow_mlp_pooling: bool = True,
    allow_layers: bool = True,
    branches: Collection[str] | None = None,
    granularities: Iterable[str] = GRANULARITIES,
    hybrid: Iterable[str | None] = HYBRID_SETTINGS,
    gate_kinds: Iterable[str] = GATE_KINDS,
    allow_budget: bool = True,
    allow_model: bool = True,
    allow_dense: bool = False,
) -> st.SearchStrategy[Pattern]:
    """Random valid patterns.

    Args:
        small: block lengths l, l' among 2, 4, 8, 16 (so sequences of <= ~100
            tokens hold several blocks), windows <= 40, counts n <= |forced| + 8.
            Implies power-of-two blocks, strides and query blocks (windows are
            powers of two only with ``power_of_two_blocks``).
        power_of_two_blocks: every block length, stride, query_block and window
            size a power of two (what flex/triton block masks take).
        allow_legacy: may draw ``visibility: videonsa_legacy`` (else causal only).
        allow_mlp_pooling: may draw ``pooling: mlp`` (else mean only).
        allow_layers: may draw per-layer overrides (dense layers, replaced
            sections, removed branches; always valid).
        branches: exactly these base branches (e.g. ``{"window"}``); overrides
            then keep the branch set (dense layers or replaced sections only).
            ``None``: any valid non-empty set.
        granularities: allowed selection granularities.
        hybrid: allowed hybrid settings among ``None`` (no hybrid section),
            ``"vision"``, ``"all"``.
        gate_kinds: allowed gate kinds (``constant`` gates have one value per
            branch; overrides of such patterns keep the branch set).
        allow_budget: may draw a budget the pattern meets (max_attended_fraction
            and at_length only where nsaflex.budget exists).
        allow_model: may draw a model section (layer indices stay below its
            num_layers).
        allow_dense: may draw ``dense: true`` patterns (a resolved dense
            layer: every query dense and causal; branches kept but unused).
    """
    opts = _Options(
        small=small, power_of_two_blocks=power_of_two_blocks, allow_legacy=allow_legacy,
        allow_mlp_pooling=allow_mlp_pooling, allow_layers=allow_layers, branches=branches,
        granularities=granularities, hybrid=hybrid, gate_kinds=gate_kinds,
        allow_budget=allow_budget, allow_model=allow_model, allow_dense=allow_dense,
    )
    return _patterns(opts)


# -- lengths ---------------------------------------------------------------------
def pattern_block_sizes(pattern: Pattern) -> set[int]:
    """Block lengths, strides, query tiles and window sizes of a pattern and
    of its layer overrides."""
    sizes: set[int] = set()
    sources = [pattern, *pattern.layers]
    for item in sources:
        if item.compression is not None:
            sizes |= {item.compression.block, item.compression.stride}
        if item.selection is not None:
            sizes.add(item.selection.block)
            if item.selection.query_block is not None:
                sizes.add(item.selection.query_block)
        if item.window is not None:
            sizes.add(item.window.size)
    return sizes


def lengths_for(pattern: Pattern, *, max_blocks: int = 4, max_length: int | None = None) -> st.SearchStrategy[int]:
    """Sequence lengths from 1 to ``max_blocks`` of the pattern's largest block
    (capped at ``max_length``), biased toward lengths that are not a multiple of
    any block size and lengths shorter than one block."""
    sizes = {s for s in pattern_block_sizes(pattern) if s > 1}
    biggest = max(sizes, default=16)
    top = max(1, biggest * max_blocks)
    if max_length is not None:
        top = max(1, min(top, max_length))
    smallest = min(sizes, default=2)
    choices: list[st.SearchStrategy[int]] = [st.integers(1, top)]
    awkward = [n for n in range(1, top + 1) if all(n % s for s in sizes)]
    if awkward:
        choices += [st.sampled_from(awkward)] * 2
    if smallest > 1:
        choices.append(st.integers(1, min(smallest - 1, top)))
    edges = sorted({n for s in sizes for k in range(1, max_blocks + 1) for n in (k * s - 1, k * s, k * s + 1) if 1 <= n <= top})
    if edges:
        choices.append(st.sampled_from(edges))
    return st.one_of(choices)


# -- shapes and token classes -------------------------------------------------------
def gqa_shapes(
    *,
    batch: tuple[int, int] = (1, 3),
    kv_heads: tuple[int, int] = (1, 4),
    groups: Iterable[int] = (1, 2, 3, 4, 7, 8),
    head_dims: Iterable[int] = (16, 32, 64),
) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """``(B, Hkv, G, D)``: Hq = Hkv * G query heads (G = 7 included: heads are never padded)."""
    return st.tuples(
        st.integers(*batch),
        st.integers(*kv_heads),
        st.sampled_from(tuple(groups)),
        st.sampled_from(tuple(head_dims)),
    )


@st.composite
def _token_types(draw: Any, batch: int, length: int, dtype: Any) -> Any:
    import torch

    whole = draw(st.sampled_from(("rows", "rows", "rows", "text", "vision")))
    rows = []
    for _ in range(batch):
        kind = whole if whole != "rows" else draw(st.sampled_from(("text", "vision", "random", "runs", "prompt")))
        if kind == "text":
            row = [0] * length
        elif kind == "vision":
            row = [1] * length
        elif kind == "prompt":  # text, one run of vision tokens, text: a video between a prompt and a question
            before = draw(st.integers(0, length))
            vision = draw(st.integers(0, length - before))
            row = [0] * before + [1] * vision + [0] * (length - before - vision)
        elif kind == "random":
            row = draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))
        else:  # runs: e.g. a text prompt, frames of vision tokens, text again
            row, value = [], draw(st.integers(0, 1))
            while len(row) < length:
                row += [value] * draw(st.integers(1, max(1, length)))
                value = 1 - value
            row = row[:length]
        rows.append(row)
    return torch.tensor(rows, dtype=dtype).reshape(batch, length)


def token_types(batch: int, length: int, *, dtype: Any = None) -> st.SearchStrategy[Any]:
    """``[batch, length]`` tensors of 0 (text) / 1 (vision): all-text and
    all-vision rows and batches, random rows, rows made of runs and prompts
    (text, one run of vision tokens, text).
    ``dtype`` defaults to ``torch.int64`` (``torch.bool`` also works)."""
    if dtype is None:
        import torch

        dtype = torch.int64
    return _token_types(batch, length, dtype)


def all_power_of_two(pattern: Pattern) -> bool:
    """Whether every block length, stride, query tile and window size of the
    pattern (layer overrides included) is a power of two."""
    return all(_is_pow2(s) for s in pattern_block_sizes(pattern))
