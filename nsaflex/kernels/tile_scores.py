"""Triton kernels for the selection scores of the FlexAttention backend.

What :func:`nsaflex.scoring.select` needs before its top-n, without the
``[L, N]`` compression probabilities ever reaching memory:

* :func:`_lse_kernel` (pass 1): base-2 log-sum-exp of ``q_t . K_i * scale``
  over the compressed tokens ``i`` visible to query ``t``, for every query
  head; ``+inf`` where none is visible (its probabilities are then zero).
* :func:`_score_kernel` (pass 2): recomputes ``p = exp2(s - lse)`` and sums it
  over the heads of a selection row (the ``G`` heads of a kv head for
  ``scoring: group``, one head for ``scoring: head``) and, for query-block
  granularity, over the ``m`` queries of a tile, in registers. It writes the
  per-unit compression scores ``[B, Hs, units, N]`` in float32.

A program owns ``BT`` consecutive queries times ``GP`` heads (``GP`` = the
heads of a selection row rounded up to a power of two; padding rows are
masked): the heads of a GQA group share every compressed key they read.

NSA Eq. 9 is linear, as are the group and tile sums, so the caller applies
it to the summed ``[.., N]`` scores (:func:`nsaflex.scoring._eq9`; the identity
when ``l = d = l'``). Results agree with the float64 reference up to float32
rounding (products of bf16/fp16 inputs are exact, accumulation in float32;
float32 inputs use IEEE float32 products).

Runs under ``TRITON_INTERPRET=1`` on CPU (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsaflex.kernels.forward import _dot, _online_softmax  # shared with the forward kernels

LOG2E = 1.4426950408889634
ROWS = 128  # query rows (tokens x padded heads) per program
BLOCK_N = 64  # compressed tokens per step


@triton.jit
def _bounds(t_first, t_last, n_cmp, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr):
    """Compressed tokens [lo, hi) that any query in [t_first, t_last] may see."""
    if LEGACY:
        x = t_first + 1 - CBLOCK
        lo = tl.where(x <= 0, 0, (x + CSTRIDE - 1) // CSTRIDE)
        hi = n_cmp
    else:
        lo = 0
        hi = tl.minimum(tl.where(t_last + 1 >= CBLOCK, (t_last + 1 - CBLOCK) // CSTRIDE + 1, 0), n_cmp)
    return lo, hi


@triton.jit
def _visible(i, t, n_cmp, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr):
    """[rows, cols]: compressed token ``i`` [cols] (last position i*d + l - 1) visible to query ``t`` [rows]."""
    last = i * CSTRIDE + CBLOCK - 1
    if LEGACY:
        return (last[None, :] >= t[:, None]) & (i[None, :] < n_cmp)
    else:
        return (last[None, :] <= t[:, None]) & (i[None, :] < n_cmp)


@triton.jit
def _lse_kernel(
    Q, KC, LSE, LENS, CLENS,
    sqb, sqh, sqt, skb, skh, skt, slb, slh,
    scale_log2,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    length = tl.load(LENS + b)
    t0 = pid * BT
    if t0 < length:
        n_cmp = tl.load(CLENS + b)
        bb = b.to(tl.int64)
        r = tl.arange(0, BT * GP)
        t = t0 + r // GP
        g = r % GP
        valid = (g < G) & (t < length)
        h = (hk * G + g).to(tl.int64)
        d = tl.arange(0, BD)
        dmask = d < D
        q = tl.load(Q + bb * sqb + h[:, None] * sqh + t.to(tl.int64)[:, None] * sqt + d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0)
        lo, hi = _bounds(t0, tl.minimum(t0 + BT, length) - 1, n_cmp, CBLOCK, CSTRIDE, LEGACY)
        m = tl.full([BT * GP], float("-inf"), tl.float32)
        acc = tl.zeros([BT * GP], tl.float32)
        kbase = KC + bb * skb + hk.to(tl.int64) * skh
        for i0 in range(lo, hi, BN):
            i = i0 + tl.arange(0, BN)
            kc = tl.load(kbase + i.to(tl.int64)[:, None] * skt + d[None, :], mask=(i < hi)[:, None] & dmask[None, :], other=0.0)
            s = _dot(q, tl.trans(kc), IEEE)
            vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
            s = tl.where(vis, s, float("-inf"))
            m, alpha, p = _online_softmax(m, s, scale_log2)
            acc = acc * alpha + tl.sum(p, axis=1)
        lse = tl.where(acc > 0, m + tl.log2(acc), float("inf"))
        tl.store(LSE + bb * slb + h * slh + t, lse, mask=valid)


@triton.jit
def _score_kernel(
    Q, KC, LSE, OUT, LENS, CLENS,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, sob, soh, sou,
    scale_log2, T0, T_END, OUT_ROWS,
    G: tl.constexpr, HG: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, TILE: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    hs = tl.program_id(2)
    length = tl.minimum(tl.load(LENS + b), T_END)
    first = T0 + pid * (BT * SUB)
    if first < length:
        n_cmp = tl.load(CLENS + b)
        bb = b.to(tl.int64)
        r = tl.arange(0, BT * GP)
        tok = r // GP
        g = r % GP
        h = (hs * HG + g).to(tl.int64)
        kvh = ((hs * HG) // G).to(tl.int64)
        d = tl.arange(0, BD)
        dmask = d < D
        lo, hi = _bounds(first, tl.minimum(first + BT * SUB, length) - 1, n_cmp, CBLOCK, CSTRIDE, LEGACY)
        kbase = KC + bb * skb + kvh * skh
        qbase = Q + bb * sqb + h[:, None] * sqh + d[None, :]
        lbase = LSE + bb * slb + h * slh
        obase = OUT + bb * sob + hs.to(tl.int64) * soh
        for i0 in range(lo, hi, BN):
            i = i0 + tl.arange(0, BN)
            kc = tl.load(kbase + i.to(tl.int64)[:, None] * skt + d[None, :], mask=(i < hi)[:, None] & dmask[None, :], other=0.0)
            kt = tl.trans(kc)
            if TILE:
                # Sum the sub-tiles element-wise and reduce over the rows once per key
                # block: a row reduction crosses warps (shared memory and a barrier).
                acc = tl.zeros([BT * GP, BN], tl.float32)
                for sub in range(SUB):
                    t = first + sub * BT + tok
                    valid = (g < HG) & (t < length)
                    q = tl.load(qbase + t.to(tl.int64)[:, None] * sqt, mask=valid[:, None] & dmask[None, :], other=0.0)
                    lse = tl.load(lbase + t, mask=valid, other=float("inf"))
                    s = _dot(q, kt, IEEE) * scale_log2
                    vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
                    acc += tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
                tl.store(obase + pid.to(tl.int64) * sou + i, tl.sum(acc, axis=0), mask=i < hi)
            else:
                t = first + tok
                valid = (g < HG) & (t < length)
                q = tl.load(qbase + t.to(tl.int64)[:, None] * sqt, mask=valid[:, None] & dmask[None, :], other=0.0)
                lse = tl.load(lbase + t, mask=valid, other=float("inf"))
                s = _dot(q, kt, IEEE) * scale_log2
                vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
                p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
                rows = tl.sum(tl.reshape(p, [BT, GP, BN]), axis=1)  # [BT, BN]: summed over the heads
                row = first - T0 + tl.arange(0, BT)
                tl.store(obase + row.to(tl.int64)[:, None] * sou + i[None, :], rows,
                         mask=(row < OUT_ROWS)[:, None] & (i < hi)[None, :])


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def supported(q: torch.Tensor, compressed_k: torch.Tensor) -> str | None:
    """Why the kernels cannot score these inputs (``None``: they can)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if compressed_k.dtype != q.dtype:
        return "compressed keys in another dtype"
    if q.shape[1] % compressed_k.shape[1]:
        return "query heads not a multiple of kv heads"
    if q.shape[-1] > 256:
        return "head dim > 256"
    return None


def _prepare(q: torch.Tensor, compressed_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Unit-stride last dims; ``(q, k, ieee)``. The interpreter (CPU) gets float32
    copies of half-precision inputs (its bf16 ``tl.dot`` is wrong; products of
    bf16/fp16 values are exact in float32 either way)."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, compressed_k = q.float(), compressed_k.float()
    q = q if q.stride(-1) == 1 else q.contiguous()
    compressed_k = compressed_k if compressed_k.stride(-1) == 1 else compressed_k.contiguous()
    return q, compressed_k, q.dtype == torch.float32


def log_sum_exp(q: torch.Tensor, compressed_k: torch.Tensor, block: int, stride: int, legacy: bool,
                lengths: torch.Tensor, row_compressed: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, L]`` float32 base-2 log-sum-exp of ``q . K_i * scale * log2(e)`` over the visible
    compressed tokens (``+inf``: none visible; garbage past ``lengths``)."""
    q, compressed_k, ieee = _prepare(q, compressed_k)
    batch, query_heads, length, dim = q.shape
    kv_heads = compressed_k.shape[1]
    group = query_heads // kv_heads
    gp = _pow2(group)
    bt = max(1, ROWS // gp)
    out = torch.empty(batch, query_heads, length, dtype=torch.float32, device=q.device)
    scale_log2 = LOG2E / math.sqrt(dim)
    grid = (triton.cdiv(length, bt), batch, kv_heads)
    _lse_kernel[grid](
        q, compressed_k, out, lengths, row_compressed,
        q.stride(0), q.stride(1), q.stride(2), compressed_k.stride(0), compressed_k.stride(1), compressed_k.stride(2),
        out.stride(0), out.stride(1),
        scale_log2,
        G=group, GP=gp, BT=bt, BN=BLOCK_N, BD=max(16, _pow2(dim)), D=dim,
        CBLOCK=block, CSTRIDE=stride, LEGACY=legacy, IEEE=ieee,
        num_warps=8 if bt * gp >= 128 else 4,
    )
    return out


def score_layout(query_heads: int, kv_heads: int, per_head: bool, unit: int) -> tuple[int, int, int]:
    """``(BT, SUB, TILE)`` of the score kernel: ``TILE`` sums a unit of ``BT * SUB``
    queries in the kernel; otherwise it writes per-query rows (summed over the
    unit by the caller)."""
    heads = 1 if per_head else query_heads // kv_heads
    gp = _pow2(heads)
    bt = max(1, ROWS // gp)
    if unit > 1:
        tile_bt = bt
        while tile_bt > 1 and unit % tile_bt:
            tile_bt //= 2
        if tile_bt * gp >= 16 and unit % tile_bt == 0:
            return tile_bt, unit // tile_bt, 1
    return max(bt, -(-16 // gp)), 1, 0


def unit_scores(q: torch.Tensor, compressed_k: torch.Tensor, lse: torch.Tensor, block: int, stride: int, legacy: bool,
                lengths: torch.Tensor, row_compressed: torch.Tensor, *, per_head: bool, unit: int,
                start: int, rows: int) -> tuple[torch.Tensor, bool]:
    """Compression scores of queries ``[start, start + rows)`` (``rows`` a multiple of
    ``unit``; queries at or past ``min(lengths[b], L)`` add nothing), summed over the
    heads of each selection row: ``([B, Hs, rows / unit, N], True)`` when the kernel
    summed the units itself, else ``([B, Hs, rows, N], False)`` (per query)."""
    q, compressed_k, ieee = _prepare(q, compressed_k)
    batch, query_heads, length, dim = q.shape
    kv_heads, num_compressed = compressed_k.shape[1], compressed_k.shape[2]
    group = query_heads // kv_heads
    heads = 1 if per_head else group
    selecting = query_heads if per_head else kv_heads
    bt, sub, tile = score_layout(query_heads, kv_heads, per_head, unit)
    out_rows = rows // unit if tile else rows
    out = torch.zeros(batch, selecting, out_rows, num_compressed, dtype=torch.float32, device=q.device)
    if num_compressed == 0 or rows == 0:
        return out, bool(tile)
    scale_log2 = LOG2E / math.sqrt(dim)
    gp = _pow2(heads)
    grid = (triton.cdiv(rows, bt * sub), batch, selecting)
    _score_kernel[grid](
        q, compressed_k, lse, out, lengths, row_compressed,
        q.stride(0), q.stride(1), q.stride(2), compressed_k.stride(0), compressed_k.stride(1), compressed_k.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), out.stride(2),
        scale_log2, start, min(start + rows, length), out_rows,
        G=group, HG=heads, GP=gp, BT=bt, SUB=sub, TILE=bool(tile), BN=BLOCK_N, BD=max(16, _pow2(dim)), D=dim,
        CBLOCK=block, CSTRIDE=stride, LEGACY=legacy, IEEE=ieee,
        num_warps=8 if bt * gp >= 128 else 4,
    )
    return out, bool(tile)
