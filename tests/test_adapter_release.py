"""``videonsa_release`` mode: the released VideoNSA numerics (nsaflex.reference_release),
checked quirk by quirk, against a literal emulation of the released pipeline in its
own tensor layouts, and through the adapter (prefill, decode, generate)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nsaflex.adapters.decode import LayerDecodeCache, decode_attention
from nsaflex.adapters.qwen2_5_vl import apply
from nsaflex.errors import PatternError
from nsaflex.reference import causal_mask, masked_attention
from nsaflex.reference_release import (
    check_release_pattern,
    padded_slots,
    release_attention,
    release_compression,
    release_pattern,
    selected_count,
)
from nsaflex.spec import Compression, Gate, Hybrid, LayerOverride, Pattern, Selection, Window
from tests.device import INTERPRETED, NOT_INTERPRETED
from tests.adapter_support import (
    IMAGE,
    make_batch,
    position_ids_from_mask,
    scratch_generate,
    scratch_logits,
    takes_mm_token_type_ids,
    tiny_model,
)


def release(block=4, count=3, window=5) -> Pattern:
    return release_pattern(
        Pattern(
            name="release",
            compression=Compression(block=block, stride=block),
            selection=Selection(block=block, count=count),
            window=Window(size=window),
            gate=Gate(kind="mlp", temperature=0.3),
            hybrid=Hybrid(vision_keys="vision"),
        )
    )


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the quirks, one by one ------------------------------------------------------------------------


def test_sizes():
    assert padded_slots(28, 4) == 64  # VideoNSA: two copies of 28 heads, 8 zero slots
    assert padded_slots(4, 2) == 32 and padded_slots(8, 1) == 16 and padded_slots(7, 1) == 16
    assert [selected_count(n) for n in (1, 3, 4, 28, 32, 33)] == [1, 4, 4, 32, 32, 64]


def test_q1_mean_pooling_keeps_the_partial_last_block():
    k = randn(2, 10, 3)
    pooled = release_compression(k, 4)
    assert pooled.shape == (2, 3, 3)
    torch.testing.assert_close(pooled[:, 0], k[:, 0:4].mean(1))
    torch.testing.assert_close(pooled[:, 2], k[:, 8:10].mean(1))


def test_q3_text_rows_are_dense_attention():
    """A row without vision tokens: zeroed keys/values make every sparse branch 0,
    so the output is the plain dense causal attention."""
    pattern = release()
    q, k, v = randn(1, 4, 13, 8, seed=1), randn(1, 2, 13, 8, seed=2), randn(1, 2, 13, 8, seed=3)
    gates = torch.rand(1, 4, 13, 3, dtype=torch.float64)
    out = release_attention(q, k, v, pattern, gates, torch.zeros(1, 13, dtype=torch.long))
    dense, _ = masked_attention(q[0], k[0], v[0], causal_mask(13))
    torch.testing.assert_close(out[0], dense, rtol=0, atol=1e-12)


def test_q3_q4_vision_rows_window_gate():
    """All-vision row, gates selecting the window: every padded slot of 4 heads
    over 2 kv heads (16 slots per kv head) reads kv head 0, both copies agree, and
    the dense part (zeroed vision queries) adds the causal mean of the values."""
    pattern = release(window=3)
    length = 9
    q, k, v = randn(1, 4, length, 8, seed=4), randn(1, 2, length, 8, seed=5), randn(1, 2, length, 8, seed=6)
    gates = torch.zeros(1, 4, length, 3, dtype=torch.float64)
    gates[..., 2] = 1.0
    out = release_attention(q, k, v, pattern, gates, torch.ones(1, length, dtype=torch.long))
    offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    window = (offset >= 0) & (offset < 3)
    kv0 = k[0, :1].expand(4, -1, -1), v[0, :1].expand(4, -1, -1)
    sparse, _ = masked_attention(q[0], kv0[0], kv0[1], window)
    counts = torch.arange(1, length + 1, dtype=torch.float64)[:, None]
    mean = v[0].cumsum(1) / counts  # [Hkv, T, D]
    expected = sparse + mean.repeat_interleave(2, dim=0)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-12)


def released_pipeline(q, k, v, logits, vision, *, block, count, window, temperature):
    """The released code, step by step in its own layouts ([B, T, H, D], padded
    heads, fla's flat log-sum-exp buffer read at ``(b*T + t)*HQ + h``)."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    scale = dim**-0.5
    # Qwen2_5_VLMixNSA._mixed_attention
    vq = torch.where(vision[:, None, :, None], q, torch.zeros_like(q))
    vk = torch.where(vision[:, None, :, None], k, torch.zeros_like(k))
    vv = torch.where(vision[:, None, :, None], v, torch.zeros_like(v))
    g = torch.where(vision[:, :, None, None], logits / temperature, torch.zeros_like(logits)).sigmoid()  # [B, T, H, 3]
    slots = padded_slots(heads, kv_heads)
    pad = slots - 2 * heads
    gates = [torch.cat([g[..., i], g[..., i], g.new_zeros(batch, length, pad)], dim=-1) for i in range(3)]
    Q = torch.cat([vq, vq, q.new_zeros(batch, pad, length, dim)], dim=1).transpose(1, 2)  # [B, T, P, D]
    K, V = vk.transpose(1, 2), vv.transpose(1, 2)  # [B, T, Hkv, D]
    group = slots // kv_heads
    # nsa_func: fla mean_pooling (partial last chunk averaged over its tokens)
    chunks = -(-length // block)
    k_cmp = torch.stack([K[:, c * block : (c + 1) * block].mean(1) for c in range(chunks)], dim=1)
    v_cmp = torch.stack([V[:, c * block : (c + 1) * block].mean(1) for c in range(chunks)], dim=1)
    # compression_attention: flex attention, mask q_idx <= (kv_idx + 1) * block - 1, lse [B, P, T]
    o_cmp = torch.zeros(batch, length, slots, dim, dtype=q.dtype)
    lse = torch.zeros(batch, slots, length, dtype=q.dtype)
    for b in range(batch):
        for s in range(slots):
            for t in range(length):
                keep = [c for c in range(chunks) if t <= (c + 1) * block - 1]
                scores = torch.stack([Q[b, t, s] @ k_cmp[b, c, s // group] * scale for c in keep])
                lse[b, s, t] = torch.logsumexp(scores, 0)
                p = torch.softmax(scores, 0)
                o_cmp[b, t, s] = sum(p[i] * v_cmp[b, c, s // group] for i, c in enumerate(keep))
    flat = lse.contiguous().view(-1)
    # parallel_nsa_topk
    top = 1 << (count - 1).bit_length()
    chosen = {}
    for b in range(batch):
        for t in range(length):
            for h in range(kv_heads):
                current = t // block
                b_lse = flat[(b * length + t) * slots + h * group + torch.arange(group)]
                b_q = Q[b, t, h * group : (h + 1) * group] * scale
                importance = []
                for c in range(current + 1):
                    if c == current:
                        importance.append(float(group))
                    else:
                        importance.append(float(torch.exp(b_q @ k_cmp[b, c, h] - b_lse).sum()))
                order = sorted(range(current + 1), key=lambda c: -importance[c])
                chosen[b, t, h] = order[:top]
    # selection attention and sliding window (flash, window_size=(w-1, 0))
    o_slc = torch.zeros_like(o_cmp)
    o_swa = torch.zeros_like(o_cmp)
    for b in range(batch):
        for t in range(length):
            for s in range(slots):
                h = s // group
                keys = [p for c in chosen[b, t, h] for p in range(c * block, min((c + 1) * block, length)) if p <= t]
                p = torch.softmax(torch.stack([Q[b, t, s] @ K[b, j, h] * scale for j in keys]), 0)
                o_slc[b, t, s] = sum(p[i] * V[b, j, h] for i, j in enumerate(keys))
                keys = list(range(max(0, t - window + 1), t + 1))
                p = torch.softmax(torch.stack([Q[b, t, s] @ K[b, j, h] * scale for j in keys]), 0)
                o_swa[b, t, s] = sum(p[i] * V[b, j, h] for i, j in enumerate(keys))
    o = o_cmp * gates[0][..., None] + o_slc * gates[1][..., None] + o_swa * gates[2][..., None]
    nsa = ((o[:, :, :heads] + o[:, :, heads : 2 * heads]) * 0.5).transpose(1, 2)
    # the flash text path: vision queries zeroed, all keys, causal, GQA h // (H / Hkv)
    text_q = torch.where(vision[:, None, :, None], torch.zeros_like(q), q)
    dense = torch.stack([masked_attention(text_q[b], k[b], v[b], causal_mask(length))[0] for b in range(batch)])
    return nsa + dense


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 1)], ids=["zero-slots", "no-zero-slots"])
def test_release_reference_matches_released_pipeline(heads, kv_heads):
    block, count, window, temperature = 4, 3, 5, 0.3
    pattern = release(block, count, window)
    batch, length, dim = 2, 18, 4
    q, k, v = randn(batch, heads, length, dim, seed=7), randn(batch, kv_heads, length, dim, seed=8), randn(batch, kv_heads, length, dim, seed=9)
    logits = randn(batch, length, heads, 3, seed=10)
    vision = torch.rand(batch, length, generator=torch.Generator().manual_seed(11)) < 0.7
    expected = released_pipeline(q, k, v, logits, vision, block=block, count=count, window=window, temperature=temperature)
    gates = torch.sigmoid(logits / temperature).permute(0, 2, 1, 3)
    got = release_attention(q, k, v, pattern, gates, vision.long())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_release_pattern_checks():
    base = release()
    check_release_pattern(base)
    assert base.compression.visibility == "videonsa_legacy" and base.hybrid.vision_keys == "all"
    bad = {
        "compression.pooling": dataclasses.replace(base, compression=Compression(4, 4, pooling="mlp", visibility="videonsa_legacy")),
        "compression.stride": dataclasses.replace(base, compression=Compression(4, 2, visibility="videonsa_legacy")),
        "selection.block": dataclasses.replace(base, selection=Selection(8, 2)),
        "selection.granularity": dataclasses.replace(base, selection=Selection(4, 2, granularity="query_block", query_block=2)),
        "selection.forced": dataclasses.replace(base, selection=Selection(4, 2, forced=("first", "current"))),
        "window": dataclasses.replace(base, window=None, gate=Gate(kind="mlp")),
        "compression.visibility": dataclasses.replace(base, compression=Compression(4, 4)),
        "hybrid.vision_keys": dataclasses.replace(base, hybrid=Hybrid("vision")),
    }
    for key, pattern in bad.items():
        with pytest.raises(PatternError, match=key.replace(".", r"\.") + ".*videonsa_release"):
            check_release_pattern(pattern)
    # dense layers are fine; overrides are checked per layer
    check_release_pattern(dataclasses.replace(base, layers=(LayerOverride(at=(1,), dense=True),)), 1)
    with pytest.raises(PatternError, match="decoder layer 0"):
        check_release_pattern(dataclasses.replace(base, layers=(LayerOverride(at=(0,), remove=("window",)),)), 0)


# --- decode: last row of the release on every prefix ------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads, length", [(4, 1, 22), (8, 1, 22), (4, 2, 12)])
def test_release_decode_is_last_row(heads, kv_heads, length):
    pattern = release(block=4, count=3, window=5)
    batch, dim = 2, 4
    q, k, v = randn(batch, heads, length, dim, seed=1), randn(batch, kv_heads, length, dim, seed=2), randn(batch, kv_heads, length, dim, seed=3)
    gates = torch.rand(batch, heads, length, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    types = (torch.rand(batch, length, generator=torch.Generator().manual_seed(5)) < 0.6).long()
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding in row 1
    cache = LayerDecodeCache()
    for t in range(length):
        out = decode_attention(
            pattern, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], gates[:, :, t : t + 1],
            types[:, : t + 1], valid[:, : t + 1], t, cache, release=True, dtype=torch.float64,
        )
        for b in range(batch):
            if not valid[b, t]:
                assert torch.equal(out[b, :, 0], torch.zeros_like(out[b, :, 0]))
                continue
            real = torch.nonzero(valid[b, : t + 1]).flatten()
            expected = release_attention(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], pattern, gates[b : b + 1, :, real], types[b : b + 1, real])
            torch.testing.assert_close(out[b, :, 0], expected[0, :, -1], rtol=0, atol=1e-10)


# --- through the adapter -------------------------------------------------------------------------------


def randomise(adapter, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.gate_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("backend", ["auto", "flex", "triton"])
def test_adapter_release_prefill_videonsa_heads(backend):
    """28 query heads over 4 kv heads (VideoNSA's layout: 64 slots, 8 of them zero),
    left padding; ``auto`` is the reference on CPU, ``flex`` and ``triton`` (the
    interpreter; head dim 16) the release lowering."""
    if backend == "triton" and not INTERPRETED:
        pytest.skip(NOT_INTERPRETED)
    model = tiny_model(heads=28, kv_heads=4, hidden=448 if backend == "triton" else 224, layers=1)
    pattern = release(block=4, count=2, window=4)
    adapter = apply(model, pattern, backend, mode="videonsa_release")
    assert adapter.backend == ("reference" if backend == "auto" else backend)
    assert adapter.layers[0].compiled.plan.mode == "videonsa_release"
    randomise(adapter, seed=1)
    ids, mask, mm = make_batch([[(2, 14)], [(1, 6)]], [18, 9], 18, left_pad=True)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, position_ids=position_ids_from_mask(mask)).logits
    expected = scratch_logits(model, pattern, ids, mask, (mm != 0).long(), release=True)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_adapter_release_generate_matches_step_by_step(backend):
    if backend == "triton" and not INTERPRETED:
        pytest.skip(NOT_INTERPRETED)
    model = tiny_model()
    pattern = release(block=4, count=2, window=4)
    adapter = apply(model, pattern, backend, mode="videonsa_release")
    paths = {row["decode"] for row in adapter.describe()}
    assert paths == {"exact per-row (videonsa_release numerics, float64, nsaflex.adapters.decode)"
                     if backend == "reference" else f"batched release decode ({backend}, nsaflex.decoding)"}
    randomise(adapter, seed=2)
    ids, mask, mm = make_batch([[(3, 15)], [(2, 7)]], [19, 11], 19, left_pad=True, seed=4)
    if not takes_mm_token_type_ids(model):
        mm = None  # transformers 4.57: classes from the token ids
    expected = scratch_generate(model, pattern, ids, mask, (ids == IMAGE).long() * mask, 4, release=True, text_only_new=mm is not None)
    out = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, max_new_tokens=4, do_sample=False)
    got = out[:, ids.shape[1] :]
    assert torch.equal(got, expected[:, : got.shape[1]])
