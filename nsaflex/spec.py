"""The validated pattern specification: immutable dataclasses, one per section.

A :class:`Pattern` is what a YAML file (see :mod:`nsaflex.loader`) or a Python
user describes. Every constructor validates its arguments and raises
:class:`~nsaflex.errors.PatternError` naming the key path, what was expected and
what was found, so a pattern object that exists is valid.

Geometry (all positions 0-based, in the sequence the sparse branches see):

* compression token ``i`` covers key positions ``[i*stride, i*stride + block)``
  and exists once the block is complete (``i*stride + block <= L``);
* selection block ``j`` covers ``[j*block, (j+1)*block)``; the last one may be
  partial;
* the window of query ``t`` is ``t - size < s <= t``.

The meaning of every field is fixed by :mod:`nsaflex.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from nsaflex.errors import PatternError, describe_value, did_you_mean, one_of

BRANCH_ORDER: tuple[str, ...] = ("compression", "selection", "window")
POOLINGS: tuple[str, ...] = ("mean", "mlp")
VISIBILITIES: tuple[str, ...] = ("causal", "videonsa_legacy")
SCORINGS: tuple[str, ...] = ("group", "head")
FORCED_BLOCKS: tuple[str, ...] = ("first", "previous", "current")
GRANULARITIES: tuple[str, ...] = ("token", "query_block")
GATE_KINDS: tuple[str, ...] = ("mlp", "linear", "constant")
VISION_KEYS: tuple[str, ...] = ("vision", "all")
#: Most per-layer overrides a pattern may have. Models have at most a few
#: hundred decoder layers; the cap keeps validation and planning (one sub-plan
#: per override) fast on hostile input.
MAX_LAYER_OVERRIDES = 1024


#: Largest size, count, length or layer index a pattern may give (2**31 - 1).
#: Larger values describe no real sequence or model and overflow the int64
#: tensors and 32-bit kernel arguments that positions are computed in.
MAX_INT = 2**31 - 1


def _positive_int(path: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PatternError(path, f"an integer >= {minimum}", describe_value(value))
    if value < minimum:
        raise PatternError(path, f"an integer >= {minimum}", value)
    if value > MAX_INT:
        raise PatternError(path, f"an integer <= {MAX_INT} (2**31 - 1)", value)


def _optional_positive_int(path: str, value: object) -> None:
    if value is not None:
        _positive_int(path, value)


def _real(path: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternError(path, "a finite number", describe_value(value))
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise PatternError(path, "a finite number", describe_value(value))


def _choice(path: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise PatternError(path, one_of(choices), describe_value(value))


def _utf8_text(path: str, value: str, what: str) -> None:
    """Refuse text that cannot be written out: a lone surrogate (``"\\ud800"``
    in YAML, or from Python) has no UTF-8 encoding, so printing or emitting the
    pattern would fail far from here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PatternError(
            path, f"{what} without lone surrogates (text UTF-8 can encode)",
            f"{value!r} (U+{ord(value[error.start]):04X} at index {error.start})",
        ) from None


def _string_tuple(path: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, tuple):
        raise PatternError(path, f"a list of {one_of(choices)}", describe_value(value))
    for index, item in enumerate(value):
        _choice(f"{path}[{index}]", item, choices)
    if len(set(value)) != len(value):
        raise PatternError(path, "no repeated entries", list(value))


_SectionType = TypeVar("_SectionType", bound=type)


def _checked_call(cls: _SectionType) -> _SectionType:
    """Make a bad call of a section constructor (a required field missing, an
    unknown or repeated keyword, too many positional values) a PatternError
    naming the section and field, not the dataclass's plain TypeError. Wraps
    the generated ``__init__``; a successful call pays nothing."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except TypeError:
            try:
                signature.bind(self, *args, **kwargs)
            except TypeError:
                raise _call_error(cls, signature, args, kwargs) from None
            raise  # the call was well formed: a TypeError from the checks is a bug

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def _call_error(cls: type, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> PatternError:
    fields = list(signature.parameters.values())[1:]  # after self
    names = [p.name for p in fields]
    section = getattr(cls, "SECTION", "")

    def path(key: str) -> str:
        return f"{section}.{key}" if section else key

    if len(args) > len(fields):
        plural = "s" if len(fields) != 1 else ""
        return PatternError(section, f"at most {len(fields)} positional argument{plural} for {cls.__name__}", len(args))
    by_position = names[: len(args)]
    for key in kwargs:
        if key not in names:
            return PatternError(path(key), f"a field of {cls.__name__}: {', '.join(names)}", key, hint=did_you_mean(key, names))
        if key in by_position:
            return PatternError(path(key), f"one value for {cls.__name__} field {key!r}", "a value by position and by name")
    missing = [p.name for p in fields if p.default is p.empty and p.name not in by_position and p.name not in kwargs]
    return PatternError(path(missing[0]), f"a value for the required key {missing[0]!r} of {cls.__name__}", "nothing")


class _Section:
    """Shared behaviour: validation in ``__post_init__`` and ``to_dict``."""

    SECTION: ClassVar[str] = ""

    def _path(self, key: str) -> str:
        return f"{self.SECTION}.{key}" if self.SECTION else key

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: every field, ``None`` fields left out, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, _Section) else v for v in value]
            out[f.name] = value
        return out


@_checked_call
@dataclass(frozen=True)
class Compression(_Section):
    """Compression branch: attend to pooled blocks of keys and values.

    Attributes:
        block: block length ``l``: a compressed token pools ``l`` consecutive keys.
        stride: stride ``d`` between compressed tokens; ``d`` divides ``l``;
            ``d < l`` means overlapping blocks.
        pooling: ``mean`` (VideoNSA, fla) or ``mlp`` (NSA paper: an MLP over the
            block's keys plus learned intra-block position embeddings).
        visibility: ``causal`` (token ``i`` is visible to query ``t`` once its
            last position ``i*d + l - 1 <= t``) or ``videonsa_legacy`` (the mask
            VideoNSA ships: ``i*d + l - 1 >= t``, the query's own block and all
            later ones; only to reproduce released checkpoints).
        mlp_hidden: hidden width of the pooling MLP (``None``: the head dim).
    """

    SECTION: ClassVar[str] = "compression"
    block: int
    stride: int
    pooling: str = "mean"
    visibility: str = "causal"
    mlp_hidden: int | None = None

    def __post_init__(self) -> None:
        _positive_int(self._path("block"), self.block)
        _positive_int(self._path("stride"), self.stride)
        if self.block % self.stride:
            raise PatternError(
                self._path("stride"),
                f"a divisor of compression.block = {self.block}",
                self.stride,
            )
        _choice(self._path("pooling"), self.pooling, POOLINGS)
        _choice(self._path("visibility"), self.visibility, VISIBILITIES)
        _optional_positive_int(self._path("mlp_hidden"), self.mlp_hidden)
        if self.mlp_hidden is not None and self.pooling != "mlp":
            raise PatternError(self._path("mlp_hidden"), "no mlp_hidden unless pooling is 'mlp'", self.mlp_hidden)

    def num_tokens(self, length: int) -> int:
        """Number of complete compressed tokens in a sequence of ``length`` keys."""
        if length < self.block:
            return 0
        return (length - self.block) // self.stride + 1


@_checked_call
@dataclass(frozen=True)
class Selection(_Section):
    """Selection branch: attend to the full tokens of the top-``count`` blocks.

    Attributes:
        block: selection block length ``l'``.
        count: number of blocks ``n`` per query, forced blocks included.
        scoring: ``group`` (compression probabilities summed over the query
            heads that share a kv head; one selection per GQA group) or
            ``head`` (each query head selects on its own).
        forced: blocks always taken, from ``first``, ``previous``, ``current``.
        granularity: ``token`` (every query selects its own blocks: NSA) or
            ``query_block`` (the ``query_block`` consecutive queries of a tile
            share one selection, scored by their summed probabilities).
        query_block: tile size ``m`` for ``query_block`` granularity; must
            divide ``block``.
    """

    SECTION: ClassVar[str] = "selection"
    block: int
    count: int
    scoring: str = "group"
    forced: tuple[str, ...] = ("current",)
    granularity: str = "token"
    query_block: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.forced, list):
            object.__setattr__(self, "forced", tuple(self.forced))
        _positive_int(self._path("block"), self.block)
        _positive_int(self._path("count"), self.count)
        _choice(self._path("scoring"), self.scoring, SCORINGS)
        _string_tuple(self._path("forced"), self.forced, FORCED_BLOCKS)
        # Forced blocks count toward n.
        if self.count < len(self.forced):
            raise PatternError(
                self._path("count"),
                f"at least the number of forced blocks ({len(self.forced)}: {', '.join(self.forced)})",
                self.count,
            )
        _choice(self._path("granularity"), self.granularity, GRANULARITIES)
        if self.granularity == "query_block":
            if self.query_block is None:
                raise PatternError(self._path("query_block"), "a tile size m for granularity 'query_block'", None)
            _positive_int(self._path("query_block"), self.query_block)
            if self.block % self.query_block:
                raise PatternError(
                    self._path("query_block"),
                    f"a divisor of selection.block = {self.block} (a query tile must lie in one block)",
                    self.query_block,
                )
        elif self.query_block is not None:
            raise PatternError(self._path("query_block"), "no query_block unless granularity is 'query_block'", self.query_block)

    @property
    def keys_per_query(self) -> int:
        """Most selected keys one query attends: ``l' * n``."""
        return self.block * self.count


@_checked_call
@dataclass(frozen=True)
class Window(_Section):
    """Sliding-window branch: query ``t`` attends keys ``t - size < s <= t``."""

    SECTION: ClassVar[str] = "window"
    size: int

    def __post_init__(self) -> None:
        _positive_int(self._path("size"), self.size)


@_checked_call
@dataclass(frozen=True)
class Gate(_Section):
    """How branch outputs mix: ``out = sum_b gate_b * branch_b``.

    Attributes:
        kind: ``mlp`` (VideoNSA: Linear(hidden, hidden), GELU,
            Linear(hidden, heads x branches), divided by ``temperature``,
            sigmoid), ``linear`` (Linear(hidden, heads x branches), divided by
            ``temperature``, sigmoid) or ``constant`` (fixed ``values``, one per
            branch present, in the order compression, selection, window).
        temperature: divisor of the gate logits before the sigmoid.
        bias: initial bias of the last linear layer.
        values: the constant gate values.
    """

    SECTION: ClassVar[str] = "gate"
    kind: str = "mlp"
    temperature: float = 1.0
    bias: float = 0.0
    values: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, list):
            object.__setattr__(self, "values", tuple(self.values))
        _choice(self._path("kind"), self.kind, GATE_KINDS)
        _real(self._path("temperature"), self.temperature)
        if self.temperature <= 0:
            raise PatternError(self._path("temperature"), "a number > 0", self.temperature)
        _real(self._path("bias"), self.bias)
        if self.kind == "constant":
            if not isinstance(self.values, tuple) or not self.values:
                raise PatternError(self._path("values"), "a list of gate values, one per branch, for kind 'constant'", self.values)
            for index, value in enumerate(self.values):
                _real(f"{self._path('values')}[{index}]", value)
        elif self.values is not None:
            raise PatternError(self._path("values"), "no values unless kind is 'constant'", self.values)


@_checked_call
@dataclass(frozen=True)
class Hybrid(_Section):
    """Token classes: text queries attend densely and causally to every key;
    vision queries use the sparse branches over ``vision_keys``:

    * ``vision``: the vision tokens only, taken as one compacted sequence
      (block boundaries, windows and causality counted within it);
    * ``all``: every key, positions counted in the full sequence.
    """

    SECTION: ClassVar[str] = "hybrid"
    vision_keys: str = "vision"

    def __post_init__(self) -> None:
        _choice(self._path("vision_keys"), self.vision_keys, VISION_KEYS)


@_checked_call
@dataclass(frozen=True)
class Model(_Section):
    """Optional model shape the pattern is meant for (checked where given)."""

    SECTION: ClassVar[str] = "model"
    query_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _optional_positive_int(self._path(f.name), getattr(self, f.name))
        if self.query_heads is not None and self.kv_heads is not None and self.query_heads % self.kv_heads:
            raise PatternError(
                self._path("kv_heads"),
                f"a divisor of model.query_heads = {self.query_heads}",
                self.kv_heads,
            )


@_checked_call
@dataclass(frozen=True)
class Budget(_Section):
    """Constraints the pattern must meet.

    Attributes:
        max_keys_per_query: upper bound on ``K_attn = l' * n + w`` (selected
            plus window keys; compressed tokens not counted).
        max_attended_fraction: upper bound on attended / dense causal pairs at
            ``at_length`` (see :func:`nsaflex.budget.attended_fraction`).
        at_length: the length at which the fraction is checked.
    """

    SECTION: ClassVar[str] = "budget"
    max_keys_per_query: int | None = None
    max_attended_fraction: float | None = None
    at_length: int | None = None

    def __post_init__(self) -> None:
        _optional_positive_int(self._path("max_keys_per_query"), self.max_keys_per_query)
        _optional_positive_int(self._path("at_length"), self.at_length)
        if self.max_attended_fraction is not None:
            _real(self._path("max_attended_fraction"), self.max_attended_fraction)
            if not 0 < self.max_attended_fraction <= 1:
                raise PatternError(self._path("max_attended_fraction"), "a number in (0, 1]", self.max_attended_fraction)
            if self.at_length is None:
                raise PatternError(self._path("at_length"), "a length for max_attended_fraction", None)
        elif self.at_length is not None:
            raise PatternError(self._path("at_length"), "no at_length without max_attended_fraction", self.at_length)


@_checked_call
@dataclass(frozen=True)
class LayerOverride(_Section):
    """Per-layer changes. ``dense`` makes every query attend densely and
    causally in those layers; otherwise the given sections replace the base
    pattern's and the branches in ``remove`` are dropped."""

    SECTION: ClassVar[str] = ""
    at: tuple[int, ...]
    dense: bool = False
    compression: Compression | None = None
    selection: Selection | None = None
    window: Window | None = None
    remove: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("at", "remove"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.at, tuple) or not self.at:
            raise PatternError("at", "a non-empty list of layer indices", describe_value(self.at))
        for index, layer in enumerate(self.at):
            _positive_int(f"at[{index}]", layer, minimum=0)
        if len(set(self.at)) != len(self.at):
            raise PatternError("at", "no repeated layer indices", list(self.at))
        if not isinstance(self.dense, bool):
            raise PatternError("dense", "true or false", describe_value(self.dense))
        _string_tuple("remove", self.remove, BRANCH_ORDER)
        for name, cls in (("compression", Compression), ("selection", Selection), ("window", Window)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise PatternError(name, f"a {cls.__name__} section", describe_value(value))
            if value is not None and name in self.remove:
                raise PatternError("remove", f"not to remove {name!r}, which this override also sets", list(self.remove))
        changes = self.remove or any(getattr(self, n) is not None for n in BRANCH_ORDER)
        if self.dense and changes:
            raise PatternError("dense", "either dense: true or branch changes, not both", True)
        if not self.dense and not changes:
            raise PatternError("", "dense: true, a branch section or remove", "an override that changes nothing")


@_checked_call
@dataclass(frozen=True)
class Pattern(_Section):
    """A hybrid sparse-attention pattern.

    Branches present are mixed as ``sum_b gate_b * branch_b`` in the order
    :data:`BRANCH_ORDER`. ``selection`` needs ``compression`` (its scores come
    from the compression branch's probabilities). ``dense`` marks a resolved
    layer in which every query attends densely and causally.
    """

    SECTION: ClassVar[str] = ""
    name: str
    compression: Compression | None = None
    selection: Selection | None = None
    window: Window | None = None
    gate: Gate = field(default_factory=Gate)
    hybrid: Hybrid | None = None
    model: Model = field(default_factory=Model)
    layers: tuple[LayerOverride, ...] = ()
    budget: Budget | None = None
    description: str = ""
    dense: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple):
            raise PatternError("layers", "a list of LayerOverride", describe_value(self.layers))
        if len(self.layers) > MAX_LAYER_OVERRIDES:
            raise PatternError("layers", f"at most {MAX_LAYER_OVERRIDES} layer overrides", len(self.layers))
        if not isinstance(self.name, str) or not self.name:
            raise PatternError("name", "a non-empty string", describe_value(self.name))
        _utf8_text("name", self.name, "a name")
        if not isinstance(self.description, str):
            raise PatternError("description", "a string", describe_value(self.description))
        _utf8_text("description", self.description, "a description")
        if not isinstance(self.dense, bool):
            raise PatternError("dense", "true or false", describe_value(self.dense))
        for name, cls in (
            ("compression", Compression),
            ("selection", Selection),
            ("window", Window),
            ("hybrid", Hybrid),
            ("budget", Budget),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise PatternError(name, f"a {cls.__name__} section or nothing", describe_value(value))
        for name, cls in (("gate", Gate), ("model", Model)):
            if not isinstance(getattr(self, name), cls):
                raise PatternError(name, f"a {cls.__name__} section", describe_value(getattr(self, name)))
        self._check_branches()
        self._check_layers()
        self._check_budget()

    # -- checks -----------------------------------------------------------
    def _check_branches(self) -> None:
        if self.dense:
            return
        if not self.branches:
            raise PatternError("", "at least one of compression, selection, window (or dense: true)", "none")
        if self.selection is not None:
            if self.compression is None:
                raise PatternError("selection", "a compression section beside selection (selection is scored from it)", "no compression section")
            stride = self.compression.stride
            if self.selection.block % stride:
                # Eq. 9 of the NSA paper sums l'/d compression scores per selection block.
                raise PatternError(
                    "selection.block",
                    f"a multiple of compression.stride = {stride} (Eq. 9 maps scores in steps of the stride)",
                    self.selection.block,
                )
        if self.gate.kind == "constant" and len(self.gate.values or ()) != len(self.branches):
            raise PatternError(
                "gate.values",
                f"{len(self.branches)} values, one per branch ({', '.join(self.branches)})",
                list(self.gate.values or ()),
            )

    def _check_layers(self) -> None:
        seen: dict[int, int] = {}
        for position, override in enumerate(self.layers):
            if not isinstance(override, LayerOverride):
                raise PatternError(f"layers[{position}]", "a LayerOverride", describe_value(override))
            for layer in override.at:
                if layer in seen:
                    raise PatternError(
                        f"layers[{position}].at",
                        f"each layer in one override only (layer {layer} is also in layers[{seen[layer]}])",
                        list(override.at),
                    )
                if self.model.num_layers is not None and layer >= self.model.num_layers:
                    raise PatternError(
                        f"layers[{position}].at",
                        f"layer indices below model.num_layers = {self.model.num_layers}",
                        layer,
                    )
                seen[layer] = position
            try:
                self._apply(override)
            except PatternError as error:
                raise _prefixed(error, f"layers[{position}]") from None

    def _check_budget(self) -> None:
        if self.budget is None or self.dense:
            return
        if self.budget.max_keys_per_query is not None and self.keys_per_query > self.budget.max_keys_per_query:
            raise PatternError(
                "budget.max_keys_per_query",
                f"at least K_attn = l'*n + w = {self.keys_per_query} of this pattern",
                self.budget.max_keys_per_query,
            )
        if self.budget.max_attended_fraction is not None:
            try:
                from nsaflex.budget import attended_fraction
            except ModuleNotFoundError as error:
                if error.name != "nsaflex.budget":
                    raise
                raise PatternError(
                    "budget.max_attended_fraction",
                    "no max_attended_fraction (nsaflex.budget, which checks it, is not available)",
                    self.budget.max_attended_fraction,
                ) from None

            fraction = attended_fraction(self, self.budget.at_length)
            if fraction > self.budget.max_attended_fraction:
                raise PatternError(
                    "budget.max_attended_fraction",
                    f"at least the attended fraction {fraction:.4g} of this pattern at L = {self.budget.at_length}",
                    self.budget.max_attended_fraction,
                )

    # -- derived ----------------------------------------------------------
    @property
    def branches(self) -> tuple[str, ...]:
        """Branches present, in gate order (empty for a dense layer)."""
        if self.dense:
            return ()
        return tuple(name for name in BRANCH_ORDER if getattr(self, name) is not None)

    @property
    def keys_per_query(self) -> int:
        """``K_attn = l' * n + w``: selected plus window keys, compressed tokens not counted."""
        total = 0
        if self.selection is not None:
            total += self.selection.keys_per_query
        if self.window is not None:
            total += self.window.size
        return total

    @property
    def is_causal(self) -> bool:
        """Whether a query's output depends only on keys at or before it.

        ``videonsa_legacy`` compression looks at future blocks. ``query_block``
        selection is causal per tile only: a tile's shared selection is scored
        with all its queries, so see :attr:`causal_granularity`.
        """
        return self.dense or self.compression is None or self.compression.visibility == "causal"

    @property
    def causal_granularity(self) -> int:
        """Queries in the same aligned tile of this size may see each other's keys
        through the selection choice; 1 for per-token causality."""
        if self.selection is not None and self.selection.granularity == "query_block" and not self.dense:
            return int(self.selection.query_block or 1)
        return 1

    def _apply(self, override: LayerOverride) -> "Pattern":
        if override.dense:
            return dataclasses.replace(self, layers=(), dense=True, budget=None)
        # A branch override on a dense base makes that layer sparse.
        changes: dict[str, Any] = {"layers": (), "budget": None, "dense": False}
        for name in BRANCH_ORDER:
            if name in override.remove:
                changes[name] = None
            elif getattr(override, name) is not None:
                changes[name] = getattr(override, name)
        return dataclasses.replace(self, **changes)

    def for_layer(self, layer: int) -> "Pattern":
        """The pattern of decoder layer ``layer``, with its override applied
        (a pattern without ``layers``)."""
        _positive_int("layer", layer, minimum=0)
        for override in self.layers:
            if layer in override.at:
                return self._apply(override)
        return dataclasses.replace(self, layers=())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Leave defaults out so YAML written back stays small and readable.
        for key, empty in (("layers", []), ("description", ""), ("dense", False), ("model", {})):
            if out.get(key) == empty:
                out.pop(key, None)
        if out.get("gate") == Gate().to_dict():
            out.pop("gate")
        for override, layer in zip(out.get("layers", []), self.layers):
            if not override.get("remove"):
                override.pop("remove", None)
            if not override.get("dense"):
                override.pop("dense", None)
            # The YAML form of an override section is merged into the base
            # section field by field, so the fields the override leaves unset
            # are written as null (which removes them): the section then reads
            # back as written whatever the base section is (an ``extends``
            # child may change it).
            for name in BRANCH_ORDER:
                section = getattr(layer, name)
                if section is not None:
                    for f in dataclasses.fields(section):
                        override[name].setdefault(f.name, None)
        return out


def _prefixed(error: PatternError, prefix: str) -> PatternError:
    path = f"{prefix}.{error.key_path}" if error.key_path else prefix
    return PatternError(path, error.expected, error.found, hint=error.hint)
