"""Budget analysis: how much of dense causal attention a pattern computes.

Everything is a function of the sequence length ``L`` (a sympy symbol) and,
unless the pattern's ``model`` section fixes them, of the query heads ``H``,
the kv heads ``H_kv`` and the head dim ``D``. Lengths are lengths of the
*sparse sequence* (:doc:`docs/semantics.md`). For a ``hybrid`` pattern every
figure here is for **all-vision input** (every token a vision token, so every
query goes through the sparse branches over all ``L`` keys); text queries
would attend densely instead.

Conventions (also in :meth:`BudgetAnalysis.describe`):

* an *attended pair* of a branch is a (query ``t``, key) pair whose score the
  branch computes: key tokens ``s`` for selection and window, compressed
  tokens ``i`` for compression. Pairs are counted per branch; a key that both
  the window and the selection read counts twice (both branches compute it).
  Counts are per query head (multiply by ``H``) and per batch row.
* ``K_attn = l' * n + w``: the most key *tokens* one query attends
  (selection plus window; compressed tokens not counted), 2304 for VideoNSA.
  With compressed tokens: ``K_attn + N(L)``, ``N(L) = floor((L - l)/d) + 1``
  (about ``L/d``), the number of compressed tokens.
* *dense causal pairs*: ``L (L + 1) / 2`` (``s <= t``, the diagonal included).
* *attended fraction*: (selection pairs + window pairs) / dense causal pairs.
  Compressed-token pairs are reported on their own and in
  ``attended_fraction_with_compression``. The VideoNSA slide's
  ``gamma = 2 (c s + w) / (L - 1)`` (``c`` blocks of ``s`` tokens) is the
  large-``L`` approximation: it counts every selected block as full, so with
  ``current`` forced ``L * fraction -> 2 (K_attn - (l' - 1)/2)`` while
  ``L * gamma -> 2 K_attn``.
* FLOPs: ``4 D`` per attended (query head, key) pair forward (``2 D`` for
  ``q.k``, ``2 D`` for ``p v``); backward = 2.5 x forward, FlashAttention's
  convention. Softmax, pooling, gates and selection scoring are not counted.
* bytes moved, per branch and forward: the minimum traffic of a kernel that
  reads ``q`` (``H L D``), its keys and values once (``2 H_kv L_k D``: ``L_k =
  L`` for selection and window, ``N(L)`` pooled tokens for compression; the
  pooling pass itself is not counted) and writes its output (``H L D``), at
  ``element_bytes`` (2: bf16) per element. Gates and block indices are not
  counted; a fused kernel that reads ``q`` once moves less than the sum.

Exact counts (any ``L``, not only multiples of the blocks) follow the
semantics: window ``sum_t min(t + 1, w)``; compression: the compressed tokens
visible to each query; selection: for query ``t`` the tokens ``s <= t`` of its
selected blocks (forced blocks plus candidates, capped by ``n`` and by what
exists), which does not depend on the data because every candidate block is
complete. :func:`count_attended_pairs_bruteforce` enumerates the pairs by
plain loops, for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
from sympy import Integer, Min, Piecewise, Rational, floor

from nsaflex.errors import InputError
from nsaflex.spec import Compression, Pattern, Selection, Window

__all__ = [
    "BudgetAnalysis",
    "BudgetFigures",
    "D",
    "H",
    "H_KV",
    "L",
    "analyse",
    "attended_fraction",
    "compression_pairs",
    "count_attended_pairs",
    "count_attended_pairs_bruteforce",
    "dense_pairs",
    "selection_pairs",
    "window_pairs",
]

#: The sequence length (of the sparse sequence).
L = sympy.Symbol("L", integer=True, positive=True)
#: Query heads, kv heads and head dim when the pattern's model does not fix them.
H = sympy.Symbol("H", integer=True, positive=True)
H_KV = sympy.Symbol("H_kv", integer=True, positive=True)
D = sympy.Symbol("D", integer=True, positive=True)

#: Elements are counted at this many bytes (bf16) unless told otherwise.
ELEMENT_BYTES = 2
#: FlashAttention's convention: backward = 2.5 x forward FLOPs.
BACKWARD_FACTOR = Rational(5, 2)
FLOPS_PER_PAIR_PER_DIM = 4
SPARSE_BRANCHES = ("selection", "window")  # the branches the attended fraction counts


def _check_length(length: object) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InputError("length", "an integer >= 1", length)
    return length


# --- exact counts, plain integers -------------------------------------------------------


def _tri(x: int) -> int:
    return x * (x + 1) // 2


def dense_pairs(length: int) -> int:
    """Dense causal pairs ``L (L + 1) / 2``."""
    return _tri(length)


def window_pairs(window: Window, length: int) -> int:
    """``sum_{t < L} min(t + 1, w)``."""
    w = window.size
    if length <= w:
        return _tri(length)
    return w * length - w * (w - 1) // 2


def compression_pairs(compression: Compression, length: int) -> int:
    """(query, compressed token) pairs with the token visible to the query.

    Token ``i`` (``N = floor((L - l)/d) + 1`` exist) is seen by the
    ``L - (i d + l - 1)`` queries from its last position on (causal) or by the
    ``i d + l`` queries up to it (``videonsa_legacy``).
    """
    tokens = compression.num_tokens(length)
    l, d = compression.block, compression.stride
    if tokens == 0:
        return 0
    if compression.visibility == "causal":
        return tokens * (length - l + 1) - d * tokens * (tokens - 1) // 2
    return tokens * l + d * tokens * (tokens - 1) // 2


def _sum_min_floor(x: int, cap: int, b: int) -> int:
    """``sum_{u < x} min(cap, floor(u / b))``."""
    q, r = divmod(x, b)
    full = q * (q - 1) // 2 if q <= cap + 1 else cap * q - cap * (cap + 1) // 2
    return b * full + r * min(cap, q)


def _selection_mode(selection: Selection) -> str:
    """Which closed form counts this selection (see :func:`selection_pairs`)."""
    if "current" in selection.forced:
        return "current"
    # A tile of one query is token granularity; for m >= 2 (m divides l') a
    # tile's first query never ends a block, so the current block is never a
    # candidate.
    if selection.granularity == "query_block" and (selection.query_block or 1) > 1:
        return "query_block"
    return "token"


def selection_pairs(selection: Selection, length: int) -> int:
    """(query, key token) pairs of the selection branch; independent of the data.

    Per query ``t`` (block ``c = t // l'``, offset ``o = t - c l'``):

    * ``current`` forced (either granularity): ``min(n, c + 1)`` blocks, the
      current one up to ``t``: ``l' min(n - 1, c) + o + 1`` tokens;
    * token granularity otherwise: ``l' min(n, floor((t + 1)/l'))`` (complete
      blocks only), plus ``t + 1`` for ``t < l' - 1`` when ``first`` is forced
      (block 0 is taken while still partial);
    * query_block granularity (tile ``m >= 2``) otherwise: the tile's shared
      choice has ``min(n, c)`` complete blocks: ``l' min(n, c)``, plus ``t + 1``
      for ``t < l'`` when ``first`` is forced.
    """
    b, n = selection.block, selection.count
    first = "first" in selection.forced
    mode = _selection_mode(selection)
    if mode == "current":
        q, r = divmod(length, b)
        return b * _sum_min_floor(length, n - 1, b) + q * _tri(b) + _tri(r)
    if mode == "token":
        return b * _sum_min_floor(length + 1, n, b) + (_tri(min(length, b - 1)) if first else 0)
    return b * _sum_min_floor(length, n, b) + (_tri(min(length, b)) if first else 0)


def count_attended_pairs(pattern: Pattern, length: int) -> dict[str, int]:
    """Exact attended pairs per branch at ``length`` (per query head, all-vision
    input); ``{"dense": L (L + 1) / 2}`` for a dense layer."""
    length = _check_length(length)
    if pattern.dense:
        return {"dense": dense_pairs(length)}
    out: dict[str, int] = {}
    if pattern.compression is not None:
        out["compression"] = compression_pairs(pattern.compression, length)
    if pattern.selection is not None:
        out["selection"] = selection_pairs(pattern.selection, length)
    if pattern.window is not None:
        out["window"] = window_pairs(pattern.window, length)
    return out


def attended_fraction(pattern: Pattern, length: int) -> float:
    """Exact (selection + window pairs) / dense causal pairs at ``length``.

    Compressed tokens are not counted (see the module docstring); a dense
    layer gives 1.0. Hybrid patterns: all-vision input.
    """
    pairs = count_attended_pairs(pattern, length)
    if pattern.dense:
        return 1.0
    attended = sum(pairs.get(name, 0) for name in SPARSE_BRANCHES)
    return attended / dense_pairs(length)


# --- brute force ------------------------------------------------------------------------------


def _bruteforce_selected_blocks(selection: Selection, query: int) -> set[int]:
    """The blocks query ``query`` attends, by the letter of the semantics
    (the data only orders candidates; any order gives the same count)."""
    b = selection.block
    # query_block: the tile shares the choice made for its first query.
    at = query
    if selection.granularity == "query_block":
        m = selection.query_block or 1
        at = (query // m) * m
    current = at // b
    forced: set[int] = set()
    if "first" in selection.forced:
        forced.add(0)
    if "previous" in selection.forced and current - 1 >= 0:
        forced.add(current - 1)
    if "current" in selection.forced:
        forced.add(current)
    candidates = []
    j = 0
    while (j + 1) * b - 1 <= at:
        if j not in forced:
            candidates.append(j)
        j += 1
    slots = selection.count - len(forced)
    return forced | set(candidates[: max(slots, 0)])


def count_attended_pairs_bruteforce(pattern: Pattern, length: int) -> dict[str, int]:
    """Attended pairs per branch by enumerating every ``(t, s)`` pair (O(L^2)); for tests."""
    length = _check_length(length)
    out: dict[str, int] = {}
    if pattern.dense:
        out["dense"] = sum(1 for t in range(length) for s in range(length) if s <= t)
        return out
    if pattern.compression is not None:
        c = pattern.compression
        count = 0
        for t in range(length):
            i = 0
            while i * c.stride + c.block <= length:  # token i exists
                last = i * c.stride + c.block - 1
                visible = last <= t if c.visibility == "causal" else last >= t
                count += visible
                i += 1
        out["compression"] = count
    if pattern.selection is not None:
        sel = pattern.selection
        count = 0
        for t in range(length):
            blocks = _bruteforce_selected_blocks(sel, t)
            for s in range(length):
                if s <= t and s // sel.block in blocks:
                    count += 1
        out["selection"] = count
    if pattern.window is not None:
        w = pattern.window.size
        out["window"] = sum(1 for t in range(length) for s in range(length) if t - w < s <= t)
    return out


# --- symbolic forms ------------------------------------------------------------------------------


def _tri_expr(x: Any) -> Any:
    return x * (x + 1) / 2


def _sum_min_floor_expr(x: Any, cap: int, b: int) -> Any:
    q = floor(x / b)
    full = Piecewise((q * (q - 1) / 2, q <= cap + 1), (cap * q - Rational(cap * (cap + 1), 2), True))
    return b * full + (x - b * q) * Min(cap, q)


def _num_tokens_expr(compression: Compression) -> Any:
    return Piecewise((0, L < compression.block), (floor((L - compression.block) / compression.stride) + 1, True))


def _exact_expr(pattern: Pattern, branch: str) -> Any:
    """Exact pairs of ``branch`` for every integer ``L >= 1`` (Piecewise/floor)."""
    if branch == "dense":
        return _tri_expr(L)
    if branch == "window":
        assert pattern.window is not None
        w = pattern.window.size
        return Piecewise((_tri_expr(L), L <= w), (w * L - Rational(w * (w - 1), 2), True))
    if branch == "compression":
        c = pattern.compression
        assert c is not None
        n_tok = floor((L - c.block) / c.stride) + 1
        if c.visibility == "causal":
            body = n_tok * (L - c.block + 1) - c.stride * n_tok * (n_tok - 1) / 2
        else:
            body = n_tok * c.block + c.stride * n_tok * (n_tok - 1) / 2
        return Piecewise((0, L < c.block), (body, True))
    sel = pattern.selection
    assert branch == "selection" and sel is not None
    b, n = sel.block, sel.count
    first = "first" in sel.forced
    mode = _selection_mode(sel)
    if mode == "current":
        q = floor(L / b)
        r = L - b * q
        return b * _sum_min_floor_expr(L, n - 1, b) + q * _tri(b) + _tri_expr(r)
    if mode == "token":
        return b * _sum_min_floor_expr(L + 1, n, b) + (_tri_expr(Min(L, b - 1)) if first else 0)
    return b * _sum_min_floor_expr(L, n, b) + (_tri_expr(Min(L, b)) if first else 0)


def _aligned_expr(pattern: Pattern, branch: str) -> Any:
    """Pairs of ``branch`` as a polynomial in ``L``, exact when ``L`` is a multiple
    of the alignment and at least ``aligned_from`` (see :func:`_alignment`)."""
    if branch == "dense":
        return _tri_expr(L)
    if branch == "window":
        assert pattern.window is not None
        w = pattern.window.size
        return w * L - Rational(w * (w - 1), 2)
    if branch == "compression":
        c = pattern.compression
        assert c is not None
        n_tok = (L - c.block) / c.stride + 1
        if c.visibility == "causal":
            return n_tok * (L - c.block + 1) - c.stride * n_tok * (n_tok - 1) / 2
        return n_tok * c.block + c.stride * n_tok * (n_tok - 1) / 2
    sel = pattern.selection
    assert branch == "selection" and sel is not None
    b, n = sel.block, sel.count
    first = "first" in sel.forced
    mode = _selection_mode(sel)
    if mode == "current":
        m = n - 1
        return b * m * L - Rational(b * b * m * (m + 1), 2) + Rational(b + 1, 2) * L
    if mode == "token":
        return b * (n * L - Rational(b * n * (n + 1), 2) + n) + (Rational(b * (b - 1), 2) if first else 0)
    return b * (n * L - Rational(b * n * (n + 1), 2)) + (Rational(b * (b + 1), 2) if first else 0)


def _alignment(pattern: Pattern) -> tuple[int, int]:
    """``(A, L0)``: the aligned forms hold for ``L`` in ``A, 2A, ...`` with ``L >= L0``."""
    if pattern.dense:
        return 1, 1
    align, start = 1, 1
    if pattern.compression is not None:
        align = math.lcm(align, pattern.compression.stride)
        start = max(start, pattern.compression.block)
    if pattern.selection is not None:
        align = math.lcm(align, pattern.selection.block)
        start = max(start, pattern.selection.block * pattern.selection.count)
    if pattern.window is not None:
        start = max(start, pattern.window.size)
    return align, -(-start // align) * align


def _simplify(expr: Any) -> Any:
    if isinstance(expr, Piecewise) or expr.has(Piecewise) or expr.has(floor):
        return expr
    return sympy.expand(sympy.simplify(expr))


# --- the analysis ------------------------------------------------------------------------------


def _as_number(value: Any) -> Any:
    """A sympy result as a Python int/float where it has no free symbols."""
    value = sympy.sympify(value)
    if value.free_symbols:
        return value
    if value.is_Integer:
        return int(value)
    return float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, sympy.Basic):
        number = _as_number(value)
        return number if not isinstance(number, sympy.Basic) else str(number)
    return value


@dataclass(frozen=True)
class BudgetFigures:
    """The analysis evaluated at one length (ints exact; FLOPs and bytes are sympy
    expressions in whichever of ``H``, ``H_kv``, ``D`` the model leaves free)."""

    length: int
    pairs: dict[str, int]
    dense_pairs: int
    attended_pairs: int
    attended_fraction: float
    attended_fraction_with_compression: float
    gamma: float | None
    keys_per_query: int
    compressed_tokens: int
    keys_per_query_with_compression: int
    flops_forward: dict[str, Any]
    flops_backward: dict[str, Any]
    flops_forward_total: Any
    flops_backward_total: Any
    dense_flops_forward: Any
    dense_flops_backward: Any
    bytes_moved: dict[str, Any]
    bytes_moved_total: Any
    dense_bytes_moved: Any

    @property
    def flops_ratio(self) -> Any:
        """Sparse / dense forward FLOPs (all branches, compressed tokens included)."""
        return _as_number(sympy.sympify(self.flops_forward_total) / sympy.sympify(self.dense_flops_forward))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: numbers as numbers, symbolic figures as strings."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["flops_ratio"] = self.flops_ratio
        return _jsonable(out)


@dataclass(frozen=True)
class BudgetAnalysis:
    """Closed forms of a pattern's budget in ``L`` (see the module docstring for
    what is counted).

    Attributes:
        pattern_name: the pattern analysed.
        branches: branches present (``("dense",)`` for a dense layer).
        length: the symbol ``L``.
        query_heads, kv_heads, head_dim: from the model section, else the symbols
            ``H``, ``H_kv``, ``D``.
        element_bytes: bytes per element for ``bytes_moved``.
        keys_per_query: ``K_attn = l' n + w`` (``L`` for a dense layer).
        compressed_tokens: ``N(L)``.
        keys_per_query_with_compression: ``K_attn + N(L)``.
        pairs: exact pairs per branch, valid for every integer ``L >= 1``.
        pairs_aligned: the same as polynomials in ``L``, exact for ``L`` a
            multiple of ``alignment`` and ``L >= aligned_from``.
        dense_pairs: ``L (L + 1) / 2``.
        attended_pairs: selection + window pairs (exact).
        attended_fraction, attended_fraction_aligned: attended / dense pairs.
        attended_fraction_with_compression: compressed-token pairs added.
        gamma: ``2 K_attn / (L - 1)``, the VideoNSA slide's approximation.
        flops_forward, flops_backward: per branch (exact).
        dense_flops_forward, dense_flops_backward: dense causal attention.
        bytes_moved: per branch, forward; dense_bytes_moved likewise.
    """

    pattern_name: str
    branches: tuple[str, ...]
    is_hybrid: bool
    length: Any
    query_heads: Any
    kv_heads: Any
    head_dim: Any
    element_bytes: int
    keys_per_query: Any
    compressed_tokens: Any
    keys_per_query_with_compression: Any
    pairs: dict[str, Any]
    pairs_aligned: dict[str, Any]
    alignment: int
    aligned_from: int
    dense_pairs: Any
    attended_pairs: Any
    attended_fraction: Any
    attended_fraction_aligned: Any
    attended_fraction_with_compression: Any
    gamma: Any
    flops_forward: dict[str, Any]
    flops_backward: dict[str, Any]
    dense_flops_forward: Any
    dense_flops_backward: Any
    bytes_moved: dict[str, Any]
    dense_bytes_moved: Any
    _pattern: Pattern = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def evaluate(self, length: int) -> BudgetFigures:
        """Every figure at ``length`` (exact integer pair counts)."""
        length = _check_length(length)
        pattern = self._pattern
        pairs = count_attended_pairs(pattern, length)
        dense = dense_pairs(length)
        attended = dense if pattern.dense else sum(pairs.get(b, 0) for b in SPARSE_BRANCHES)
        with_compression = attended + pairs.get("compression", 0)
        tokens = 0 if pattern.dense or pattern.compression is None else pattern.compression.num_tokens(length)
        keys = length if pattern.dense else pattern.keys_per_query
        per_pair = FLOPS_PER_PAIR_PER_DIM * self.query_heads * self.head_dim
        flops_fwd = {b: _as_number(per_pair * p) for b, p in pairs.items()}
        flops_bwd = {b: _as_number(BACKWARD_FACTOR * per_pair * p) for b, p in pairs.items()}
        subs = {L: length}
        moved = {b: _as_number(expr.subs(subs)) for b, expr in self.bytes_moved.items()}
        return BudgetFigures(
            length=length,
            pairs=pairs,
            dense_pairs=dense,
            attended_pairs=attended,
            attended_fraction=attended / dense,
            attended_fraction_with_compression=with_compression / dense,
            gamma=None if length < 2 or pattern.dense else 2 * keys / (length - 1),
            keys_per_query=keys,
            compressed_tokens=tokens,
            keys_per_query_with_compression=keys + tokens,
            flops_forward=flops_fwd,
            flops_backward=flops_bwd,
            flops_forward_total=_as_number(sum(sympy.sympify(v) for v in flops_fwd.values())),
            flops_backward_total=_as_number(sum(sympy.sympify(v) for v in flops_bwd.values())),
            dense_flops_forward=_as_number(per_pair * dense),
            dense_flops_backward=_as_number(BACKWARD_FACTOR * per_pair * dense),
            bytes_moved=moved,
            bytes_moved_total=_as_number(sum(sympy.sympify(v) for v in moved.values())),
            dense_bytes_moved=_as_number(self.dense_bytes_moved.subs(subs)),
        )

    def describe(self) -> list[str]:
        """The counting conventions, one sentence each (printed by the CLI)."""
        lines = [
            "pairs: (query, key) scores a branch computes, per query head and batch row; "
            "compression counts compressed tokens; a key read by two branches counts twice",
            "attended fraction = (selection + window pairs) / dense causal pairs L(L+1)/2; "
            "gamma = 2 K_attn / (L - 1) is the large-L approximation (full blocks)",
            "FLOPs: 4 D per (query head, key) pair forward (QK^T and PV); backward 2.5 x forward "
            "(FlashAttention's convention); softmax, pooling, gates, scoring not counted",
            f"bytes: per branch, read q, k, v once (compression: pooled K, V) and write the output, "
            f"{self.element_bytes} bytes per element; gates and indices not counted",
        ]
        if self.is_hybrid:
            lines.insert(0, "hybrid pattern: figures for all-vision input (every query sparse)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The closed forms as strings (JSON-serialisable)."""
        out = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if not name.startswith("_")
        }
        out = _jsonable(out)
        out["conventions"] = self.describe()
        return out


def analyse(pattern: Pattern, *, layer: int | None = None, element_bytes: int = ELEMENT_BYTES) -> BudgetAnalysis:
    """The symbolic budget of ``pattern`` (resolved for decoder ``layer`` when given)."""
    if layer is not None:
        pattern = pattern.for_layer(layer)
    model = pattern.model
    hq = Integer(model.query_heads) if model.query_heads else H
    hkv = Integer(model.kv_heads) if model.kv_heads else H_KV
    dim = Integer(model.head_dim) if model.head_dim else D

    branches = ("dense",) if pattern.dense else pattern.branches
    pairs = {b: _exact_expr(pattern, b) for b in branches}
    aligned = {b: _simplify(_aligned_expr(pattern, b)) for b in branches}
    dense = _tri_expr(L)
    if pattern.dense:
        attended, attended_aligned, with_compression = dense, dense, dense
        keys: Any = L
        tokens: Any = Integer(0)
    else:
        attended = sum((pairs[b] for b in SPARSE_BRANCHES if b in pairs), Integer(0))
        attended_aligned = sum((aligned[b] for b in SPARSE_BRANCHES if b in aligned), Integer(0))
        with_compression = attended + pairs.get("compression", Integer(0))
        keys = Integer(pattern.keys_per_query)
        tokens = _num_tokens_expr(pattern.compression) if pattern.compression is not None else Integer(0)
    align, start = _alignment(pattern)

    per_pair = FLOPS_PER_PAIR_PER_DIM * hq * dim
    flops_fwd = {b: per_pair * p for b, p in pairs.items()}
    flops_bwd = {b: BACKWARD_FACTOR * f for b, f in flops_fwd.items()}

    def traffic(key_tokens: Any) -> Any:
        return element_bytes * dim * (2 * hq * L + 2 * hkv * key_tokens)

    moved = {b: traffic(tokens if b == "compression" else L) for b in branches}
    return BudgetAnalysis(
        pattern_name=pattern.name,
        branches=branches,
        is_hybrid=pattern.hybrid is not None and not pattern.dense,
        length=L,
        query_heads=hq,
        kv_heads=hkv,
        head_dim=dim,
        element_bytes=element_bytes,
        keys_per_query=keys,
        compressed_tokens=tokens,
        keys_per_query_with_compression=keys + tokens,
        pairs=pairs,
        pairs_aligned=aligned,
        alignment=align,
        aligned_from=start,
        dense_pairs=dense,
        attended_pairs=attended,
        attended_fraction=attended / dense,
        attended_fraction_aligned=sympy.factor(attended_aligned / dense) if not pattern.dense else Integer(1),
        attended_fraction_with_compression=with_compression / dense,
        gamma=Integer(1) if pattern.dense else 2 * keys / (L - 1),
        flops_forward=flops_fwd,
        flops_backward=flops_bwd,
        dense_flops_forward=sympy.factor(per_pair * dense),
        dense_flops_backward=sympy.factor(BACKWARD_FACTOR * per_pair * dense),
        bytes_moved={b: sympy.factor(m) for b, m in moved.items()},
        dense_bytes_moved=sympy.factor(traffic(L)),
        _pattern=pattern,
    )
