"""``videonsa_release`` on the fast backends: the quirks of
:mod:`nsaflex.reference_release` (Q1-Q7) as lowering choices around the
ordinary branches, on FlexAttention (:class:`ReleaseFlexKernel`, described
below) and on the Triton kernels (:class:`ReleaseTritonKernel`: the same
pre-pass, slots and mix around one ``nsa_attention`` call whose block lists
come from :func:`release_top_blocks`).

No kernel is forked. Each quirk is a choice about what the branches are fed:

* Q1 compression visibility: the compression branch's ``mask_mod`` keeps
  ``(i + 1) * l - 1 >= t`` and ``i < ceil(L_b / l)`` (the row's blocks, the last
  one partial); the pooled tokens are fla's ``mean_pooling`` (partial last block
  averaged over the tokens it has), computed per row in torch.
* Q2 zeroed text keys: a pre-pass multiplies ``k, v`` by the vision mask; the
  branches then run over whole rows.
* Q3 the dense pass: one more causal FlexAttention over every key with the
  vision queries zeroed, added to the sparse mix; text queries run the sparse
  branches too, zeroed, with gates ``sigmoid(0) = 0.5``.
* Q4 padded head slots: the sparse branches run ``[B, P', L, D]`` slot queries
  (two copies of the heads, then zero slots) over the kv heads with
  FlexAttention's GQA layout, slot ``s`` on kv head ``s // (P / Hkv)``; trailing
  kv heads whose slots are all zero are dropped (``P' <= P``); the output of
  head ``h`` is the mean of slots ``h`` and ``Hq + h``.
* Q5 the current block's score, Q6 the misread log-sum-exp and Q7 the
  power-of-two count: options of the selection pass, which takes the
  compression log-sum-exp ``[B, P, L]`` first (``O(P L)``, every slot: the
  misread reads any slot's value; with float32 ranking the compression branch's
  own, else a float64 pass), then scores and ranks blocks chunk by chunk
  of queries (``O(chunk * P * N)``, never ``[L, L]``), giving per kv head and
  query the selected block indices that the selection branch's BlockMask is
  built from (``BlockMask.from_kv_blocks`` tile lists, a per-query bitmap
  ``mask_mod``).

Every quirk can be turned off (:class:`ReleaseLowering`'s fields), which is
what the tests use to show each one changes the output; ``mode =
"videonsa_release"`` always runs all of them.

Padding: rows may end in padding (``lengths [B]``: real tokens first). Blocks,
the misread log-sum-exp (it reads row ``b`` as ``[P, L_b]``) and visibility
count each row's real tokens only, so a row gives what it gives alone; padding
queries output zeros.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from nsaflex.backends.base import BranchPlan
from nsaflex.errors import InputError, one_of
from nsaflex.pooling import softmax_scale
from nsaflex.reference_release import TEXT_GATE, padded_slots, release_attention, selected_count
from nsaflex.scoring import DEFAULT_CHUNK_ELEMENTS, SelectionResult, _top_candidates, default_score_dtype, selection_bitmap
from nsaflex.spec import Pattern

MODES = ("faithful", "videonsa_release")
RELEASE = "videonsa_release"

# field -> its allowed values, the first being the release's (the quirk on).
QUIRK_CHOICES: dict[str, tuple[str, ...]] = {
    "compression_visibility": ("own_and_later", "causal"),  # Q1
    "text_keys": ("zeroed", "kept"),  # Q2
    "dense_pass": ("added", "text_rows_only"),  # Q3
    "head_layout": ("padded_slots", "model_groups"),  # Q4
    "current_block_score": ("slot_count", "scored"),  # Q5
    "lse_layout": ("misread", "as_produced"),  # Q6
    "count_rounding": ("power_of_two", "exact"),  # Q7
}


@dataclass(frozen=True)
class ReleaseLowering:
    """How each quirk of :mod:`nsaflex.reference_release` is lowered; the
    defaults are the release (every quirk on). The other value of a field
    turns that quirk off, leaving the others (tests and analysis only).

    Attributes:
        compression_visibility: Q1 ``own_and_later`` (``(i+1) l - 1 >= t``, the
            row's ``ceil(L / l)`` blocks) or ``causal`` (``(i+1) l - 1 <= t``).
        text_keys: Q2 ``zeroed`` (pre-pass ``k, v * vision``) or ``kept``.
        dense_pass: Q3 ``added`` (dense pass with zeroed vision queries added to
            every row, sparse branches on zeroed text queries) or
            ``text_rows_only`` (text rows dense, vision rows sparse).
        head_layout: Q4 ``padded_slots`` (``P`` slots, slot ``s`` on kv head
            ``s // (P / Hkv)``) or ``model_groups`` (head ``h`` on ``h // G``).
        current_block_score: Q5 ``slot_count`` (1 per slot) or ``scored`` (its
            ``exp(q . Kc - lse)`` like an earlier block).
        lse_layout: Q6 ``misread`` (``[P, T]`` read as ``[T, P]``) or ``as_produced``.
        count_rounding: Q7 ``power_of_two`` or ``exact``.
    """

    compression_visibility: str = "own_and_later"
    text_keys: str = "zeroed"
    dense_pass: str = "added"
    head_layout: str = "padded_slots"
    current_block_score: str = "slot_count"
    lse_layout: str = "misread"
    count_rounding: str = "power_of_two"

    def __post_init__(self) -> None:
        for name, allowed in QUIRK_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(name, one_of(allowed), getattr(self, name))

    def selected(self, count: int) -> int:
        """The number of blocks the selection keeps for a pattern's ``count`` (Q7)."""
        return selected_count(count) if self.count_rounding == "power_of_two" else count

    @property
    def is_release(self) -> bool:
        """Every quirk on: what ``mode="videonsa_release"`` runs."""
        return all(getattr(self, name) == allowed[0] for name, allowed in QUIRK_CHOICES.items())

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`MODES`, else an InputError."""
    if not isinstance(mode, str) or mode not in MODES:
        raise InputError("mode", one_of(MODES), mode)
    return mode


# --- head slots (Q4) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """Query heads laid out as slots over the kv heads.

    Attributes:
        slots: ``P``, the slots the released kernels see (the misread log-sum-exp
            is ``[P, T]``).
        slot_group: slots per kv head (``P / Hkv``): slot ``s`` reads kv head
            ``s // slot_group``.
        slot_head: per slot, the query head it copies, ``-1`` for a zero slot.
        copies: how many slots each head has (their outputs are averaged).
        run_slots: ``P'``, the slots the branches run: trailing kv heads whose
            slots are all zero are dropped (their gates are zero).
    """

    slots: int
    slot_group: int
    slot_head: tuple[int, ...]
    copies: int
    run_slots: int

    @property
    def run_kv_heads(self) -> int:
        return self.run_slots // self.slot_group


def slot_layout(query_heads: int, kv_heads: int, lowering: ReleaseLowering) -> SlotLayout:
    """The slot layout of ``Hq`` query heads over ``Hkv`` kv heads (Q4)."""
    if lowering.head_layout == "model_groups":
        return SlotLayout(query_heads, query_heads // kv_heads, tuple(range(query_heads)), 1, query_heads)
    slots = padded_slots(query_heads, kv_heads)
    group = slots // kv_heads
    heads = tuple(range(query_heads)) * 2 + (-1,) * (slots - 2 * query_heads)
    run = -(-2 * query_heads // group) * group
    return SlotLayout(slots, group, heads, 2, run)


def to_slots(x: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """``[B, Hq, L, ...] -> [B, P', L, ...]``: each run slot's head, zeros for zero slots."""
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)
    index = torch.tensor([h if h >= 0 else x.shape[1] for h in layout.slot_head[: layout.run_slots]], device=x.device)
    return padded.index_select(1, index)


def from_slots(y: torch.Tensor, layout: SlotLayout, query_heads: int) -> torch.Tensor:
    """``[B, P', L, D] -> [B, Hq, L, D]``: the mean of each head's copies."""
    total = y[:, :query_heads]
    for copy in range(1, layout.copies):
        total = total + y[:, copy * query_heads : (copy + 1) * query_heads]
    return total / layout.copies if layout.copies > 1 else total


def real_rows(q: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths [B] long, real [B, L] bool)`` on q's device: each row's real tokens
    at the front (``lengths`` None: whole rows)."""
    batch, _, length, _ = q.shape
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.long)
    return lengths, torch.arange(length, device=q.device)[None, :] < lengths[:, None]


def release_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vision: torch.Tensor, lengths: torch.Tensor,
                   block: int, lowering: ReleaseLowering) -> tuple[SlotLayout, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """What the sparse branches of every release kernel read: ``(layout, ks, vs,
    qp, kc, vc)``. ``ks, vs [B, Hkv', L, D]``: the keys and values of the kv heads
    some run slot reads, text tokens zeroed (Q2); ``qp [B, P', L, D]``: the slot
    queries, text queries zeroed (Q3, Q4); ``kc, vc [B, Hkv', ceil(L / l), D]``:
    fla's mean pooling of ``ks, vs`` per row (Q1). ``vision [B, L]`` bool (real
    vision tokens), ``lengths [B]``."""
    layout = slot_layout(q.shape[1], k.shape[1], lowering)
    vis = vision.to(q.dtype)[:, None, :, None]
    ks, vs = k[:, : layout.run_kv_heads], v[:, : layout.run_kv_heads]
    if lowering.text_keys == "zeroed":
        ks, vs = ks * vis, vs * vis
    qp = to_slots(q * vis, layout)
    return layout, ks, vs, qp, release_pooling(ks, block, lengths), release_pooling(vs, block, lengths)


def slot_gates(pattern: Pattern, gates: torch.Tensor | None, vision: torch.Tensor, layout: SlotLayout,
               q: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """The run slots' gates ``[B, P', L, 3]`` in ``work``: each head's (``gates [B, Hq,
    L, 3]``, None: the pattern's constants), ``sigmoid(0)`` on text rows (Q3), 0 on
    zero slots (Q4)."""
    batch, query_heads, length, _ = q.shape
    if gates is None:
        values = torch.tensor(pattern.gate.values, dtype=work, device=q.device)
        gates = values.expand(batch, query_heads, length, 3)
    text = torch.full((), TEXT_GATE, dtype=work, device=q.device)
    return to_slots(torch.where(vision[:, None, :, None], gates.to(work), text), layout)


def release_mix(sparse: torch.Tensor, dense: torch.Tensor, vision: torch.Tensor, layout: SlotLayout,
                query_heads: int, lowering: ReleaseLowering, work: torch.dtype) -> torch.Tensor:
    """``[B, Hq, L, D]`` in ``work``: the gated slot mix ``sparse [B, P', L, D]``
    averaged over each head's copies (Q4) plus the dense pass ``dense [B, Hq, L,
    D]`` (Q3: added to every row, or text rows dense and vision rows sparse)."""
    sparse, dense = from_slots(sparse.to(work), layout, query_heads), dense.to(work)
    if lowering.dense_pass == "text_rows_only":
        vis = vision.to(work)[:, None, :, None]
        sparse, dense = sparse * vis, dense * (1 - vis)
    return sparse + dense


# --- pooling (Q1) -----------------------------------------------------------------------------------


def release_pooling(x: torch.Tensor, block: int, lengths: torch.Tensor) -> torch.Tensor:
    """fla ``mean_pooling`` per row: ``[B, H, L, D] -> [B, H, ceil(L / l), D]``, block
    ``i`` of row ``b`` averaged over its tokens below ``lengths[b]`` (zeros where it has none)."""
    batch, heads, length, dim = x.shape
    blocks = -(-length // block)
    positions = torch.arange(length, device=x.device)
    real = (positions[None, :] < lengths[:, None]).to(x.dtype)  # [B, L]
    padded = torch.nn.functional.pad(x * real[:, None, :, None], (0, 0, 0, blocks * block - length))
    sums = padded.view(batch, heads, blocks, block, dim).sum(dim=3)
    first = torch.arange(blocks, device=x.device) * block
    counts = (torch.minimum(first[None, :] + block, lengths[:, None]) - first[None, :]).clamp(min=0)
    return sums / counts.clamp(min=1).to(x.dtype)[:, None, :, None]


def row_blocks(lengths: torch.Tensor, block: int) -> torch.Tensor:
    """``[B]`` compressed (= selection) blocks of each row: ``ceil(L_b / l)``."""
    return torch.div(lengths + block - 1, block, rounding_mode="floor")


def compression_visible(queries: torch.Tensor, num_blocks: int, blocks_of_row: torch.Tensor, block: int,
                        lowering: ReleaseLowering) -> torch.Tensor:
    """``[B, c, N]`` bool: query ``t`` (of ``queries [c]``) sees compressed block ``i`` (Q1)."""
    last = torch.arange(num_blocks, device=queries.device) * block + block - 1
    if lowering.compression_visibility == "causal":
        visible = last[None, :] <= queries[:, None]
    else:
        visible = last[None, :] >= queries[:, None]
    in_row = torch.arange(num_blocks, device=queries.device)[None, :] < blocks_of_row[:, None]
    return visible[None] & in_row[:, None, :]


# --- selection (Q5, Q6, Q7) -------------------------------------------------------------------------


def _slot_logits(qp: torch.Tensor, kc: torch.Tensor, slot_group: int, scale: float) -> torch.Tensor:
    """``[B, P', c, D] x [B, Hkv', N, D] -> [B, Hkv', G, c, N]`` scaled logits."""
    batch, slots, rows, dim = qp.shape
    grouped = qp.reshape(batch, slots // slot_group, slot_group * rows, dim)  # a chunk of queries: a copy
    logits = torch.matmul(grouped, kc.transpose(-1, -2)) * scale
    return logits.view(batch, slots // slot_group, slot_group, rows, kc.shape[2])


def release_lse(qp: torch.Tensor, kc: torch.Tensor, layout: SlotLayout, lengths: torch.Tensor, block: int,
                lowering: ReleaseLowering, chunk: int, run_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The compression branch's log-sum-exp ``[B, P, L]`` of every slot (natural log,
    ``-inf`` where a query sees no block), in ``kc``'s dtype (``qp`` is cast chunk by
    chunk). Slots past ``P'`` are zero queries: ``log`` of the number of blocks they
    see. ``run_lse [B, P', L]``: the run slots' values as the branch computed them
    (then only the zero slots are filled in here, in ``run_lse``'s dtype)."""
    if run_lse is not None and layout.run_slots == layout.slots:
        return run_lse  # no zero slots to fill (VideoNSA's 28 / 4 heads: 56 of 64 slots, all kv groups run)
    batch, _, length, _ = qp.shape
    num_blocks = kc.shape[2]
    blocks_of_row = row_blocks(lengths, block)
    scale = softmax_scale(qp.shape[-1])
    out = (kc if run_lse is None else run_lse).new_empty(batch, layout.slots, length)
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        queries = torch.arange(start, stop, device=qp.device)
        visible = compression_visible(queries, num_blocks, blocks_of_row, block, lowering)  # [B, c, N]
        if run_lse is None:
            logits = _slot_logits(qp[:, :, start:stop].to(kc.dtype), kc, layout.slot_group, scale)
            logits.masked_fill_(~visible[:, None, None], float("-inf"))
            out[:, : layout.run_slots, start:stop] = torch.logsumexp(logits, dim=-1).flatten(1, 2)
        else:
            out[:, : layout.run_slots, start:stop] = run_lse[:, :, start:stop]
        if layout.run_slots < layout.slots:
            seen = visible.sum(dim=-1).to(kc.dtype)  # [B, c]
            out[:, layout.run_slots :, start:stop] = torch.log(seen)[:, None, :]
    return out


def lse_as_read(lse: torch.Tensor, queries: torch.Tensor, run_slots: int, lengths: torch.Tensor,
                lowering: ReleaseLowering) -> torch.Tensor:
    """``[B, P', c]``: the log-sum-exp the selection of queries ``queries [c]`` reads
    per slot. Q6: row ``b``'s ``[P, L_b]`` buffer read as ``[L_b, P]``, i.e. flat
    element ``t * P + s``: slot ``(t P + s) // L_b`` at row ``(t P + s) % L_b``."""
    batch, slots, _ = lse.shape
    slot = torch.arange(run_slots, device=lse.device)
    if lowering.lse_layout == "as_produced":
        return lse[:, :run_slots, queries]
    row_length = lengths.clamp(min=1)[:, None, None]
    flat = queries[None, None, :] * slots + slot[None, :, None]  # [1, P', c]
    flat = torch.minimum(flat, row_length * slots - 1)  # queries past the row (padding) read in range
    source_slot = torch.div(flat, row_length, rounding_mode="floor")
    source_row = flat % row_length
    index = (source_slot * lse.shape[2] + source_row).expand(batch, -1, -1)
    return lse.flatten(1).gather(1, index.flatten(1)).view(batch, run_slots, queries.numel())


def release_selection(qp: torch.Tensor, keys: torch.Tensor, layout: SlotLayout, lengths: torch.Tensor,
                      pattern: Pattern, lowering: ReleaseLowering, *, score_dtype: torch.dtype | None = None,
                      chunk: int | None = None, branch: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> SelectionResult:
    """Selected blocks per kv head and query, ``indices [B, Hkv', L, S]`` (int32, ``-1``
    empty), from slot queries ``qp [B, P', L, D]`` (zeroed text rows) and the keys
    the branches see, ``keys [B, Hkv', L, D]`` (pooled here in ``score_dtype``: on
    CPU the float64 of the reference, so that the ranking is the reference's; no
    gradient).

    ``branch``: the compression branch's pooled keys ``[B, Hkv', N, D]`` and
    log-sum-exp ``[B, P', L]``. The ranking then reads what the branch computed,
    as the released code does, and skips a log-sum-exp pass of its own (float32
    ranking; the default on CUDA).

    Block ``j < c = t // l`` scores ``sum_g exp(qp_g . Kc_j / sqrt(D) - lse_read[t, g])``
    over the kv head's slots; the current block ``P / Hkv`` (Q5); later blocks are
    not candidates. The top ``S`` (Q7) are kept, ties to the lower index, as the
    reference. Scores are ranked in ``score_dtype`` (default: float64 on CPU, the
    reference's choice; float32 on CUDA).
    """
    assert pattern.selection is not None and pattern.compression is not None
    batch, run_slots, length, dim = qp.shape
    block = pattern.compression.block
    num_blocks = -(-length // block)
    group = layout.slot_group
    if score_dtype is None:
        score_dtype = default_score_dtype(qp.device, qp.dtype)
    count = pattern.selection.count
    take = min(num_blocks, lowering.selected(count))
    if chunk is None:
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, batch * run_slots * max(num_blocks, 1)))
    scale = softmax_scale(dim)
    with torch.no_grad():
        qp = qp.detach()  # cast to score_dtype a chunk at a time: a float32 copy of bf16 slots is 4 GB at 128K
        if branch is None:
            kc = release_pooling(keys.detach().to(score_dtype), block, lengths)
            lse = release_lse(qp, kc, layout, lengths, block, lowering, chunk)
        else:
            kc = branch[0].detach().to(score_dtype)
            lse = release_lse(qp, kc, layout, lengths, block, lowering, chunk, branch[1].detach().to(score_dtype))
        blocks = torch.arange(num_blocks, device=qp.device)
        pieces = []
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            queries = torch.arange(start, stop, device=qp.device)
            current = torch.div(queries, block, rounding_mode="floor")
            logits = _slot_logits(qp[:, :, start:stop].to(score_dtype), kc, group, scale)  # [B, Hkv', G, c, N]
            read = lse_as_read(lse, queries, run_slots, lengths, lowering).reshape(batch, -1, group, stop - start, 1)
            # In place: the chunk's [B, Hkv', G, c, N] terms are the largest tensor here.
            raw = logits.sub_(read).exp_()
            earlier = blocks[None, :] < current[:, None]  # [c, N]
            at_current = blocks[None, :] == current[:, None]
            counted = earlier | at_current if lowering.current_block_score == "scored" else earlier
            raw.masked_fill_(~counted, 0.0)
            if lowering.current_block_score == "slot_count":
                raw.masked_fill_(at_current, 1.0)
            # Slot by slot, as the reference: equal terms give bit-equal sums, so
            # exact ties (zero-query text rows) stay ties and go to the lower index.
            scores = raw[:, :, 0]
            for slot in range(1, group):
                scores = scores + raw[:, :, slot]
            eligible = (blocks[None, :] <= current[:, None])[None] & (queries[None, :] < lengths[:, None])[..., None]
            # Ties to the lower index; float32 scores take a topk on (score bits, reversed index).
            order, chosen = _top_candidates(scores, eligible[:, None].expand_as(scores), take)
            pieces.append(torch.where(chosen, order, torch.full_like(order, -1)).to(torch.int32))
    indices = torch.cat(pieces, dim=2) if pieces else torch.full((batch, run_slots // group, 0, take), -1,
                                                                     dtype=torch.int32, device=qp.device)
    return SelectionResult(indices, 1, False, num_blocks)


# --- the FlexAttention kernel ----------------------------------------------------------------------


def _flex_compression_lse(q, k, v, block_mask, scale, kernel_options):
    from nsaflex.backends.flex import _flex_attention, _nan_shows

    return _flex_attention(q, k, v, score_mod=_nan_shows, block_mask=block_mask, scale=scale, enable_gqa=True,
                           kernel_options=kernel_options, return_lse=True)


_COMPILED_LSE: dict[tuple, Any] = {}


def compression_with_lse(q, k, v, mask, compiled: bool, tiling, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The compression branch (as the flex backend's ``_run_flex``) and its
    log-sum-exp ``[B, P', L]`` (float32; float64 for float64 inputs), from one
    FlexAttention call: the release's top-n reads the branch's log-sum-exp. Not
    for compiled CPU calls (torch 2.13's CPU kernel has no log-sum-exp output)."""
    from nsaflex.backends.flex import (
        CPU_DENSE_FALLBACKS,
        _counting_backend,
        _recompile_room,
        cpu_compiled_wrong,
        dense_block_mask_attention,
    )

    scale = softmax_scale(q.shape[-1])
    if torch.compiler.is_compiling():  # inside the user's own torch.compile region
        return _flex_compression_lse(q, k, v, mask.block_mask(True), scale, tiling.options)
    if compiled and q.device.type == "cpu" and cpu_compiled_wrong(k.shape[2], tiling.kv_block):
        CPU_DENSE_FALLBACKS["release compression"] += 1
        compiled = False
    if not compiled:
        return dense_block_mask_attention(q, k, v, mask.tiles, mask.mask_mod, scale, return_lse=True)
    key = (dynamic, tiling.small_backward_tiles)
    if key not in _COMPILED_LSE:
        _COMPILED_LSE[key] = torch.compile(_flex_compression_lse, dynamic=None if dynamic else False,
                                           backend=_counting_backend("release compression", tiling.small_backward_tiles))
    with _recompile_room():
        return _COMPILED_LSE[key](q, k, v, mask.block_mask(mask.compute_q_blocks), scale, tiling.options)


class ReleaseFlexKernel:
    """``kernel(q, k, v, gates, token_types, pooler, *, lengths=None) -> out``: the
    release (:class:`ReleaseLowering`) on FlexAttention.

    q ``[B, Hq, L, D]``, k and v ``[B, Hkv, L, D]``, gates ``[B, Hq, L, 3]`` sigmoid
    values (None: the pattern's constants), token_types ``[B, L]`` (0 text),
    lengths ``[B]`` real tokens at the front of each row (None: whole rows); out
    ``[B, Hq, L, D]`` in q's dtype, zeros at padding. The branches and their
    tiles, compiled/eager choice and mask caches are those of
    :class:`nsaflex.backends.flex.FlexKernel` (``flex`` holds one).
    """

    def __init__(self, pattern: Pattern, lowering: ReleaseLowering | None = None, *, mode: str = "auto",
                 q_block: int | None = None, kv_block: int | None = None, score_dtype: torch.dtype | None = None,
                 chunk: int | None = None, dynamic: bool = False) -> None:
        from nsaflex.backends.flex import FlexKernel

        self.pattern = pattern
        self.lowering = lowering or ReleaseLowering()
        self.flex = FlexKernel(pattern, mode=mode, q_block=q_block, kv_block=kv_block, score_dtype=score_dtype,
                               chunk=chunk, dynamic=dynamic)
        self.score_dtype = score_dtype
        self.chunk = chunk
        self.last_selection: SelectionResult | None = None

    def __call__(self, q, k, v, gates, token_types, pooler=None, *, lengths: torch.Tensor | None = None):
        from nsaflex.backends.flex import MIN_CUDA_HEAD_DIM

        batch, query_heads, length, dim = q.shape
        device = q.device
        if device.type == "cuda" and dim < MIN_CUDA_HEAD_DIM:
            raise InputError("q", f"head dim >= {MIN_CUDA_HEAD_DIM} (FlexAttention on CUDA)", dim)
        lengths, real = real_rows(q, lengths)
        needs_grad = self.flex._needs_grad((q, k, v, gates), None)
        compiled = self.flex._compiled_for(q, needs_grad)
        if self.pattern.dense:
            out = self._dense(q, k, v, compiled, needs_grad)
        else:
            vision = (token_types.to(device) != 0) & real
            out = self._sparse(q, k, v, gates, vision, lengths, compiled, needs_grad)
        return out * real[:, None, :, None].to(out.dtype)

    def _dense(self, q, k, v, compiled, needs_grad):
        from nsaflex.backends import flex_masks as fm
        from nsaflex.backends.flex import _block_sizes, _Mask, _run_flex

        length = q.shape[2]
        tiling = _block_sizes(self.pattern, "dense", q.device, needs_grad, self.flex.blocks)
        key = ("release dense", str(q.device), length, tiling.q_block, tiling.kv_block)
        mask = self.flex._cached(key, lambda: _Mask(fm.causal_tiles(length, tiling.q_block, tiling.kv_block, q.device),
                                                    fm.causal_mask_mod()))
        return _run_flex("dense", q, k, v, mask, compiled, tiling, self.flex.dynamic)

    def _sparse(self, q, k, v, gates, vision, lengths, compiled, needs_grad):
        from nsaflex.backends import flex_masks as fm
        from nsaflex.backends.flex import _block_sizes, _compiled_mix, _Mask, _run_flex, gated_sum

        pattern, lowering = self.pattern, self.lowering
        assert pattern.compression is not None and pattern.selection is not None and pattern.window is not None
        batch, query_heads, length, _ = q.shape
        device = q.device
        block = pattern.compression.block
        layout, ks, vs, qp, kc, vc = release_inputs(q, k, v, vision, lengths, block, lowering)
        num_blocks = kc.shape[2]
        blocks_of_row = row_blocks(lengths, block)
        outputs = []

        tiling = _block_sizes(pattern, "compression", device, needs_grad, self.flex.blocks)
        compression = pattern.compression
        if lowering.compression_visibility == "causal":
            compression = dataclasses.replace(compression, visibility="causal")
        key = ("release compression", str(device), length, num_blocks, tiling.q_block, tiling.kv_block,
               compression.visibility, tuple(blocks_of_row.tolist()))
        rows = blocks_of_row if compression.visibility == "videonsa_legacy" else None
        mask = self.flex._cached(key, lambda: _Mask(
            fm.compression_tiles(length, num_blocks, compression, tiling.q_block, tiling.kv_block, device, rows),
            fm.compression_mask_mod(compression, rows)))
        # float32 ranking reads the branch's own log-sum-exp; float64 (CPU) ranks as the
        # reference. Compiled CPU FlexAttention has no log-sum-exp output (torch 2.13).
        score_dtype = self.score_dtype or default_score_dtype(device, q.dtype)
        branch = None
        if score_dtype == torch.float64 or (compiled and device.type == "cpu"):
            outputs.append(_run_flex("compression", qp, kc, vc, mask, compiled, tiling, self.flex.dynamic))
        else:
            out, lse = compression_with_lse(qp, kc, vc, mask, compiled, tiling, self.flex.dynamic)
            outputs.append(out)
            branch = (kc, lse)

        # Q5-Q7: the selection pass; the BlockMask from its indices.
        result = release_selection(qp, ks, layout, lengths, pattern, lowering,
                                   score_dtype=score_dtype, chunk=self.chunk, branch=branch)
        self.last_selection = result
        tiling = _block_sizes(pattern, "selection", device, needs_grad, self.flex.blocks)
        narrow = self.flex.narrow and compiled and device.type == "cuda" and not needs_grad
        tiles, _ = fm.selection_tiles(result, length, block, tiling.q_block, tiling.kv_block, narrow=narrow)
        mask_mod = fm.selection_mask_mod(selection_bitmap(result), layout.slot_group, 1, block)
        mask = _Mask(tiles.expand_heads(layout.slot_group), mask_mod, compute_q_blocks=needs_grad)
        outputs.append(_run_flex("selection", qp, ks, vs, mask, compiled, tiling, self.flex.dynamic))

        size = pattern.window.size
        tiling = _block_sizes(pattern, "window", device, needs_grad, self.flex.blocks)
        key = ("release window", str(device), length, size, tiling.q_block, tiling.kv_block)
        mask = self.flex._cached(key, lambda: _Mask(fm.window_tiles(length, size, tiling.q_block, tiling.kv_block, device),
                                                    fm.window_mask_mod(size)))
        outputs.append(_run_flex("window", qp, ks, vs, mask, compiled, tiling, self.flex.dynamic))

        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        # The flex backend's fused mix on compiled calls (no float32 copy of each branch).
        mix = _compiled_mix() if compiled and not torch.compiler.is_compiling() else gated_sum
        sparse = mix(slot_gates(pattern, gates, vision, layout, q, work), tuple(outputs), work)
        # Q3: the dense pass over every key, vision queries zeroed.
        dense = self._dense(q * (1 - vision.to(q.dtype)[:, None, :, None]), k, v, compiled, needs_grad)
        return release_mix(sparse, dense, vision, layout, query_heads, lowering, work).to(q.dtype)


# --- the Triton kernels -----------------------------------------------------------------------------


def check_triton_lowering(lowering: ReleaseLowering) -> None:
    """InputError unless the Triton score pass can express ``lowering``'s selection:
    the own block scored by the slot count, over own-and-later visibility (the
    quirk-off lowerings of these two run on flex and the reference)."""
    if lowering.current_block_score != "slot_count" or lowering.compression_visibility != "own_and_later":
        raise InputError("lowering", "current_block_score 'slot_count' and compression_visibility 'own_and_later' "
                         "for the triton backend (other lowerings run on flex and the reference)",
                         (lowering.current_block_score, lowering.compression_visibility))


def release_top_blocks(qp: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, layout: SlotLayout,
                       lengths: torch.Tensor, pattern: Pattern, lowering: ReleaseLowering, nt: int,
                       lay: Any) -> torch.Tensor:
    """The release's selection (Q5-Q7) on the Triton scoring kernels: block lists
    ``[B, Hkv', L, nt + 4]`` int32 (``nt``: the kernels' free list slots, at least the
    kept count; ``-1`` empty; rows past ``lengths`` unwritten).

    ``qp [B, P', L, D]`` slot queries and ``kc [B, Hkv', N, D]`` pooled keys, as
    the kernels take them (contiguous, a kernel head dim); ``lse [B, P', L]`` the
    compression branch's natural log-sum-exp (real rows). The zero slots' values
    (:func:`release_lse`) complete the ``[B, P, L]`` buffer that Q6 misreads; the
    read values (base 2) feed ``cmp_score_kernel``, whose causal pass scores the
    complete blocks ``j < (t + 1) // l`` as ``sum_g exp(qp_g . Kc_j / sqrt(D) -
    lse_read[t, g])``; the own block ``t // l`` scores the slot count (Q5); and
    ``topn_select_kernel`` keeps the top ``S`` (Q7) of ``j <= t // l``, ties to the
    lower index, as :func:`release_selection` does (float32 scores). ``lay``: the
    rows' :class:`nsaflex.kernels.ops.SeqLayout` (``ceil(L_b / l)`` blocks a row)."""
    from nsaflex.kernels import ops

    assert pattern.compression is not None and pattern.selection is not None
    check_triton_lowering(lowering)
    batch, run_slots, length, dim = qp.shape
    block, group = pattern.compression.block, layout.slot_group
    take = lowering.selected(pattern.selection.count)
    full = release_lse(qp, kc, layout, lengths, block, lowering,
                       max(1, DEFAULT_CHUNK_ELEMENTS // max(1, batch * kc.shape[2])), run_lse=lse.float())
    queries = torch.arange(length, device=qp.device)
    read = lse_as_read(full, queries, run_slots, lengths, lowering) * 1.4426950408889634
    compression = dataclasses.replace(pattern.compression, visibility="causal")
    selection = dataclasses.replace(pattern.selection, forced=(), granularity="token")
    cfg = dataclasses.replace(ops.scoring_config(compression, selection), count=take, nt=nt, current_candidate=True)
    launch = ops.launch_choices(kc.shape[-1], group)
    tiles = ops._Tiles(cfg, launch, group)
    sel = torch.full((batch, run_slots // group, length, cfg.list_width), -1, dtype=torch.int32, device=qp.device)
    read = read.contiguous()

    def score(t_off: int, t_end: int, buf: torch.Tensor) -> None:
        ops.block_scores(qp, kc, read, buf, lay, cfg, launch, tiles, t_off, t_end)
        rows = torch.arange(t_end - t_off, device=buf.device)
        buf[:, :, rows, torch.div(rows + t_off, block, rounding_mode="floor")] = float(group)  # Q5

    with torch.no_grad():
        ops._chunked_topn(score, sel, lay, cfg, launch, tiles, run_slots // group, {})
    return sel


class ReleaseTritonKernel:
    """``kernel(q, k, v, gates, token_types, pooler, *, lengths=None) -> out``: the
    release (:class:`ReleaseLowering`) on the Triton kernels, arguments as
    :class:`ReleaseFlexKernel`.

    The sparse branches are one ``nsa_attention`` call over the run slots
    (``[B, P', L, D]``, ``P' / Hkv'`` slots a kv head: the kernels' GQA group)
    with the per-row pooled keys and own-and-later visibility (``legacy``
    compression, ``ceil(L_b / l)`` blocks a row), their block lists from
    :func:`release_top_blocks` (given to the kernels in place of their own
    top-n); the dense pass is torch SDPA (causal, vision queries zeroed).
    """

    def __init__(self, pattern: Pattern, lowering: ReleaseLowering | None = None) -> None:
        from nsaflex.kernels import ops

        self.pattern = pattern
        self.lowering = lowering or ReleaseLowering()
        check_triton_lowering(self.lowering)
        self.cfg = None
        if not pattern.dense:
            assert pattern.selection is not None
            # The pattern's own compression visibility is the release's (videonsa_legacy,
            # check_release_pattern); the block lists hold the rounded count (Q7).
            cfg = ops.make_config(pattern)
            self.cfg = dataclasses.replace(cfg, nt=max(cfg.nt, ops.next_pow2(self.lowering.selected(
                pattern.selection.count))))

    def __call__(self, q, k, v, gates, token_types, pooler=None, *, lengths: torch.Tensor | None = None):
        from nsaflex.backends.triton import _check_tensors, _dense, interpreter_inputs
        from nsaflex.kernels import ops

        _check_tensors(q, k, v)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return self(*interpreter_inputs(q, k, v, gates), token_types, pooler, lengths=lengths).to(q.dtype)
        batch, query_heads, length, _ = q.shape
        device = q.device
        lengths, real = real_rows(q, lengths)
        if self.pattern.dense:
            return torch.where(real[:, None, :, None], _dense(q, k, v), 0.0)
        pattern, lowering, cfg = self.pattern, self.lowering, self.cfg
        assert pattern.compression is not None and cfg is not None
        vision = (token_types.to(device) != 0) & real
        block = pattern.compression.block
        layout, ks, vs, qp, kc, vc = release_inputs(q, k, v, vision, lengths, block, lowering)
        zeros = torch.zeros(batch, dtype=torch.int32, device=device)
        clens = row_blocks(lengths, block).to(torch.int32)
        # Rows padded in place: a shorter row's gradients past its end are zeros.
        lay = ops.SeqLayout(zeros, lengths.to(torch.int32), zeros, clens, length, kc.shape[2], False,
                            int(clens.min()), full_rows=False)
        qp, ks, vs, kc, vc = (x.contiguous() for x in (qp, ks, vs, kc, vc))
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        gs = slot_gates(pattern, gates, vision, layout, q, work).contiguous()  # the kernels read gates as float32

        def select(lse_c: torch.Tensor) -> torch.Tensor:
            return release_top_blocks(qp.detach(), kc.detach(), lse_c * math.log(2.0), layout, lengths, pattern,
                                      lowering, cfg.nt, lay)

        sparse = ops.nsa_attention(qp, ks, vs, kc, vc, gs, lay, cfg, select=select)
        dense = _dense(q * (1 - vision.to(q.dtype)[:, None, :, None]), k, v)
        out = release_mix(sparse, dense, vision, layout, query_heads, lowering, work).to(q.dtype)
        return torch.where(real[:, None, :, None], out, 0.0)


# --- the reference, with padding ---------------------------------------------------------------------


def reference_kernel(pattern: Pattern):
    """:func:`nsaflex.reference_release.release_attention` as a backend kernel:
    each row on its real tokens (``lengths``), zeros at padding, in q's dtype."""

    def kernel(q, k, v, gates, token_types, pooler=None, *, lengths: torch.Tensor | None = None):
        batch, _, length, _ = q.shape
        out = torch.zeros_like(q)
        for b in range(batch):
            n = length if lengths is None else int(lengths[b])
            if n == 0:
                continue
            row_gates = None if gates is None else gates[b : b + 1, :, :n]
            result = release_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], pattern,
                                       row_gates, token_types[b : b + 1, :n])
            out[b, :, :n] = result[0].to(device=q.device, dtype=q.dtype)
        return out

    return kernel


def build_kernel(pattern: Pattern, plan: Any, lowering: ReleaseLowering | None = None):
    """The release kernel of ``plan`` (its backend: ``triton``, ``flex`` or ``reference``)."""
    if plan.backend == "reference":
        return reference_kernel(pattern)
    if plan.backend == "triton":
        return ReleaseTritonKernel(pattern, lowering)
    options = plan.options
    return ReleaseFlexKernel(pattern, lowering, mode=options.flex_mode, score_dtype=options.ranking_dtype(),
                             dynamic=options.flex_dynamic)


# --- the plan -------------------------------------------------------------------------------------------


RELEASE_BACKENDS = ("triton", "flex", "reference")


def release_backend(backend: str, device: str) -> str:
    """``auto`` in release mode: the Triton kernels on CUDA, the float64 reference
    on CPU (where ``triton`` and ``flex`` are taken only when named, as tests do)."""
    if backend == "auto":
        return "triton" if device == "cuda" else "reference"
    return backend


def describe(pattern: Pattern, backend: str, device: str, lowering: ReleaseLowering | None = None) -> tuple[BranchPlan, ...]:
    """The branches of the release lowering, each quirk named where it is lowered."""
    lowering = lowering or ReleaseLowering()
    if backend == "triton":
        return _describe_triton(pattern, lowering)
    flex = backend != "reference"
    if flex:
        kernel = "flex_attention (the flex backend's compiled branches and cached BlockMasks)"
    else:
        kernel = "nsaflex.reference_release.release_attention (float64, dense [L, L] masks per row)"
    if pattern.dense:
        return (BranchPlan("dense", backend, kernel, "causal"),)
    slots = _slot_notes(pattern, lowering)
    c, s, w = pattern.compression, pattern.selection, pattern.window
    assert c is not None and s is not None and w is not None
    count = lowering.selected(s.count)
    prepass = (f"Q2 text keys/values {lowering.text_keys} (pre-pass k, v * vision); "
               f"Q3 text queries zeroed, text gates sigmoid(0) = {TEXT_GATE}")
    layout_note = ("Q4 query heads as slots [q, q, 0...] over the kv heads (slot s reads kv head s // (P / Hkv)"
                   + ("; FlexAttention's GQA layout, all-zero kv groups not run" if flex else "")
                   + "); head h = mean of slots h and Hq + h"
                   if lowering.head_layout == "padded_slots" else "Q4 off: head h reads kv head h // G")
    return (
        BranchPlan("compression", backend, kernel,
                   f"Q1 {lowering.compression_visibility}: (i+1)*{c.block} - 1 "
                   + (">= t" if lowering.compression_visibility == "own_and_later" else "<= t")
                   + " and i < ceil(L_b / l)" + ("; mask_mod + analytic tile lists" if flex else ""),
                   {"block": c.block, "pooling": "fla mean_pooling (partial last block over its tokens)", **slots},
                   (prepass, layout_note)),
        BranchPlan("selection", backend, kernel,
                   f"BlockMask.from_kv_blocks tile lists + per-query bitmap mask_mod from the top-{count} indices"
                   if flex else f"the top-{count} blocks of each query, ranked per row in Python",
                   {"block": s.block, "count": s.count, "selected": count, "count_rounding": lowering.count_rounding,
                    "current_block_score": lowering.current_block_score, "lse_layout": lowering.lse_layout},
                   (("scores in torch, chunked over queries: lse [B, P, L] of every slot first (float32 ranking, "
                     "CUDA's default: the compression branch's own, returned by its FlexAttention call; float64: a "
                     "pass of its own), then [chunk, P', N] logits per chunk; never [L, L]") if flex
                    else "scores [P, L, N] at once",
                    f"Q5 current block {lowering.current_block_score}; Q6 lse {lowering.lse_layout} "
                    "([P, T] read as [T, P]); Q7 count " + lowering.count_rounding)),
        BranchPlan("window", backend, kernel, f"causal band of {w.size} over the zeroed keys", {"size": w.size}),
        BranchPlan("dense", backend, kernel, "causal over every key (not zeroed), vision queries zeroed",
                   {"dense_pass": lowering.dense_pass},
                   ("Q3 added to every row's sparse mix" if lowering.dense_pass == "added"
                    else "Q3 off: text rows only",)),
    )


def _slot_notes(pattern: Pattern, lowering: ReleaseLowering) -> dict[str, Any]:
    """The head-slot fields of a release plan (where the pattern names its heads)."""
    heads, kv_heads = pattern.model.query_heads, pattern.model.kv_heads
    slots: dict[str, Any] = {"head_layout": lowering.head_layout}
    if heads is not None and kv_heads is not None:
        layout = slot_layout(heads, kv_heads, lowering)
        slots.update(slots=layout.slots, slots_per_kv_head=layout.slot_group, slots_run=layout.run_slots)
    return slots


def _describe_triton(pattern: Pattern, lowering: ReleaseLowering) -> tuple[BranchPlan, ...]:
    """The branches of the release lowering on the Triton kernels."""
    if pattern.dense:
        return (BranchPlan("dense", "triton", "torch SDPA (causal)", "is_causal"),)
    c, s, w = pattern.compression, pattern.selection, pattern.window
    assert c is not None and s is not None and w is not None
    count = lowering.selected(s.count)
    kernels = "nsa_attention over the run slots (slot group = the kernels' GQA group)"
    return (
        BranchPlan("compression", "triton", f"cmp_lse_kernel + output ({kernels})",
                   f"Q1 own-and-later: legacy visibility (i+1)*{c.block} - 1 >= t, i < ceil(L_b / l) per row",
                   {"block": c.block, "pooling": "fla mean_pooling in torch (partial last block over its tokens)",
                    **_slot_notes(pattern, lowering)},
                   (f"Q2 text keys/values {lowering.text_keys} (pre-pass k, v * vision); Q3 text queries zeroed, "
                    f"text gates sigmoid(0) = {TEXT_GATE}",
                    "Q4 query heads as slots [q, q, 0...] over the kv heads; all-zero kv groups not run; "
                    "head h = mean of slots h and Hq + h")),
        BranchPlan("selection", "triton",
                   "cmp_score_kernel (causal pass over the misread log-sum-exp) + topn_select_kernel with the own "
                   "block a candidate; slc_win_kernel over the given block lists",
                   f"top-{count} of j <= t // l, ties to the lower index",
                   {"block": s.block, "count": s.count, "selected": count, "count_rounding": lowering.count_rounding,
                    "current_block_score": lowering.current_block_score, "lse_layout": lowering.lse_layout},
                   ("Q6 the compression log-sum-exp [P, L_b] read as [L_b, P] (a gather in torch, zero slots "
                    "log(blocks seen)); Q5 the own block scores the slot count; Q7 count " + lowering.count_rounding
                    + "; float32 scores",)),
        BranchPlan("window", "triton", "slc_win_kernel (fused with selection and gating)",
                   f"causal band of {w.size} over the zeroed keys", {"size": w.size}),
        BranchPlan("dense", "triton", "torch SDPA (causal)", "causal over every key (not zeroed), vision queries zeroed",
                   {"dense_pass": lowering.dense_pass},
                   ("Q3 added to every row's sparse mix" if lowering.dense_pass == "added"
                    else "Q3 off: text rows only",)),
    )


__all__ = [
    "MODES",
    "QUIRK_CHOICES",
    "RELEASE",
    "RELEASE_BACKENDS",
    "ReleaseFlexKernel",
    "ReleaseTritonKernel",
    "ReleaseLowering",
    "SlotLayout",
    "build_kernel",
    "check_mode",
    "check_triton_lowering",
    "describe",
    "lse_as_read",
    "reference_kernel",
    "release_backend",
    "release_lse",
    "release_pooling",
    "release_selection",
    "real_rows",
    "release_top_blocks",
    "slot_layout",
]
