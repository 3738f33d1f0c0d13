"""Backward Triton kernels for token-level NSA (deterministic by default).

* :func:`bwd_dq_kernel`: per row tile (as the forward's selection kernel), the
  gate gradients, the per-branch ``delta = g_b * rowsum(dO * o_b)``, and ``dq``
  of all three branches in one pass (compressed keys, the tile's union of
  selected blocks, the window), probabilities recomputed from the saved
  log-sum-exp; it reads the forward's union lists.
* :func:`bwd_cmp_dkv_kernel`: ``dK_cmp, dV_cmp`` per tile of compressed tokens,
  the query range split over the programs of grid axis 1 (a count the launch
  picks, not a compile-time constant), writing fp32 partials that are summed in
  a fixed order.
* :func:`bwd_win_dkv_kernel`: window ``dk, dv`` per key tile (writes the fp32
  accumulators).
* :func:`bwd_slc_dkv_kernel`: selection ``dk, dv`` per segment of the inverted
  index (the queries that selected one kv block), fp32 partials reduced per
  block by :func:`reduce_slc_kernel` in segment order (or, with ``ATOMIC``,
  added with atomics: faster, not bit-reproducible).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsaflex.kernels.forward import (
    _dot, _key_rows, _key_value_rows, _nonfinite_rows, _program_tile, _query_tile, _seq_field, _sequence_desc, _tile_rows,
    _union_block, _union_entry, _union_setup, _union_step_loads, _visible, _visible_span, key_tile,
)


@triton.jit
def _branch_start(O, GATES, LSE, dof, q_base, row_off, d, gate_off, lse_off, valid, GI: tl.constexpr, sgc,
                  R: tl.constexpr):
    """The start of one branch of :func:`bwd_dq_kernel`: the rows' gate
    ``g_b``, the estimate ``rowsum(dO * o_b)`` from the saved branch output
    (q's dtype), the branch's saved log-sum-exp, and the zero ``drift`` and
    ``rounded`` sums its steps add to (:func:`_dq_step`), each [R]."""
    o_b = tl.load(O + q_base + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    gb = tl.load(GATES + gate_off + GI * sgc, mask=valid, other=0.0).to(tl.float32)
    zeros = tl.zeros([R], tl.float32)
    return gb, tl.sum(dof * o_b, axis=1), tl.load(LSE + lse_off, mask=valid, other=0.0), zeros, zeros


@triton.jit
def _dq_step(dq, drift, rounded, p, do, kk, vv, gb, dg_saved, IEEE: tl.constexpr):
    """One key block of a branch: ``dq += ds @ kk`` with ``ds = g_b * p *
    (dO @ vv^T - dg_saved)``, rounded to the keys' dtype for the product;
    ``drift += rowsum(p * (dO @ vv^T - dg_saved))`` (fp32, before rounding)
    and ``rounded += rowsum(ds)`` of the rounded ``ds`` (:func:`_branch_end`)."""
    dp = _dot(do, tl.trans(vv), IEEE)
    dsg = p * (dp - dg_saved[:, None])
    ds = (dsg * gb[:, None]).to(kk.dtype)
    return dq + _dot(ds, kk, IEEE), drift + tl.sum(dsg, axis=1), rounded + tl.sum(ds.to(tl.float32), axis=1)


@triton.jit
def _branch_end(dq, drift, rounded, gb, dg_saved, MEAN, DG, DELTA, dg_off, lse_off, d, valid, GI: tl.constexpr):
    """The end of one branch: its gate gradient ``dg_b = rowsum(dO * o_b)``
    (into ``DG``'s column ``GI``) and ``delta = g_b * dg_b`` (into ``DELTA``,
    for the dk, dv kernels), exact to fp32 from the saved estimate plus the
    loop's ``drift`` (``sum_j p_j = 1``, so ``rowsum(p * (dp - e)) = dg_b -
    e``); and ``dq`` less ``rounded * mean`` (``MEAN`` [D]: the branch's mean
    key), which is ``sum_j ds_j (k_j - mean)``: the product's error from a
    wrong estimate or from rounding ``ds`` then scales with the keys' spread,
    not with a part all keys share (pooled tokens of a fresh MLP)."""
    dg = dg_saved + drift
    tl.store(DG + dg_off + GI, dg, mask=valid)
    tl.store(DELTA + lse_off, gb * dg, mask=valid)
    return dq - rounded[:, None] * tl.load(MEAN + d)[None, :]


@triton.jit
def _sees_nonfinite(sees, kept, bad, rows, rmask):
    """``sees`` [R] or whether each row keeps (``kept`` [R, N]) one of the key
    rows ``rows`` [N] (those with ``rmask``) whose values hold inf or NaN, by
    the prefix counts ``bad`` (``ops.nonfinite_prefix``)."""
    flagged = tl.load(bad + rows + 1, mask=rmask, other=0) != tl.load(bad + rows, mask=rmask, other=0)
    return sees | (tl.max((kept & flagged[None, :]).to(tl.int32), axis=1) > 0)


@triton.jit
def bwd_dq_kernel(
    Q, K, V, KC, VC, DO, GATES, BRANCH_OUT, BRANCH_LSE, KEY_MEANS, SEL, UNION, DQ, DG, DELTAS,
    SEQ,
    sq, sk, sc, sg, sdg, ss, slse,
    scales, NONFINITE,
    G: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
    GI_CMP: tl.constexpr, GI_SLC: tl.constexpr, GI_WIN: tl.constexpr,
    CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr,
    LS: tl.constexpr, W: tl.constexpr, HEAD_SCORING: tl.constexpr,
    WIN: tl.constexpr, TMA: tl.constexpr,
):
    """Rows and union lists as the forward's selection kernel (:func:`_tile_rows`);
    ``TMA`` as there (key, value and compressed blocks through tensor
    descriptors); ``GI_*`` as there. ``SEQ``: the sequence table
    (:func:`_seq_field`). ``BRANCH_OUT``, ``BRANCH_LSE``: the forward's saved
    branch outputs (q's layout and dtype) and log-sum-exp, (compression,
    selection, window). ``KEY_MEANS``: (the mean compressed key, the mean key,
    both ``[B, Hkv, D]`` fp32, their (batch, head) strides)
    (:func:`_branch_end`). Stride tuples as ``slc_win_kernel``'s (batch, head,
    token), ``sc`` of the compressed keys and values, ``sdg`` of DG.
    ``DELTAS``: (DELTA [3, B, H, T] in the lse layout, its branch stride).
    ``scales``: (scale_log2, scale).
    ``V``, ``VC``: the values with inf and NaN read as 0 (as the forward's
    loops read them), so that ``dp = dO . v`` is finite where a masked pair
    meets such a value; ``NONFINITE``: (the prefix counts of the value rows
    holding inf or NaN, those of the compressed value rows
    (``ops.nonfinite_prefix``), the first's (batch, head) strides, the
    second's). A row that keeps such a value in any branch gets a NaN ``dq``
    (``dp`` is inf or NaN there), and no other row does. The union lists'
    tiles are the grid's first axis."""
    BS: tl.constexpr = key_tile(LS)
    IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    BN: tl.constexpr = 64  # compressed keys per step
    BKW: tl.constexpr = 64  # window keys per step
    OC, OS, OW = BRANCH_OUT
    KCMEAN, KMEAN, sm = KEY_MEANS
    DELTA, sdn = DELTAS
    LSEC, LSES, LSEW = BRANCH_LSE
    scale_log2, scale = scales
    BADV, BADC, sbv, sbc = NONFINITE
    pid_t, b, hk, length, t0 = _program_tile(SEQ + 1, BT, 4)
    if t0 < length:
        start, r, t, g, valid, h, d, q_base, row_off, q = _query_tile(Q, SEQ, b, hk, t0, length, sq,
                                                                      G, G, BT, R, D, 4)
        bb = b.to(tl.int64)
        do = tl.load(DO + q_base + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        dof = do.to(tl.float32)
        gate_off = bb * sg[0] + h * sg[1] + (start + t) * sg[2]
        dg_off = bb * sdg[0] + h * sdg[1] + (start + t) * sdg[2]
        lse_off = bb * slse[0] + h * slse[1] + (start + t) * slse[2]
        mean_off = bb * sm[0] + hk.to(tl.int64) * sm[1]
        t_last = tl.minimum(t0 + BT, length) - 1
        dq = tl.zeros([R, D], tl.float32)
        sees = t < 0  # rows that keep a non-finite value
        if GI_CMP >= 0:
            cstart = _seq_field(SEQ, b, 2).to(tl.int64)
            n_cmp = _seq_field(SEQ, b, 3)
            gb, dg_saved, lse, drift, rounded = _branch_start(OC, GATES, LSEC, dof, q_base, row_off, d, gate_off,
                                                              lse_off, valid, GI_CMP, sg[3], R)
            lo, hi = _visible_span(t0, t_last, n_cmp, CBLOCK, CSTRIDE, LEGACY)
            kbase = KC + bb * sc[0] + hk.to(tl.int64) * sc[1] + cstart * sc[2]
            vbase = VC + bb * sc[0] + hk.to(tl.int64) * sc[1] + cstart * sc[2]
            # No step runs for a sequence without compressed tokens; a descriptor
            # cannot be empty, so it declares one row it never reads.
            kdesc = _sequence_desc(kbase, tl.maximum(n_cmp, 1), sc[2], BN, D, TMA)
            vdesc = _sequence_desc(vbase, tl.maximum(n_cmp, 1), sc[2], BN, D, TMA)
            for i0 in range(lo, hi, BN):
                i = i0 + tl.arange(0, BN)
                kc = _key_rows(kbase, kdesc, i0, i, i < hi, sc[2], d, TMA)
                vc = _key_rows(vbase, vdesc, i0, i, i < hi, sc[2], d, TMA)
                s = _dot(q, tl.trans(kc), IEEE) * scale_log2
                vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
                p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
                dq, drift, rounded = _dq_step(dq, drift, rounded, p, do, kc, vc, gb, dg_saved, IEEE)
            dq = _branch_end(dq, drift, rounded, gb, dg_saved, KCMEAN + mean_off, DG, DELTA + 0 * sdn, dg_off, lse_off,
                             d, valid, GI_CMP)
            bad = BADC + bb * sbc[0] + hk.to(tl.int64) * sbc[1] + cstart
            if _nonfinite_rows(bad, lo, hi):
                for i0 in range(lo, hi, BN):
                    i = i0 + tl.arange(0, BN)
                    kept = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
                    sees = _sees_nonfinite(sees, kept, bad, i, i < hi)
        kbase = K + bb * sk[0] + hk.to(tl.int64) * sk[1] + start * sk[2]
        vbase = V + bb * sk[0] + hk.to(tl.int64) * sk[1] + start * sk[2]
        bad = BADV + bb * sbv[0] + hk.to(tl.int64) * sbv[1] + start
        if GI_SLC >= 0:
            gb, dg_saved, lse, drift, rounded = _branch_start(OS, GATES, LSES, dof, q_base, row_off, d, gate_off,
                                                              lse_off, valid, GI_SLC, sg[3], R)
            count, ubase, umbase, hit_row, kdesc, vdesc, n_whole = _union_setup(
                SEL, UNION, b, hk, pid_t, tl.num_programs(0), start, ss, t0, length, r, kbase, vbase, sk[2],
                G, G, BT, D, W, LS, BS, HEAD_SCORING, TMA, False)
            # As in the forward (slc_win_kernel): the blocks that end before the tile's
            # first token, a prefix of the sorted list, are masked per row only (lse
            # +inf for a row that did not select the block: exp2(-inf) = 0). Each step
            # loads its entry at the step: with the entry loaded a step ahead (as the
            # forward does) bwd_dq ran 42.1 ms against 39.4 (H200, 128K video).
            unused = _union_entry(ubase, umbase, 0, count)  # no entry is carried between steps
            for masked in tl.static_range(2):
                for it in range(n_whole if masked else 0, count if masked else n_whole):
                    kk, vv, mask, _ = _union_step_loads(ubase, umbase, it, count, unused, hit_row, t, valid, length,
                                                        kbase, kdesc, vbase, vdesc, sk[2], d, LS, BS, masked == 1, TMA, False)
                    s = _dot(q, tl.trans(kk), IEEE) * scale_log2
                    if masked:
                        p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
                    else:
                        p = tl.exp2(s - tl.where(mask, lse, float("inf"))[:, None])
                    dq, drift, rounded = _dq_step(dq, drift, rounded, p, do, kk, vv, gb, dg_saved, IEEE)
            dq = _branch_end(dq, drift, rounded, gb, dg_saved, KMEAN + mean_off, DG, DELTA + 1 * sdn, dg_off, lse_off,
                             d, valid, GI_SLC)
            if _nonfinite_rows(bad, 0, t_last + 1):
                for it in range(0, count):
                    j, bits = _union_entry(ubase, umbase, it, count)
                    s_pos, kmask, limit, first_key = _union_block(j, bits, hit_row, t, valid, length, LS, BS)
                    kept = (s_pos[None, :] <= limit[:, None]) & kmask[None, :]
                    sees = _sees_nonfinite(sees, kept, bad, s_pos, kmask)
        if GI_WIN >= 0:
            gb, dg_saved, lse, drift, rounded = _branch_start(OW, GATES, LSEW, dof, q_base, row_off, d, gate_off,
                                                              lse_off, valid, GI_WIN, sg[3], R)
            lo = tl.maximum(t0 - WIN + 1, 0)
            kdesc_w = _sequence_desc(kbase, length, sk[2], BKW, D, TMA)
            vdesc_w = _sequence_desc(vbase, length, sk[2], BKW, D, TMA)
            for s0 in range(lo, t_last + 1, BKW):
                s_pos = s0 + tl.arange(0, BKW)
                kmask = s_pos <= t_last
                kk = _key_rows(kbase, kdesc_w, s0, s_pos, kmask, sk[2], d, TMA)
                vv = _key_rows(vbase, vdesc_w, s0, s_pos, kmask, sk[2], d, TMA)
                s = _dot(q, tl.trans(kk), IEEE) * scale_log2
                mask = valid[:, None] & (s_pos[None, :] <= t[:, None]) & (s_pos[None, :] > t[:, None] - WIN)
                p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
                dq, drift, rounded = _dq_step(dq, drift, rounded, p, do, kk, vv, gb, dg_saved, IEEE)
            dq = _branch_end(dq, drift, rounded, gb, dg_saved, KMEAN + mean_off, DG, DELTA + 2 * sdn, dg_off, lse_off,
                             d, valid, GI_WIN)
            if _nonfinite_rows(bad, lo, t_last + 1):
                for s0 in range(lo, t_last + 1, BKW):
                    s_pos = s0 + tl.arange(0, BKW)
                    kept = valid[:, None] & (s_pos[None, :] <= t[:, None]) & (s_pos[None, :] > t[:, None] - WIN)
                    sees = _sees_nonfinite(sees, kept, bad, s_pos, s_pos <= t_last)
        dq = tl.where(sees[:, None], float("nan"), dq)
        tl.store(DQ + q_base + row_off[:, None] + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, GATES, bb, h, start, t, valid, d, sq, slse, sg, GI: tl.constexpr):
    """What the dk, dv kernels read of the rows (head ``h``, token ``start + t``,
    [R]; ``h`` 64-bit, so every offset is): q and dO [R, D], the branch's lse
    and delta and its gate (column ``GI``) [R]. ``sq``, ``slse``, ``sg``: the
    (batch, head, token) strides of q (and dO), the lse and the gates (and
    their column stride)."""
    row_off = bb * sq[0] + h * sq[1] + (start + t) * sq[2]
    lse_off = bb * slse[0] + h * slse[1] + (start + t) * slse[2]
    q = tl.load(Q + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    lse = tl.load(LSE + lse_off, mask=valid, other=0.0)
    delta = tl.load(DELTA + lse_off, mask=valid, other=0.0)
    gb = tl.load(GATES + bb * sg[0] + h * sg[1] + (start + t) * sg[2] + GI * sg[3], mask=valid, other=0.0).to(tl.float32)
    return q, do, lse, delta, gb


@triton.jit
def _kv_tile(K, V, bb, hk, first, pos, n, sk, D: tl.constexpr):
    """Rows ``first + pos`` [N] (those with ``pos < n``; 64-bit ``bb``, ``hk``,
    ``first``) of kv head ``hk``'s keys and values: (d, the rows' mask, their
    offsets, keys [N, D], values [N, D])."""
    d = tl.arange(0, D)
    mask = pos < n
    off = bb * sk[0] + hk * sk[1] + (first + pos) * sk[2]
    kk, vv = _key_value_rows(K, V, off, d, mask)
    return d, mask, off, kk, vv


@triton.jit
def _kv_tile_grads(q, do, lse, delta, gb, kk, vv, mask, dk, dv, scale_log2, IEEE: tl.constexpr):
    s = _dot(q, tl.trans(kk), IEEE) * scale_log2
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    pg = p * gb[:, None]
    dv += _dot(tl.trans(pg.to(do.dtype)), do, IEEE)
    dp = _dot(do, tl.trans(vv), IEEE) * gb[:, None]
    ds = p * (dp - delta[:, None])
    dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    return dk, dv


@triton.jit
def bwd_cmp_dkv_kernel(
    Q, KC, VC, DO, GATES, LSEC, DELTA, DKP, DVP, STARTS, LENS, CSTARTS, CLENS,
    sq, sk, sg, slse, spn,
    scale_log2, scale, n_kv_heads,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    GI_CMP: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr,
    BNC: tl.constexpr,
):
    pid_i = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    bh = tl.program_id(2)
    b = bh // n_kv_heads
    hk = (bh % n_kv_heads).to(tl.int64)  # head x head stride passes 2^31 in long sequences
    n_cmp = tl.load(CLENS + b)
    i0 = pid_i * BNC
    if i0 < n_cmp:
        length = tl.load(LENS + b)
        start = tl.load(STARTS + b).to(tl.int64)
        cstart = tl.load(CSTARTS + b).to(tl.int64)
        bb = b.to(tl.int64)
        i = i0 + tl.arange(0, BNC)
        d, imask, koff, kc, vc = _kv_tile(KC, VC, bb, hk, cstart, i, n_cmp, sk, D)
        if LEGACY:
            t_lo = 0
            t_hi = tl.minimum(length, (tl.minimum(i0 + BNC, n_cmp) - 1) * CSTRIDE + CBLOCK)
        else:
            t_lo = i0 * CSTRIDE + CBLOCK - 1
            t_hi = length
        n_t = tl.cdiv(tl.maximum(t_hi - t_lo, 0), BT)
        per = tl.cdiv(n_t, n_splits)
        tt_lo = split * per
        tt_hi = tl.minimum(tt_lo + per, n_t)
        dk = tl.zeros([BNC, D], tl.float32)
        dv = tl.zeros([BNC, D], tl.float32)
        for tt in range(tt_lo, tt_hi):
            r, t, g, valid = _tile_rows(t_lo + tt * BT, t_hi, G, GP, BT, BT * GP)
            q, do, lse, delta, gb = _query_rows(Q, DO, LSEC, DELTA, GATES, bb, hk * G + g, start, t, valid, d,
                                                sq, slse, sg, GI_CMP)
            mask = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None] & imask[None, :]
            dk, dv = _kv_tile_grads(q, do, lse, delta, gb, kc, vc, mask, dk, dv, scale_log2, IEEE)
        poff = split.to(tl.int64) * spn + koff
        tl.store(DKP + poff[:, None] + d[None, :], dk * scale, mask=imask[:, None])
        tl.store(DVP + poff[:, None] + d[None, :], dv, mask=imask[:, None])


@triton.jit
def bwd_win_dkv_kernel(
    Q, K, V, DO, GATES, LSEW, DELTA, DK, DV, STARTS, LENS,
    sq, sk, sg, slse,
    scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    GI_WIN: tl.constexpr, WIN: tl.constexpr, BK: tl.constexpr,
):
    """DK, DV: fp32 with k's strides; written (not accumulated)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2).to(tl.int64)  # head x head stride passes 2^31 in long sequences
    length = tl.load(LENS + b)
    s0 = pid_s * BK
    if s0 < length:
        start = tl.load(STARTS + b).to(tl.int64)
        bb = b.to(tl.int64)
        s_pos = s0 + tl.arange(0, BK)
        d, smask, koff, kk, vv = _kv_tile(K, V, bb, hk, start, s_pos, length, sk, D)
        t_hi = tl.minimum(length, s0 + BK - 1 + WIN)
        dk = tl.zeros([BK, D], tl.float32)
        dv = tl.zeros([BK, D], tl.float32)
        for t0 in range(s0, t_hi, BT):
            r, t, g, valid = _tile_rows(t0, t_hi, G, GP, BT, BT * GP)
            q, do, lse, delta, gb = _query_rows(Q, DO, LSEW, DELTA, GATES, bb, hk * G + g, start, t, valid, d,
                                                sq, slse, sg, GI_WIN)
            mask = valid[:, None] & (s_pos[None, :] <= t[:, None]) & (s_pos[None, :] > t[:, None] - WIN) & smask[None, :]
            dk, dv = _kv_tile_grads(q, do, lse, delta, gb, kk, vv, mask, dk, dv, scale_log2, IEEE)
        tl.store(DK + koff[:, None] + d[None, :], dk * scale, mask=smask[:, None])
        tl.store(DV + koff[:, None] + d[None, :], dv, mask=smask[:, None])


@triton.jit
def bwd_slc_dkv_kernel(
    Q, K, V, DO, GATES, LSES, DELTA, ENT, SEG_KEY, SEG_START, SEG_END, DKP, DVP, DK, DV, STARTS, LENS,
    sq, sk, sg, slse,
    scale_log2, scale, n_kv_heads, n_blocks,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    GI_SLC: tl.constexpr, LS: tl.constexpr, BS: tl.constexpr, HEAD_SCORING: tl.constexpr, ATOMIC: tl.constexpr,
):
    """One program per segment of the inverted index: entries ENT[start:end]
    (tokens, or token * G + head for head scoring) that selected block j of
    (sequence b, kv head hk), key = (b * Hkv + hk) * n_blocks + j."""
    seg = tl.program_id(0)
    key = tl.load(SEG_KEY + seg)
    e_lo = tl.load(SEG_START + seg)
    e_hi = tl.load(SEG_END + seg)
    j = (key % n_blocks).to(tl.int32)
    bh = key // n_blocks
    b = (bh // n_kv_heads).to(tl.int32)
    hk = bh % n_kv_heads  # int64 (as the key): head x head stride passes 2^31 in long sequences
    length = tl.load(LENS + b)
    start = tl.load(STARTS + b).to(tl.int64)
    bb = b.to(tl.int64)
    d = tl.arange(0, D)
    sl = tl.arange(0, BS)
    s_pos = j * LS + sl
    # The index has a fixed number of segments; those past the real count are empty
    # (e_lo = e_hi) and neither load nor store. (A row bound rather than a scalar
    # bool in the masks: Triton's interpreter refuses scalar bool masks.)
    live_rows = tl.where(e_lo < e_hi, BS, 0)
    smask = (sl < LS) & (s_pos < length) & (sl < live_rows)
    koff = bb * sk[0] + hk * sk[1] + (start + s_pos) * sk[2]
    kk, vv = _key_value_rows(K, V, koff, d, smask)
    R: tl.constexpr = BT * GP
    r = tl.arange(0, R)
    dk = tl.zeros([BS, D], tl.float32)
    dv = tl.zeros([BS, D], tl.float32)
    if HEAD_SCORING:
        SR: tl.constexpr = R
    else:
        SR: tl.constexpr = BT
    for e0 in range(e_lo, e_hi, SR):
        e = e0 + tl.arange(0, SR)
        ent = tl.load(ENT + e, mask=e < e_hi, other=-1)
        if HEAD_SCORING:
            t = tl.where(ent >= 0, ent // G, 0)
            g = tl.where(ent >= 0, ent % G, 0)
            valid = ent >= 0
        else:
            ent_r = tl.reshape(tl.broadcast_to(ent[:, None], [BT, GP]), [R])
            g = r % GP
            t = tl.where(ent_r >= 0, ent_r, 0)
            valid = (ent_r >= 0) & (g < G)
        q, do, lse, delta, gb = _query_rows(Q, DO, LSES, DELTA, GATES, bb, hk * G + g, start, t, valid, d,
                                            sq, slse, sg, GI_SLC)
        mask = valid[:, None] & smask[None, :] & (s_pos[None, :] <= t[:, None])
        dk, dv = _kv_tile_grads(q, do, lse, delta, gb, kk, vv, mask, dk, dv, scale_log2, IEEE)
    if ATOMIC:
        tl.atomic_add(DK + koff[:, None] + d[None, :], dk * scale, mask=smask[:, None])
        tl.atomic_add(DV + koff[:, None] + d[None, :], dv, mask=smask[:, None])
    else:
        poff = seg.to(tl.int64) * (BS * D) + sl[:, None] * D + d[None, :]
        tl.store(DKP + poff, dk * scale, mask=sl[:, None] < live_rows)
        tl.store(DVP + poff, dv, mask=sl[:, None] < live_rows)


@triton.jit
def reduce_slc_kernel(
    DKP, DVP, KEY_SEG, DK, DV, STARTS, LENS,
    sk, n_kv_heads, n_blocks,
    D: tl.constexpr, LS: tl.constexpr, BS: tl.constexpr,
):
    """Adds the partials of one block's segments (in order) into DK, DV: one
    program per key of the inverted index, key = (b * Hkv + hk) * n_blocks + j
    (every block of every sequence and kv head)."""
    key = tl.program_id(0)
    s_lo = tl.load(KEY_SEG + key)
    s_hi = tl.load(KEY_SEG + key + 1)
    j = (key % n_blocks).to(tl.int32)
    bh = key // n_blocks
    b = (bh // n_kv_heads).to(tl.int32)
    hk = (bh % n_kv_heads).to(tl.int64)  # head x head stride passes 2^31 in long sequences
    length = tl.load(LENS + b)
    start = tl.load(STARTS + b).to(tl.int64)
    d = tl.arange(0, D)
    sl = tl.arange(0, BS)
    s_pos = j * LS + sl
    # Blocks that no entry selected have no segments: leave them as they are.
    smask = (sl < tl.where(s_lo < s_hi, LS, 0)) & (s_pos < length)
    koff = b.to(tl.int64) * sk[0] + hk * sk[1] + (start + s_pos) * sk[2]
    dk = tl.load(DK + koff[:, None] + d[None, :], mask=smask[:, None], other=0.0)
    dv = tl.load(DV + koff[:, None] + d[None, :], mask=smask[:, None], other=0.0)
    for s in range(s_lo, s_hi):
        poff = s * (BS * D) + sl[:, None] * D + d[None, :]
        dk += tl.load(DKP + poff)
        dv += tl.load(DVP + poff)
    tl.store(DK + koff[:, None] + d[None, :], dk, mask=smask[:, None])
    tl.store(DV + koff[:, None] + d[None, :], dv, mask=smask[:, None])
