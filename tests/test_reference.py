"""Properties of the dense float64 reference (the specification).

Everything is compared in float64 against plain masked attention written out
here or against the reference itself under a transformation, so the expected
agreement is rounding only: 1e-12 absolute on O(1) values.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsaflex.errors import InputError
from nsaflex.pooling import MLPPooling
from nsaflex.reference import (
    causal_mask,
    choose_blocks,
    compression_visibility,
    eq9_matrix,
    masked_attention,
    reference_attention,
)
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window
from tests.strategies import gqa_shapes, lengths_for, token_types
from tests.strategies import patterns as any_patterns

ATOL = 1e-12
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def patterns(**options):
    """Random patterns, half of them with a selection branch."""
    if "branches" in options:
        return any_patterns(**options)
    return st.one_of(any_patterns(**options), any_patterns(branches={"compression", "selection"}, **options))


def _inputs(draw, pattern: Pattern, *, max_blocks: int = 4):
    batch, kv_heads, group, head_dim = draw(gqa_shapes(head_dims=(8, 16)))
    # Half the draws: several blocks long, where selection has real choices to make.
    length = draw(st.one_of(lengths_for(pattern, max_blocks=max_blocks, max_length=72), st.integers(24, 72)))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * group

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = randn(batch, heads, length, head_dim), randn(batch, kv_heads, length, head_dim), randn(batch, kv_heads, length, head_dim)
    gates = None if pattern.gate.kind == "constant" else torch.rand(batch, heads, length, len(pattern.branches), generator=generator, dtype=torch.float64)
    types = draw(token_types(batch, length)) if pattern.hybrid is not None else None
    pooler = None
    if pattern.compression is not None and pattern.compression.pooling == "mlp":
        torch.manual_seed(seed)
        pooler = MLPPooling(pattern.compression, head_dim, dtype=torch.float64)
    return q, k, v, gates, types, pooler


def _dense(q, k, v):
    length = q.shape[2]
    return torch.stack([masked_attention(q[b], k[b], v[b], causal_mask(length))[0] for b in range(q.shape[0])])


def _stable_positions(pattern: Pattern, types: torch.Tensor | None, cut: int, length: int) -> torch.Tensor:
    """[B, L] bool: queries whose output may not depend on tokens after ``cut``.

    Token-granular causal patterns: every query at or before ``cut``. With
    query-block selection a query also depends on the rest of its tile, so only
    tiles ending at or before ``cut`` (in the sparse sequence's coordinates).
    """
    batch = types.shape[0] if types is not None else 1
    stable = torch.zeros(batch, length, dtype=torch.bool)
    tile = pattern.causal_granularity
    for b in range(batch):
        row_types = types[b] if types is not None else None
        if pattern.hybrid is not None and pattern.hybrid.vision_keys == "vision":
            sparse = torch.nonzero(row_types == 1).flatten()
        else:
            sparse = torch.arange(length)
        for position in range(cut + 1):
            if row_types is not None and row_types[position] == 0:
                stable[b, position] = True  # text: dense causal
                continue
            rank = int(torch.nonzero(sparse == position).flatten()[0])
            tile_last = min((rank // tile + 1) * tile, len(sparse)) - 1
            stable[b, position] = bool(sparse[tile_last] <= cut)
    return stable


@FEW
@given(st.data())
def test_causality(data):
    pattern = data.draw(patterns(small=True, allow_legacy=False, allow_layers=False, allow_model=False, allow_budget=False))
    q, k, v, gates, types, pooler = _inputs(data.draw, pattern)
    length = q.shape[2]
    cut = data.draw(st.integers(0, length - 1))
    out = reference_attention(q, k, v, pattern, gates, types, pooler)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for tensor in (q2, k2, v2):
        tensor[:, :, cut + 1 :] = torch.randn_like(tensor[:, :, cut + 1 :]) * 3
    gates2 = None
    if gates is not None:
        gates2 = gates.clone()
        gates2[:, :, cut + 1 :] = torch.rand_like(gates2[:, :, cut + 1 :])
    out2 = reference_attention(q2, k2, v2, pattern, gates2, types, pooler)
    stable = _stable_positions(pattern, types, cut, length)
    if stable.shape[0] == 1:
        stable = stable.expand(q.shape[0], length)
    difference = (out - out2).abs().amax(dim=(1, 3))  # [B, L]
    assert difference[stable].max().item() <= ATOL if stable.any() else True


def test_legacy_visibility_looks_at_future_blocks():
    """videonsa_legacy is not causal: the test above must be able to tell."""
    pattern = Pattern(
        name="legacy",
        compression=Compression(block=4, stride=4, visibility="videonsa_legacy"),
        gate=Gate(kind="constant", values=(1.0,)),
    )
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64) for _ in range(3))
    out = reference_attention(q, k, v, pattern)
    k2 = k.clone()
    k2[:, :, 12:] += 1.0
    out2 = reference_attention(q, k2, v, pattern)
    assert (out[:, :, 0] - out2[:, :, 0]).abs().max() > 1e-6


@FEW
@given(st.data())
def test_gqa_head_reads_its_kv_head_only(data):
    """Query head h depends on kv head h // G and on no other kv head
    (per-head scoring; group scoring shares a selection within the group only)."""
    pattern = data.draw(patterns(small=True, allow_layers=False, allow_model=False, allow_budget=False))
    q, k, v, gates, types, pooler = _inputs(data.draw, pattern)
    kv_heads = k.shape[1]
    group = q.shape[1] // kv_heads
    changed = data.draw(st.integers(0, kv_heads - 1))
    k2, v2 = k.clone(), v.clone()
    k2[:, changed] = torch.randn_like(k2[:, changed])
    v2[:, changed] = torch.randn_like(v2[:, changed])
    out = reference_attention(q, k, v, pattern, gates, types, pooler)
    out2 = reference_attention(q, k2, v2, pattern, gates, types, pooler)
    others = [h for h in range(q.shape[1]) if h // group != changed]
    if others:
        assert (out[:, others] - out2[:, others]).abs().max().item() <= ATOL


@FEW
@given(st.data())
def test_gqa_equals_repeated_kv_heads_with_head_scoring(data):
    pattern = data.draw(patterns(small=True, allow_layers=False, allow_model=False, allow_budget=False))
    if pattern.selection is not None:
        pattern = dataclasses.replace(pattern, selection=dataclasses.replace(pattern.selection, scoring="head"))
    q, k, v, gates, types, pooler = _inputs(data.draw, pattern)
    group = q.shape[1] // k.shape[1]
    out = reference_attention(q, k, v, pattern, gates, types, pooler)
    repeated = reference_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), pattern, gates, types, pooler
    )
    assert (out - repeated).abs().max().item() <= ATOL


@FEW
@given(st.data())
def test_full_budget_selection_is_dense_causal(data):
    """n covering every block, the current block forced: selection = dense causal."""
    base = data.draw(patterns(small=True, branches={"compression", "selection"}, allow_layers=False,
                              allow_model=False, allow_budget=False, hybrid=(None,), granularities=("token",)))
    selection = dataclasses.replace(base.selection, count=64, forced=("current",))
    pattern = dataclasses.replace(base, selection=selection, window=None, budget=None,
                                  gate=Gate(kind="constant", values=(0.0, 1.0)))
    q, k, v, _, _, pooler = _inputs(data.draw, pattern)
    out = reference_attention(q, k, v, pattern, pooler=pooler)
    assert (out - _dense(q, k, v)).abs().max().item() <= ATOL


@FEW
@given(st.data())
def test_window_covering_sequence_is_dense_causal(data):
    size = data.draw(st.integers(1, 80))
    pattern = Pattern(name="w", window=Window(size=size), gate=Gate(kind="constant", values=(1.0,)))
    q, k, v, _, _, _ = _inputs(data.draw, pattern)
    out = reference_attention(q, k, v, pattern)
    if size >= q.shape[2]:
        assert (out - _dense(q, k, v)).abs().max().item() <= ATOL
    else:
        assert (out - _dense(q, k, v)).abs().max().item() > 1e-9


@FEW
@given(st.data())
def test_gates_mix_branches_linearly_and_zero_gate_removes_branch(data):
    pattern = data.draw(patterns(small=True, allow_layers=False, allow_model=False, allow_budget=False, gate_kinds=("mlp",)))
    q, k, v, gates, types, pooler = _inputs(data.draw, pattern)
    out = reference_attention(q, k, v, pattern, gates, types, pooler)
    sparse_rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if types is None else types == 1
    parts = []
    for b in range(len(pattern.branches)):
        only = torch.zeros_like(gates)
        only[..., b] = gates[..., b]
        parts.append(reference_attention(q, k, v, pattern, only, types, pooler))
    rows, positions = sparse_rows.nonzero(as_tuple=True)
    if len(rows):
        summed = sum(parts)
        assert (out[rows, :, positions] - summed[rows, :, positions]).abs().max().item() <= ATOL
    # Zeroing the window gate equals dropping the window branch.
    if pattern.window is not None and len(pattern.branches) > 1:
        zeroed = gates.clone()
        zeroed[..., -1] = 0
        without = dataclasses.replace(pattern, window=None, budget=None)
        a = reference_attention(q, k, v, pattern, zeroed, types, pooler)
        b = reference_attention(q, k, v, without, gates[..., :-1].contiguous(), types, pooler)
        assert (a - b).abs().max().item() <= ATOL


@FEW
@given(st.data())
def test_text_queries_are_dense_and_vision_only_is_the_compacted_sequence(data):
    pattern = data.draw(patterns(small=True, allow_layers=False, allow_model=False, allow_budget=False, hybrid=("vision", "all")))
    q, k, v, gates, types, pooler = _inputs(data.draw, pattern)
    out = reference_attention(q, k, v, pattern, gates, types, pooler)
    dense = _dense(q, k, v)
    text = types == 0
    for b in range(q.shape[0]):
        assert (out[b][:, text[b]] - dense[b][:, text[b]]).abs().max().item() <= ATOL if text[b].any() else True
    if pattern.hybrid.vision_keys == "vision":
        plain = dataclasses.replace(pattern, hybrid=None)
        for b in range(q.shape[0]):
            index = torch.nonzero(types[b] == 1).flatten()
            if len(index) == 0:
                continue
            row_gates = None if gates is None else gates[b : b + 1][:, :, index]
            alone = reference_attention(q[b : b + 1][:, :, index], k[b : b + 1][:, :, index], v[b : b + 1][:, :, index],
                                        plain, row_gates, None, pooler)
            assert (out[b][:, index] - alone[0]).abs().max().item() <= ATOL


def test_dense_layer_override_is_dense():
    pattern = Pattern(
        name="p",
        window=Window(size=2),
        gate=Gate(kind="constant", values=(1.0,)),
        layers=(__import__("nsaflex").LayerOverride(at=(1,), dense=True),),
    )
    q, k, v = (torch.randn(2, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    dense_layer = pattern.for_layer(1)
    assert dense_layer.dense and dense_layer.branches == ()
    assert (reference_attention(q, k, v, dense_layer) - _dense(q, k, v)).abs().max() <= ATOL
    assert (reference_attention(q, k, v, pattern.for_layer(0)) - _dense(q, k, v)).abs().max() > 1e-6


# --- the formulas, by hand ---------------------------------------------------------


def test_eq9_matrix_matches_the_paper_by_hand():
    compression = Compression(block=32, stride=16)
    selection = Selection(block=64, count=4)
    matrix = eq9_matrix(num_compressed=9, num_blocks=3, compression=compression, selection=selection)
    # p_slc[j] = sum_{m<4} sum_{n<2} p_cmp[4j - m - n]
    expected = torch.zeros(9, 3, dtype=torch.float64)
    for j in range(3):
        for m in range(4):
            for n in range(2):
                if 0 <= 4 * j - m - n < 9:
                    expected[4 * j - m - n, j] += 1
    assert torch.equal(matrix, expected)
    assert matrix[:, 1].tolist() == [1, 2, 2, 2, 1, 0, 0, 0, 0]
    identity = eq9_matrix(5, 5, Compression(block=8, stride=8), Selection(block=8, count=1))
    assert torch.equal(identity, torch.eye(5, dtype=torch.float64))


def test_compression_visibility_rules():
    causal = compression_visibility(10, Compression(block=4, stride=2))
    # tokens cover [0,4) [2,6) [4,8) [6,10): last positions 3, 5, 7, 9
    assert causal.sum(dim=1).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
    legacy = compression_visibility(10, Compression(block=4, stride=2, visibility="videonsa_legacy"))
    assert legacy.sum(dim=1).tolist() == [4, 4, 4, 4, 3, 3, 2, 2, 1, 1]


def test_choose_blocks_forced_topn_ties_and_empty_slots():
    selection = Selection(block=4, count=3, forced=("first", "current"))
    scores = torch.tensor([9.0, 1.0, 5.0, 5.0, 7.0, 0.0], dtype=torch.float64)
    # t = 21: current block 5, first 0; candidates: complete blocks 1..4 (end <= 21); best: block 4.
    assert choose_blocks(scores, 21, selection).nonzero().flatten().tolist() == [0, 4, 5]
    # t = 17: current 4 (partial, forced); candidates 1, 2, 3: blocks 2 and 3 tie at 5 -> lower index 2.
    assert choose_blocks(scores, 17, selection).nonzero().flatten().tolist() == [0, 2, 4]
    # t = 2: the first block is also the current one; nothing else is complete: one block.
    assert choose_blocks(scores, 2, selection).nonzero().flatten().tolist() == [0]
    previous = Selection(block=4, count=2, forced=("previous",))
    # t = 9: previous block 1 forced, one slot: the best complete block left is 0.
    assert choose_blocks(scores, 9, previous).nonzero().flatten().tolist() == [0, 1]


def test_query_without_visible_compressed_token_gets_zeros():
    pattern = Pattern(name="c", compression=Compression(block=8, stride=8), gate=Gate(kind="constant", values=(1.0,)))
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    out = reference_attention(q, k, v, pattern)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    # t = 7 sees exactly token 0 = the mean of positions 0..7.
    assert torch.allclose(out[:, :, 7], v[:, :, :8].mean(dim=2), atol=ATOL)


def test_selection_attends_exactly_the_selected_tokens():
    pattern = Pattern(
        name="s",
        compression=Compression(block=2, stride=2),
        selection=Selection(block=2, count=2, forced=("current",)),
        gate=Gate(kind="constant", values=(0.0, 1.0)),
    )
    q, k, v = (torch.randn(1, 1, 9, 4, dtype=torch.float64) for _ in range(3))
    out, selections = reference_attention(q, k, v, pattern, return_selection=True)
    blocks = selections[0][0]
    for t in range(9):
        keys = [s for s in range(t + 1) if blocks[t, s // 2]]
        expected, _ = masked_attention(q[0, :, t : t + 1], k[0, :, keys], v[0, :, keys], torch.ones(1, 1, len(keys), dtype=torch.bool))
        assert torch.allclose(out[0, :, t], expected[:, 0], atol=ATOL)
        assert blocks[t].sum() == min(2, t // 2 + 1)


def test_bad_inputs_name_the_argument():
    pattern = Pattern(name="w", window=Window(size=2), gate=Gate(kind="mlp"), hybrid=Hybrid())
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 3, 8, 16)
    with pytest.raises(InputError, match="^k: expected a number of kv heads dividing the 4 query heads, found 3"):
        reference_attention(q, k, k, pattern)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(InputError, match=r"^gates: expected a tensor \[B, Hq, L, 1\]"):
        reference_attention(q, k, k, pattern, token_types=torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(InputError, match=r"^gates: expected shape \[1, 4, 8, 1\]"):
        reference_attention(q, k, k, pattern, torch.rand(1, 4, 8, 2), torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(InputError, match=r"^token_types: expected shape \[1, 8\]"):
        reference_attention(q, k, k, pattern, torch.rand(1, 4, 8, 1), torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(InputError, match=r"^token_types: expected values 0 \(text\), 1 \(image\) or 2 \(video\), found 3"):
        reference_attention(q, k, k, pattern, torch.rand(1, 4, 8, 1), torch.full((1, 8), 3))
    with pytest.raises(InputError, match=r"^v: expected the shape of k"):
        reference_attention(q, k, k[:, :, :4], pattern)
    with pytest.raises(InputError, match=r"^q: expected a 4-d tensor"):
        reference_attention(q[0], k, k, pattern)
