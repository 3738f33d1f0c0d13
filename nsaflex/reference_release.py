"""``videonsa_release``: the numerics of the released VideoNSA code, as a float64 reference.

VideoNSA (Song et al., 2025) released a Qwen2.5-VL-7B checkpoint trained and
evaluated with its own attention code (``Qwen2_5_VLMixNSA`` in its
``modeling_qwen2_5_vl.py``, ``nsa/nsa.py`` with ``nsa/compression.py`` and
``nsa/selection.py``, and fla's ``parallel_nsa_topk`` / ``mean_pooling``). That
code departs from the NSA semantics of :mod:`nsaflex.reference` in the ways
listed below. The checkpoint was trained with them, so reproducing its
published behaviour needs them too; this module is the executable
specification of that mode, written plainly in float64 like the faithful
reference (it imports its helpers). Each quirk is numbered; the adapter
(``mode="videonsa_release"``) implements exactly this.

Per batch row (a sequence without padding: the adapter removes padding first),
with ``vision[t]`` the token classes, ``Hq`` query heads over ``Hkv`` kv heads,
``l`` the block size (compression block = stride = selection block) and
``D`` the head dim:

Q1. Compression visibility (``compression.visibility: videonsa_legacy``): the
    released mask is ``q_idx <= (kv_idx + 1) * l - 1``: query ``t`` sees its own
    compressed block and every later one, never an earlier one. The compressed
    tokens are fla's ``mean_pooling``: ``ceil(L / l)`` blocks, the last one
    possibly partial and averaged over the tokens it has.
Q2. Text keys and values are *zeroed, not masked* for the sparse branches:
    the sparse branches run over the whole row (positions counted in the full
    row, ``hybrid.vision_keys: all``) with ``k, v`` multiplied by ``vision``.
    Zeroed keys still take part in every softmax (logit 0) and in the
    compression means.
Q3. The sparse branches also run on text rows, with their queries zeroed and
    their gates ``sigmoid(0) = 0.5`` (the release zeroes text rows' gate
    *logits*), and their output is *added* to the dense output. The dense
    output is causal attention over all keys (not zeroed) with the query of
    vision rows zeroed, so every row's output is ``sparse + dense``: vision
    rows get the gated sparse mix plus the plain mean of the values before
    them; text rows get their dense attention plus half of each zero-query
    sparse branch.
Q4. Head padding for fla's kernels (which need 16 query heads per kv head):
    the sparse branches run on ``P`` query slots, ``[q, q, 0...]`` (two copies
    of the ``Hq`` heads, then zero slots up to ``P``; 28 heads over 4 kv heads
    give ``P = 64``), with gates ``[g, g, 0...]``. Slot ``s`` reads kv head
    ``s // (P / Hkv)`` (``s // 16`` for VideoNSA), not the model's ``h // G``;
    the output of head ``h`` is the mean of slots ``h`` and ``Hq + h``. Here
    ``P`` is the smallest multiple of ``16 * Hkv`` that holds ``2 * Hq`` slots.
Q5. Selection (fla's ``parallel_nsa_topk``): for query ``t`` with current
    block ``c = t // l``, block ``j < c`` scores ``sum_g exp(q_g . Kc_j * scale
    - lse[t, g])`` over the ``P / Hkv`` slots ``g`` of a kv head; the current
    block scores ``1`` per slot (``P / Hkv`` in all), which forces it whenever
    the others stay below that (always with a normalised ``lse``; see Q6);
    blocks after ``c`` cannot be chosen. The top ``S`` blocks by score are
    selected (ties to the lower index here; the released bitonic sort breaks
    exact ties in its own order, which matters only for rows whose scores tie
    exactly, e.g. zero-query text rows with more than ``S - 1`` earlier
    blocks). Attention over the selected blocks' tokens ``s <= t``.
Q6. The compression log-sum-exp is produced as ``[B, P, T]`` (flex attention)
    but read as ``[B, T, P]``: ``lse_used[t, s] = lse.flatten()[t * P + s]``,
    i.e. the value of slot ``(t*P + s) // T`` at row ``(t*P + s) % T``.
Q7. ``S`` is the selection count rounded up to a power of two (the kernel's
    ``triton.next_power_of_2(block_counts)``; 32 stays 32).

The window branch is the usual ``t - w < s <= t`` (flash attention with
``window_size=(w-1, 0)``) over the zeroed keys (Q2) with the padded slots (Q4).
"""

from __future__ import annotations

import dataclasses

import torch

from nsaflex.errors import PatternError
from nsaflex.inputs import check_inputs
from nsaflex.pooling import softmax_scale
from nsaflex.reference import causal_mask, masked_attention, window_mask
from nsaflex.spec import Hybrid, Pattern

#: fla's NSA kernels need a multiple of this many query heads per kv head.
KERNEL_GROUP = 16
#: The text rows' gate value: sigmoid of the zeroed logit (Q3).
TEXT_GATE = 0.5


def padded_slots(query_heads: int, kv_heads: int) -> int:
    """``P`` of Q4: the smallest multiple of ``16 * Hkv`` holding ``2 * Hq`` slots."""
    unit = KERNEL_GROUP * kv_heads
    return -(-2 * query_heads // unit) * unit


def selected_count(count: int) -> int:
    """``S`` of Q7: the selection count rounded up to a power of two."""
    return 1 << (count - 1).bit_length()


def release_pattern(pattern: Pattern) -> Pattern:
    """The pattern with the two fields the release fixes set to its values:
    ``compression.visibility: videonsa_legacy`` (Q1) and
    ``hybrid.vision_keys: all`` (Q2). Layer overrides are kept."""
    changes = {}
    if pattern.compression is not None:
        changes["compression"] = dataclasses.replace(pattern.compression, visibility="videonsa_legacy")
    changes["hybrid"] = Hybrid(vision_keys="all")
    overrides = []
    for override in pattern.layers:
        if override.compression is not None:
            override = dataclasses.replace(
                override, compression=dataclasses.replace(override.compression, visibility="videonsa_legacy")
            )
        overrides.append(override)
    changes["layers"] = tuple(overrides)
    return dataclasses.replace(pattern, **changes)


def check_release_pattern(pattern: Pattern, layer: int | None = None) -> None:
    """Raise :class:`PatternError` unless ``pattern`` (resolved for ``layer``) is
    something the released code can run.

    The release has exactly three branches, mean pooling with stride = block,
    one block size for compression and selection, group scoring, per-token
    selection with only the current block forced, the legacy compression mask
    (Q1) and a hybrid section with ``vision_keys: all`` (Q2). Dense layers
    (overrides with ``dense: true``) are accepted. ``release_pattern`` sets the
    last two fields.
    """
    resolved = pattern.for_layer(layer) if layer is not None else pattern
    where = f" (decoder layer {layer})" if layer is not None and pattern.layers else ""

    def fail(path: str, expected: str, found: object) -> None:
        raise PatternError(path, f"{expected} for mode videonsa_release{where}", found)

    if resolved.hybrid is None:
        fail("hybrid", "a hybrid section (vision_keys: all)", None)
    if resolved.hybrid.vision_keys != "all":
        fail("hybrid.vision_keys", "'all' (text keys are zeroed in place, not compacted away; the bundled "
             "videonsa-release and release_pattern() set it)", resolved.hybrid.vision_keys)
    if resolved.dense:
        return
    for name in ("compression", "selection", "window"):
        if getattr(resolved, name) is None:
            fail(name, "a compression, a selection and a window branch", None)
    cmp, slc = resolved.compression, resolved.selection
    if cmp.pooling != "mean":
        fail("compression.pooling", "'mean'", cmp.pooling)
    if cmp.stride != cmp.block:
        fail("compression.stride", f"compression.block = {cmp.block} (one block size)", cmp.stride)
    if cmp.visibility != "videonsa_legacy":
        fail("compression.visibility", "'videonsa_legacy' (the bundled videonsa-release and release_pattern() set it)", cmp.visibility)
    if slc.block != cmp.block:
        fail("selection.block", f"compression.block = {cmp.block} (one block size)", slc.block)
    if slc.scoring != "group":
        fail("selection.scoring", "'group'", slc.scoring)
    if slc.granularity != "token":
        fail("selection.granularity", "'token'", slc.granularity)
    if tuple(slc.forced) != ("current",):
        fail("selection.forced", "[current]", list(slc.forced))


def release_compression(k: torch.Tensor, block: int) -> torch.Tensor:
    """fla ``mean_pooling`` (Q1): ``[H, T, D] -> [H, ceil(T / l), D]``, the last
    block averaged over the tokens it has."""
    heads, length, dim = k.shape
    blocks = -(-length // block)
    padded = k.new_zeros(heads, blocks * block, dim)
    padded[:, :length] = k
    counts = torch.full((blocks,), float(block), dtype=k.dtype)
    counts[-1] = length - (blocks - 1) * block
    return padded.view(heads, blocks, block, dim).sum(dim=2) / counts[None, :, None]


def group_sum(raw: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1, slot by slot, so that equal inputs give bit-equal sums
    (zero-query rows tie exactly, and Q5 breaks those ties by index)."""
    total = raw[:, 0]
    for slot in range(1, raw.shape[1]):
        total = total + raw[:, slot]
    return total


def release_row(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    gates: torch.Tensor,
    vision: torch.Tensor,
) -> torch.Tensor:
    """One batch row of the release: ``q [Hq, T, D]``, ``k, v [Hkv, T, D]``,
    ``gates [Hq, T, 3]`` (sigmoid values; text rows are replaced by 0.5),
    ``vision [T]`` bool. Float64 in, float64 ``[Hq, T, D]`` out."""
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    if pattern.dense:
        out, _ = masked_attention(q, k, v, causal_mask(length))
        return out
    block = pattern.compression.block
    slots = padded_slots(heads, kv_heads)
    slot_group = slots // kv_heads
    scale = softmax_scale(dim)
    vis = vision.to(q.dtype)

    # Q2: text keys and values zeroed; Q3: text queries zeroed for the sparse part.
    ks, vs = k * vis[None, :, None], v * vis[None, :, None]
    qs = q * vis[None, :, None]
    # Q4: two copies of the heads, then zero slots.
    zeros = q.new_zeros(slots - 2 * heads, length, dim)
    qp = torch.cat([qs, qs, zeros])
    # Q3: text rows' gates are sigmoid(0); Q4: padded slots have zero gates.
    g = torch.where(vision[None, :, None], gates, torch.full_like(gates, TEXT_GATE))
    gp = torch.cat([g, g, g.new_zeros(slots - 2 * heads, length, g.shape[-1])])

    # Q1: mean-pooled blocks (last one partial), own-and-later visibility.
    kc, vc = release_compression(ks, block), release_compression(vs, block)
    num_blocks = kc.shape[1]
    last_position = torch.arange(num_blocks) * block + block - 1
    visible = last_position[None, :] >= torch.arange(length)[:, None]  # [T, N]
    o_cmp, _ = masked_attention(qp, kc, vc, visible)
    logits = torch.einsum("std,snd->stn", qp, kc.repeat_interleave(slot_group, dim=0)) * scale
    lse = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [P, T]

    # Q6: the [P, T] log-sum-exp read as [T, P].
    lse_used = lse.reshape(-1).reshape(length, slots)  # lse_used[t, s]

    # Q5: scores over the slots of each kv head; the current block scores 1 per slot.
    current = torch.arange(length) // block  # [T]
    blocks = torch.arange(num_blocks)
    earlier = blocks[None, :] < current[:, None]  # [T, N]
    raw = torch.exp(logits - lse_used.t()[:, :, None])  # [P, T, N]
    raw = torch.where(earlier[None], raw, torch.zeros_like(raw))
    raw = torch.where((blocks[None, :] == current[:, None])[None], torch.ones_like(raw), raw)
    scores = group_sum(raw.view(kv_heads, slot_group, length, num_blocks))  # [Hkv, T, N]
    eligible = blocks[None, :] <= current[:, None]  # [T, N]
    chosen = top_blocks(scores, eligible, selected_count(pattern.selection.count))  # Q7
    key_block = torch.arange(length) // block
    slot_chosen = chosen.repeat_interleave(slot_group, dim=0)  # [P, T, N]
    selection_mask = slot_chosen[:, :, key_block] & causal_mask(length)
    o_slc, _ = masked_attention(qp, ks, vs, selection_mask)
    o_win, _ = masked_attention(qp, ks, vs, window_mask(length, pattern.window.size))

    mixed = gp[..., 0:1] * o_cmp + gp[..., 1:2] * o_slc + gp[..., 2:3] * o_win  # [P, T, D]
    sparse = (mixed[:heads] + mixed[heads : 2 * heads]) * 0.5
    # Q3: the dense part, vision queries zeroed, every key (head h reads kv h // G).
    qd = q * (1.0 - vis)[None, :, None]
    dense, _ = masked_attention(qd, k, v, causal_mask(length))
    assert group * kv_heads == heads
    return sparse + dense


def top_blocks(scores: torch.Tensor, eligible: torch.Tensor, take: int) -> torch.Tensor:
    """``[Hkv, T, N]`` bool: per kv head and query the ``take`` best eligible
    blocks of ``scores [Hkv, T, N]`` (``eligible [T, N]``), ties to the lower index."""
    kv_heads, length, num_blocks = scores.shape
    chosen = torch.zeros(kv_heads, length, num_blocks, dtype=torch.bool)
    for h in range(kv_heads):
        for t in range(length):
            candidates = [j for j in range(num_blocks) if eligible[t, j]]
            ranked = sorted(candidates, key=lambda j: -float(scores[h, t, j]))  # stable: ties to the lower index
            chosen[h, t, ranked[:take]] = True
    return chosen


def release_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    gates: torch.Tensor | None,
    token_types: torch.Tensor,
) -> torch.Tensor:
    """The released VideoNSA attention ``[B, Hq, L, D]`` in float64 (quirks Q1-Q7).

    ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` without padding; ``gates
    [B, Hq, L, 3]`` sigmoid values in the order compression, selection, window
    (or ``None`` for constant gates); ``token_types [B, L]`` (0 text; 1 image or 2 video: vision).
    The pattern must pass :func:`check_release_pattern` (a dense layer gives
    dense causal attention).
    """
    check_release_pattern(pattern)
    check_inputs(pattern, q, k, v, gates, token_types)
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    batch, heads, length, _ = q.shape
    if not pattern.dense:
        if gates is None:
            values = torch.tensor(pattern.gate.values, dtype=torch.float64)
            gates = values.expand(batch, heads, length, 3)
        gates = gates.double().cpu()
    token_types = token_types.cpu()
    rows = []
    for b in range(batch):
        vision = token_types[b] != 0
        rows.append(release_row(q[b], k[b], v[b], pattern, gates[b] if gates is not None else None, vision))
    return torch.stack(rows)


__all__ = [
    "KERNEL_GROUP",
    "TEXT_GATE",
    "check_release_pattern",
    "group_sum",
    "padded_slots",
    "release_attention",
    "release_compression",
    "release_pattern",
    "release_row",
    "selected_count",
    "top_blocks",
]

