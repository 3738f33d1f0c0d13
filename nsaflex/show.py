"""See a pattern: which keys each query attends, per branch, and its budget against ``L``.

Pictures follow attention-gym's mask convention: query rows down, key columns
across, so causal attention is the lower-left triangle. NSA's branches are
drawn apart, one panel and one colour each, then combined:

* ``compression``: key ``s`` is attended by query ``t`` when a compressed token
  visible to ``t`` pools ``s`` (a compressed key counts the keys of its block);
* ``selection``: the keys ``s <= t`` of the blocks query ``t`` selects. The choice
  depends on the input, so a picture is for one query head (its GQA group for
  ``scoring: group``) of one batch row;
* ``window``: ``t - w < s <= t``;
* ``dense``: the dense causal path of text queries (hybrid patterns) or of a
  dense layer;
* ``combined``: the union.

Every mask comes from :mod:`nsaflex.reference` (visibility, Eq. 9 scores,
block choice, window and causal masks), applied to the row's sparse sequence
(for ``vision_keys: vision`` the vision tokens compacted in order) and scattered
back to positions in the full row. Masks are ``[L, L]`` bool, ``mask[t, s]``.

The budget plot evaluates the closed forms of :func:`nsaflex.budget.analyse`
over a range of lengths: keys per query (pairs / ``L``) and attended fraction
(pairs / ``L (L + 1) / 2``) per branch. As in :mod:`nsaflex.budget`, compression
counts compressed tokens there and hybrid patterns are taken as all-vision.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.text import Text

from nsaflex.errors import InputError, NsaflexError
from nsaflex.inputs import check_inputs
from nsaflex.pooling import MLPPooling, block_windows, compress
from nsaflex.reference import (
    causal_mask,
    compression_visibility,
    masked_attention,
    selected_blocks,
    selection_mask,
    selection_scores,
    sparse_row_indices,
    window_mask,
)
from nsaflex.spec import Pattern

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BRANCH_COLOURS",
    "DEFAULT_LENGTH",
    "INPUT_KINDS",
    "MAX_LENGTH",
    "ShowInputs",
    "attended_masks",
    "budget_series",
    "load_inputs",
    "make_inputs",
    "mask_counts",
    "pattern_summaries",
    "plot_budget",
    "plot_masks",
    "resolve_layer",
    "terminal_picture",
]

#: Length of the pictures unless told otherwise.
DEFAULT_LENGTH = 4096
#: Longest picture: masks are dense ``[L, L]`` bool tensors, one per branch.
MAX_LENGTH = 8192
#: Query heads, kv heads and head dim of generated inputs when the pattern's model does not fix them.
DEFAULT_SHAPE = (4, 2, 64)
#: One colour per panel (matplotlib's tab10 colours, so PNG and terminal agree).
BRANCH_COLOURS: dict[str, tuple[int, int, int]] = {
    "compression": (31, 119, 180),
    "selection": (214, 39, 40),
    "window": (44, 160, 44),
    "dense": (127, 127, 127),
}
INPUT_KINDS = ("random", "video")
PNG_DPI = 100
#: Side of the PNG image of one panel, in tiles: longer masks are averaged over square tiles.
PNG_TILES = 512


# --- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShowInputs:
    """Attention inputs in the API layout: q ``[B, Hq, L, D]``, k and v
    ``[B, Hkv, L, D]``, token_types ``[B, L]`` (0 text, 1 vision) or None;
    ``source`` says where they came from (``random``, ``video`` or a file)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    token_types: torch.Tensor | None
    source: str

    @property
    def length(self) -> int:
        return int(self.q.shape[2])


def _check_length(length: object, argument: str = "length") -> int:
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_LENGTH:
        raise InputError(argument, f"an integer in 1..{MAX_LENGTH} (a picture holds dense [L, L] masks)", length)
    return length


def resolve_layer(pattern: Pattern, layer: int | None) -> Pattern:
    """The pattern of decoder ``layer`` (its override applied), or the base
    pattern when ``layer`` is None. A layer at or past ``model.num_layers`` is refused."""
    if layer is None:
        return dataclasses.replace(pattern, layers=())
    layers = pattern.model.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or (layers is not None and layer >= layers):
        bound = f"0..{layers - 1} (model.num_layers = {layers})" if layers is not None else ">= 0"
        raise InputError("layer", f"a decoder layer index in {bound}", layer)
    return pattern.for_layer(layer)


def _text_tokens(pattern: Pattern, length: int, text_tokens: int | None) -> int:
    """Leading text tokens of generated inputs: an eighth of the row for hybrid
    patterns unless told (so the dense text path shows), none otherwise."""
    if text_tokens is None:
        return length // 8 if pattern.hybrid is not None else 0
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or not 0 <= text_tokens <= length:
        raise InputError("text_tokens", f"an integer in 0..{length} (the length)", text_tokens)
    if text_tokens and pattern.hybrid is None:
        raise InputError("text_tokens", "0: the pattern has no hybrid section, so it has no text tokens", text_tokens)
    return text_tokens


def make_inputs(
    pattern: Pattern, length: int, kind: str = "random", *, seed: int = 0, text_tokens: int | None = None
) -> ShowInputs:
    """One batch row of ``random`` (i.i.d. normal) or ``video`` (frame-structured,
    :mod:`nsaflex.video_inputs`) inputs, float64, shaped by the pattern's model
    section (else :data:`DEFAULT_SHAPE`); hybrid patterns get ``text_tokens``
    leading text tokens and vision tokens after them."""
    from nsaflex.video_inputs import random_qkv, video_qkv

    length = _check_length(length)
    if kind not in INPUT_KINDS:
        raise InputError("inputs", f"one of {', '.join(INPUT_KINDS)}", kind)
    text = _text_tokens(pattern, length, text_tokens)
    model = pattern.model
    query_heads = model.query_heads or (model.kv_heads or DEFAULT_SHAPE[1]) * (DEFAULT_SHAPE[0] // DEFAULT_SHAPE[1])
    kv_heads = model.kv_heads or (DEFAULT_SHAPE[1] if query_heads % DEFAULT_SHAPE[1] == 0 else 1)
    dim = model.head_dim or DEFAULT_SHAPE[2]
    maker = video_qkv if kind == "video" else random_qkv
    q, k, v = maker(1, query_heads, kv_heads, length, dim, seed=seed, dtype=torch.float64)
    types = None
    if pattern.hybrid is not None:
        types = torch.ones(1, length, dtype=torch.long)
        types[:, :text] = 0
    return ShowInputs(q, k, v, types, kind)


def load_inputs(path: str | os.PathLike[str]) -> ShowInputs:
    """Tensors saved with ``torch.save({"q": q, "k": k, "v": v, "token_types": t}, path)``
    in the API layout (``token_types`` only for hybrid patterns). Shapes are
    checked against the pattern by :func:`attended_masks`."""
    source = str(path)
    if not Path(source).is_file():
        raise InputError("tensors", "an existing file written by torch.save", source)
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a tensor archive
        raise InputError("tensors", "a file written by torch.save holding tensors", f"{source} ({error})") from None
    if not isinstance(data, Mapping):
        raise InputError("tensors", "a dict with keys q, k, v (and token_types)", f"{type(data).__name__} in {source}")
    missing = [name for name in ("q", "k", "v") if name not in data]
    unknown = sorted(set(map(str, data)) - {"q", "k", "v", "token_types"})
    if missing or unknown:
        found = f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}"
        raise InputError("tensors", "a dict with keys q, k, v (and token_types)", f"{found} in {source}")
    for name in ("q", "k", "v", "token_types"):
        if name in data and data[name] is not None and not isinstance(data[name], torch.Tensor):
            raise InputError(f"tensors[{name!r}]", "a torch.Tensor", type(data[name]).__name__)
    tensors = [data[name] for name in ("q", "k", "v")]
    if any(t.dim() != 4 for t in tensors):
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip("qkv", tensors))
        raise InputError("tensors", "q, k, v in the API layout [B, H, L, D]", shapes)
    if not 1 <= tensors[0].shape[2] <= MAX_LENGTH:
        raise InputError("tensors", f"a length L in 1..{MAX_LENGTH} (q is [B, H, L, D])", list(tensors[0].shape))
    return ShowInputs(*tensors, data.get("token_types"), source)


# --- masks ----------------------------------------------------------------------------------------


def _compression_cover(length: int, pattern: Pattern) -> torch.Tensor:
    """``[N, L]``: compressed token ``i`` pools key ``s``, read off the pooling's own block windows."""
    compression = pattern.compression
    assert compression is not None
    positions = torch.arange(length, dtype=torch.float64)[None, None, :, None]
    pooled = block_windows(positions, compression.block, compression.stride)[0, 0, :, :, 0].long()  # [N, l]
    cover = torch.zeros(pooled.shape[0], length, dtype=torch.bool)
    cover.scatter_(1, pooled, True)
    return cover


def _sparse_masks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, head: int, seed: int
) -> dict[str, torch.Tensor]:
    """``[T, T]`` masks of each branch over one sparse sequence, for query head
    ``head`` of ``q [G, T, D]`` (the query heads of one kv head, ``k, v [1, T, D]``)."""
    length = q.shape[1]
    masks: dict[str, torch.Tensor] = {}
    if pattern.compression is not None:
        visible = compression_visibility(length, pattern.compression)
        cover = _compression_cover(length, pattern)
        masks["compression"] = (visible.double() @ cover.double()) > 0
    if pattern.selection is not None:
        assert pattern.compression is not None
        pooler = None
        if pattern.compression.pooling == "mlp":
            # An untrained pooler, seeded: a picture of selection with mlp pooling
            # is for these weights (a trained model's tensors give its own choice).
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                pooler = MLPPooling(pattern.compression, q.shape[-1], dtype=torch.float64)
        with torch.no_grad():
            compressed_k, compressed_v = compress(k[None], v[None], pattern.compression, pooler)
            _, probabilities = masked_attention(q, compressed_k[0], compressed_v[0], visible)
        scores = selection_scores(probabilities, pattern.compression, pattern.selection, length, q.shape[0])
        blocks = selected_blocks(scores[head : head + 1], pattern.selection)
        masks["selection"] = selection_mask(blocks, pattern.selection.block, length)[0]
    if pattern.window is not None:
        masks["window"] = window_mask(length, pattern.window.size)
    return masks


def attended_masks(
    pattern: Pattern,
    length: int | None = None,
    *,
    layer: int | None = None,
    inputs: str | ShowInputs = "random",
    head: int = 0,
    row: int = 0,
    text_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Which keys each query attends, per branch: ``{name: bool [L, L]}``.

    ``mask[t, s]``: query ``t`` of query head ``head`` in batch row ``row``
    attends key ``s``. Names, in order: the branches present (``compression``,
    ``selection``, ``window``), ``dense`` when some query takes the dense causal
    path (text queries of a hybrid pattern, every query of a dense layer), and
    ``combined`` (the union). A compressed token attended marks every key it pools.

    ``inputs`` is ``random`` or ``video`` (generated at ``length``, see
    :func:`make_inputs`, with ``text_tokens`` and ``seed``) or a
    :class:`ShowInputs` (its own length; ``length`` must be None or equal).
    ``layer`` applies the pattern's per-layer override (None: the base pattern).
    Raises InputError naming a bad length, layer, head, row or tensor.
    """
    resolved = resolve_layer(pattern, layer)
    if isinstance(inputs, ShowInputs):
        if length is not None and length != inputs.length:
            raise InputError("length", f"the length of the given tensors ({inputs.length}) or nothing", length)
        if text_tokens is not None:
            raise InputError("text_tokens", "nothing with given tensors (their token_types say which tokens are text)", text_tokens)
        given = inputs
    else:
        given = make_inputs(resolved, DEFAULT_LENGTH if length is None else length, inputs, seed=seed, text_tokens=text_tokens)
    q, k, v, types = given.q, given.k, given.v, given.token_types
    # Gates weigh branch outputs and never change which keys a branch attends; ones pass the check.
    gates = torch.ones(q.shape[0], q.shape[1], q.shape[2], len(resolved.branches), dtype=q.dtype) if q.dim() == 4 else None
    shapes = check_inputs(resolved, q, k, v, gates if resolved.branches else None, types)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < shapes.query_heads:
        raise InputError("head", f"a query head index in 0..{shapes.query_heads - 1}", head)
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < shapes.batch:
        raise InputError("row", f"a batch row index in 0..{shapes.batch - 1}", row)

    length = shapes.length
    causal = causal_mask(length)
    masks: dict[str, torch.Tensor] = {}
    if resolved.dense:
        return {"dense": causal, "combined": causal.clone()}
    row_types = types[row].cpu() if types is not None else None
    index = sparse_row_indices(resolved, row_types, length)
    sparse_query = torch.zeros(length, dtype=torch.bool)
    sparse_query[index] = True
    if row_types is not None:
        sparse_query &= row_types == 1
    group = shapes.group
    kv_head = head // group
    heads = slice(kv_head * group, (kv_head + 1) * group)
    row_q = q[row, heads][:, index].double().cpu()
    row_k = k[row, kv_head : kv_head + 1][:, index].double().cpu()
    row_v = v[row, kv_head : kv_head + 1][:, index].double().cpu()
    for name, compact in _sparse_masks(row_q, row_k, row_v, resolved, head - kv_head * group, seed).items():
        # Columns then rows: a 2-d advanced index would build [T, T] int64 index tensors.
        columns = torch.zeros(compact.shape[0], length, dtype=torch.bool)
        columns[:, index] = compact
        full = torch.zeros(length, length, dtype=torch.bool)
        full[index] = columns
        masks[name] = full & sparse_query[:, None]
    if not bool(sparse_query.all()):
        masks["dense"] = causal & ~sparse_query[:, None]
    masks["combined"] = torch.stack(list(masks.values())).any(dim=0)
    return masks


def mask_counts(masks: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    """Per mask: attended ``pairs`` (query, key), mean ``keys_per_query`` over the
    ``L`` queries, and ``attended_fraction`` = pairs / dense causal pairs ``L (L + 1) / 2``."""
    out: dict[str, dict[str, float | int]] = {}
    for name, mask in masks.items():
        length = mask.shape[0]
        pairs = int(mask.sum())
        out[name] = {
            "pairs": pairs,
            "keys_per_query": pairs / length,
            "attended_fraction": pairs / (length * (length + 1) // 2),
        }
    return out


# --- pictures -------------------------------------------------------------------------------------


def _tile_fractions(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """Fraction of each ``tile x tile`` square of ``mask [L, L]`` that is set
    (edge tiles over the cells they hold): ``[ceil(L/tile), ceil(L/tile)]``."""
    length = mask.shape[0]
    tiles = -(-length // tile)
    padded = torch.zeros(tiles * tile, tiles * tile, dtype=torch.float64)
    padded[:length, :length] = mask.double()
    cells = torch.zeros_like(padded)
    cells[:length, :length] = 1.0
    summed = padded.reshape(tiles, tile, tiles, tile).sum(dim=(1, 3))
    return summed / cells.reshape(tiles, tile, tiles, tile).sum(dim=(1, 3))


def _panel_colours(masks: Mapping[str, torch.Tensor], name: str, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fraction [n, n], rgb [n, n, 3] in 0..1)`` of one panel: the branch's
    colour, or for ``combined`` the branches' colours weighted by how much of
    each tile each covers."""
    fraction = _tile_fractions(masks[name], tile)
    if name != "combined":
        colour = torch.tensor(BRANCH_COLOURS[name], dtype=torch.float64) / 255
        return fraction, colour.expand(*fraction.shape, 3)
    weights = {b: _tile_fractions(masks[b], tile) for b in masks if b in BRANCH_COLOURS}
    total = sum(weights.values(), torch.zeros_like(fraction)).clamp_min(1e-12)
    rgb = sum(
        (weights[b][..., None] * torch.tensor(BRANCH_COLOURS[b], dtype=torch.float64) / 255 for b in weights),
        torch.zeros(*fraction.shape, 3, dtype=torch.float64),
    )
    return fraction, rgb / total[..., None]


def _shade(fraction: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """White where nothing is attended, the full colour where everything is."""
    return 1.0 - fraction[..., None] * (1.0 - rgb)


def _panel_title(name: str, pattern: Pattern | None) -> str:
    if pattern is None:
        return name
    if name == "compression" and pattern.compression is not None:
        return f"compression (l={pattern.compression.block}, d={pattern.compression.stride})"
    if name == "selection" and pattern.selection is not None:
        return f"selection (l'={pattern.selection.block}, n={pattern.selection.count})"
    if name == "window" and pattern.window is not None:
        return f"window (w={pattern.window.size})"
    if name == "dense":
        return "dense (text)" if pattern.hybrid is not None and not pattern.dense else "dense"
    if name == "combined" and len(pattern.branches) > 1:
        return "combined (overlaps mix colours)"
    return name


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only); NsaflexError when it is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise NsaflexError("PNG pictures need matplotlib, which is not installed: pip install 'nsaflex[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_masks(
    masks: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    pattern: Pattern | None = None,
    title: str = "",
) -> Figure:
    """One panel per mask, side by side (query rows down, key columns across),
    each in its branch's colour; ``combined`` mixes the colours of the branches
    covering each cell. Masks longer than :data:`PNG_TILES` are averaged over
    square tiles (lighter = fewer keys of the tile attended). Axes are in token
    positions. Returns the matplotlib figure, saved to ``path`` (PNG at
    :data:`PNG_DPI`) when given."""
    plt = pyplot()
    names = list(masks)
    length = masks[names[0]].shape[0]
    tile = -(-length // PNG_TILES)
    figure, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.9), dpi=PNG_DPI, squeeze=False)
    counts = mask_counts(masks)
    for axis, name in zip(axes[0], names):
        fraction, rgb = _panel_colours(masks, name, tile)
        tiles = fraction.shape[0]
        axis.imshow(
            _shade(fraction, rgb).numpy(),
            interpolation="nearest",
            extent=(-0.5, tiles * tile - 0.5, tiles * tile - 0.5, -0.5),
        )
        axis.set_xlim(-0.5, length - 0.5)
        axis.set_ylim(length - 0.5, -0.5)
        axis.set_title(f"{_panel_title(name, pattern)}\n{counts[name]['keys_per_query']:.4g} keys/query", fontsize=9)
        axis.set_xlabel("key", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("query", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=PNG_DPI)
    return figure


def _rich_colour(fraction: float, rgb: Sequence[float]) -> str:
    red, green, blue = (round(255 * (1 - (0.35 + 0.65 * fraction) * (1 - c))) for c in rgb)
    return f"rgb({red},{green},{blue})"


def terminal_picture(
    masks: Mapping[str, torch.Tensor], *, width: int = 80, pattern: Pattern | None = None
) -> Text:
    """The panels as rich text at most ``width`` columns wide.

    One character is ``tile`` keys wide and ``2 tile`` queries tall (half
    blocks: ``▀`` upper half set, ``▄`` lower half, ``█`` both): a half is set
    when at least half of its ``tile x tile`` square is attended, brighter the
    more is (``tile`` is 1 when the panels fit at full resolution, else the
    smallest power of two that fits). Panels sit side by side when they fit at
    full resolution, else two to a line. A legend line closes it.
    """
    names = list(masks)
    length = masks[names[0]].shape[0]
    gap = 2
    if len(names) * length + gap * (len(names) - 1) <= width:
        per_line, tile = len(names), 1
    else:
        per_line = min(len(names), 2)
        columns = max(1, (width - gap * (per_line - 1)) // per_line)
        # A power of two keeps tile edges on block boundaries (blocks are powers of two in practice).
        tile = 1 << max(0, (-(-length // columns) - 1).bit_length())
    cells = -(-length // tile)
    panels: list[list[Text]] = []
    for name in names:
        fraction, rgb = _panel_colours(masks, name, tile)
        lines = [Text(_panel_title(name, None)[:cells].ljust(cells), style="bold")]
        for top in range(0, cells, 2):
            line = Text()
            for column in range(cells):
                upper = float(fraction[top, column])
                lower = float(fraction[top + 1, column]) if top + 1 < cells else 0.0
                # Majority rule: a tile that is mostly empty reads as empty, as the eye expects.
                upper = upper if upper >= 0.5 else 0.0
                lower = lower if lower >= 0.5 else 0.0
                if upper == 0 and lower == 0:
                    line.append(" ")
                    continue
                glyph = "█" if upper and lower else ("▀" if upper else "▄")
                shown = [(f, rgb[r, column].tolist()) for f, r in ((upper, top), (lower, top + 1)) if f]
                mean_fraction = sum(f for f, _ in shown) / len(shown)
                mean_rgb = [sum(c[i] for _, c in shown) / len(shown) for i in range(3)]
                line.append(glyph, style=_rich_colour(mean_fraction, mean_rgb))
            lines.append(line)
        panels.append(lines)
    out = Text()
    for first in range(0, len(panels), per_line):
        group = panels[first : first + per_line]
        for line_number in range(len(group[0])):
            joined = Text(" " * gap).join(panel[line_number] for panel in group)
            joined.rstrip()
            out.append_text(joined)
            out.append("\n")
    out.append(f"L = {length}: queries down, keys across; a character is {tile} key{'s' if tile > 1 else ''} x {2 * tile} queries")
    return out


# --- budget against length ------------------------------------------------------------------------


def _default_lengths() -> list[int]:
    """Powers of two, four per octave, from 256 to 1M tokens."""
    return sorted({round(2 ** (exponent / 4)) for exponent in range(8 * 4, 20 * 4 + 1)})


def budget_series(
    pattern: Pattern, lengths: Sequence[int] | None = None, *, layer: int | None = None
) -> dict[str, Any]:
    """The closed forms of :func:`nsaflex.budget.analyse` evaluated at ``lengths``.

    Returns ``{"lengths": [...], "branches": {name: {"pairs", "keys_per_query",
    "attended_fraction"}}, "attended": {...}}``: per branch pairs(L), pairs / L
    and pairs / (L (L + 1) / 2) (compression in compressed tokens), and under
    ``attended`` the same for selection + window, the budget's attended
    fraction. Default lengths: 256 to 1M, four per octave.
    """
    import numpy
    import sympy

    from nsaflex.budget import L, analyse

    resolved = resolve_layer(pattern, layer)
    chosen = list(lengths) if lengths is not None else _default_lengths()
    for length in chosen:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InputError("lengths", "integers >= 1", length)
    analysis = analyse(resolved)
    grid = numpy.asarray(chosen, dtype=numpy.float64)
    dense = grid * (grid + 1) / 2

    def series(expr: Any) -> dict[str, list[float]]:
        pairs = numpy.broadcast_to(sympy.lambdify(L, expr, "numpy")(grid), grid.shape).astype(numpy.float64)
        return {
            "pairs": pairs.tolist(),
            "keys_per_query": (pairs / grid).tolist(),
            "attended_fraction": (pairs / dense).tolist(),
        }

    return {
        "pattern": resolved.name,
        "layer": layer,
        "lengths": chosen,
        "branches": {name: series(expr) for name, expr in analysis.pairs.items()},
        "attended": series(analysis.attended_pairs),
    }


def plot_budget(
    pattern: Pattern,
    path: str | os.PathLike[str] | None = None,
    *,
    layer: int | None = None,
    lengths: Sequence[int] | None = None,
    mark: int | None = None,
) -> Figure:
    """Keys per query (left) and attended fraction (right) against ``L``, one
    line per branch in its colour plus selection + window (black, dashed) and,
    for keys per query, dense causal attention's ``(L + 1) / 2`` (dotted).
    ``mark`` draws a vertical line at one length. Returns the figure, saved to
    ``path`` when given."""
    plt = pyplot()
    data = budget_series(pattern, lengths, layer=layer)
    grid = data["lengths"]
    figure, (keys_axis, fraction_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=PNG_DPI)
    for name, values in data["branches"].items():
        colour = tuple(c / 255 for c in BRANCH_COLOURS[name])
        label = f"{name} (compressed tokens)" if name == "compression" else name
        keys_axis.plot(grid, values["keys_per_query"], color=colour, label=label)
        fraction_axis.plot(grid, values["attended_fraction"], color=colour, label=label)
    if not all(name == "dense" for name in data["branches"]):
        keys_axis.plot(grid, data["attended"]["keys_per_query"], "k--", label="selection + window")
        fraction_axis.plot(grid, data["attended"]["attended_fraction"], "k--", label="selection + window")
    keys_axis.plot(grid, [(x + 1) / 2 for x in grid], ":", color="0.5", label="dense causal")
    for axis, label in ((keys_axis, "keys per query (mean)"), (fraction_axis, "attended fraction of dense causal")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        if mark is not None:
            axis.axvline(mark, color="0.3", linewidth=0.8)
    keys_axis.legend(fontsize=7)
    hybrid = " (all-vision input)" if pattern.hybrid is not None else ""
    layer_text = f", layer {layer}" if layer is not None else ""
    figure.suptitle(f"{pattern.name}{layer_text}: budget against length{hybrid}", fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=PNG_DPI)
    return figure


# --- bundled patterns ----------------------------------------------------------------------------


def pattern_summaries(length: int = 131072) -> list[dict[str, Any]]:
    """One entry per bundled pattern: ``name``, ``description``, ``branches``,
    ``keys_per_query`` (``K_attn = l' n + w``), ``attended_fraction`` at
    ``length`` (selection + window pairs over dense causal pairs; hybrid
    patterns as all-vision input), ``hybrid`` and ``file``."""
    from nsaflex.budget import attended_fraction
    from nsaflex.loader import bundled_patterns, load_pattern

    summaries = []
    for name, path in bundled_patterns().items():
        pattern = load_pattern(path)
        summaries.append(
            {
                "name": name,
                "description": pattern.description,
                "branches": list(pattern.branches),
                "keys_per_query": pattern.keys_per_query,
                "attended_fraction": attended_fraction(pattern, length),
                "at_length": length,
                "hybrid": pattern.hybrid is not None,
                "layer_overrides": len(pattern.layers),
                "file": str(path),
            }
        )
    return summaries
