"""The selection backward's inverted index (``ops._inverted_index``), built with
fixed shapes (no host synchronisation), against a direct reading of the block
lists: every key's segments hold exactly the entries that selected it, in the
lists' order, at most ``seg_len`` each; segments past the real count are empty."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex.kernels import ops


@st.composite
def block_lists(draw):
    packed = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    lens = [draw(st.integers(1, 12)) for _ in range(batch)]
    if not packed:
        lens = [lens[0]] * batch
    block = draw(st.sampled_from((1, 2, 4)))
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    head_scoring = draw(st.booleans())
    width = draw(st.integers(1, 4))
    heads = kv_heads * group if head_scoring else kv_heads
    rows, starts = (1, sum(lens)) if packed else (batch, lens[0]), torch.tensor([0] + lens[:-1]).cumsum(0)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sel = torch.full((rows[0], heads, rows[1], width), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(lens[b]):
            n_cand = t // block + 1
            chosen = torch.randperm(n_cand, generator=gen)[: draw(st.integers(0, min(width, n_cand)))]
            row, pos = (0, int(starts[b]) + t) if packed else (b, t)
            for h in range(heads):
                sel[row, h, pos, : len(chosen)] = chosen[torch.randperm(len(chosen), generator=gen)].to(torch.int32)
    lay = ops.SeqLayout(starts.to(torch.int32) if packed else torch.zeros(batch, dtype=torch.int32),
                        torch.tensor(lens, dtype=torch.int32), None, None, max(lens), 0, packed)
    seg_len = draw(st.integers(1, 5))
    return sel, lay, kv_heads, group, head_scoring, block, seg_len


@settings(max_examples=80, deadline=None)
@given(block_lists())
def test_segments_hold_exactly_each_blocks_selecting_entries(case):
    sel, lay, kv_heads, group, head_scoring, block, seg_len = case
    cfg = dataclasses.replace(ops.KernelConfig(has_cmp=True, has_slc=True, has_win=False, gate_index=(0, 1, 2)),
                              head_scoring=head_scoring, slc_block=block)
    n_blocks = -(-lay.max_len // block)
    ent, seg_key, seg_start, seg_end, key_seg = ops._inverted_index(sel, lay, cfg, group, kv_heads, n_blocks, seg_len)
    nkeys = lay.batch * kv_heads * n_blocks
    assert key_seg.shape == (nkeys + 1,)
    # The direct reading: entries of each key in (row, head, position, slot) order.
    want = {key: [] for key in range(nkeys)}
    for row, h, pos, slot in torch.nonzero(sel >= 0).tolist():
        seq = int(torch.searchsorted(lay.starts, pos, right=True)) - 1 if lay.packed else row
        t = pos - int(lay.starts[seq]) if lay.packed else pos
        hk, entry = (h // group, t * group + h % group) if head_scoring else (h, t)
        want[(seq * kv_heads + hk) * n_blocks + int(sel[row, h, pos, slot])].append(entry)
    total = int(key_seg[-1])
    for key in range(nkeys):
        got = []
        for s in range(int(key_seg[key]), int(key_seg[key + 1])):
            assert int(seg_key[s]) == key
            assert 0 < int(seg_end[s]) - int(seg_start[s]) <= seg_len
            got += ent[int(seg_start[s]):int(seg_end[s])].tolist()
        assert got == want[key], key
        assert int(key_seg[key + 1]) - int(key_seg[key]) == -(-len(want[key]) // seg_len)
    assert total <= seg_key.shape[0]
    assert torch.equal(seg_start[total:], seg_end[total:])
