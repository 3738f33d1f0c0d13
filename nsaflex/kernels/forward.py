"""Forward Triton kernels for token-level NSA.

Row tiles: a program owns ``BT`` consecutive tokens of one sequence and the
``G`` query heads of one kv head. The heads of a GQA group share every key
they read, so one tile fills the matrix units with several tokens' group
heads. The selection kernel, ``bwd_dq_kernel`` and the lse pass pack the rows
densely (:func:`_tile_rows`, ``GR = G``): ``R // G`` tokens per tile, so for
G = 7 a 64-row tile holds 9 tokens' heads and one padding row. The score pass
and the dk, dv kernels give every token ``GP`` rows (``G`` rounded up to a
power of two, the padding rows masked, never stored); the score pass orders
the rows of each 16-row slab by head bits (:func:`_score_rows`), which makes
its sum over a token's heads cheaper.

Kernels:

* :func:`cmp_lse_kernel` (pass 1): log-sum-exp (base 2) of every row over its
  visible compressed tokens and the compression output, flash-style (the
  log-sum-exp alone for the flex backend's scoring, ``OUTPUT=False``).
* :func:`cmp_score_kernel` (pass 2): recomputes the normalised probabilities
  from the saved log-sum-exp, maps the (group-summed) probabilities to
  selection-block scores (NSA Eq. 9, as a small exact matmul with the Eq. 9
  band matrix, carried across chunks) and writes them per query chunk; no
  ``[L, L/d]`` tensor is written. ``UNIT = m``: one row per tile of m
  queries, their scores summed (query-block granularity).
* :func:`topn_select_kernel`: the exact top-n of each token's (or tile's)
  block scores (a bisection over the score bits, ties to the lower index),
  written as the block lists (a tile's list to each of its queries).
* :func:`slc_win_kernel`: selection attention over the union of the tile's
  selected blocks (per-row hit masks), the sliding window, and the gated
  combination with the compression output: only the final output is written
  (branch outputs and their log-sum-exp only when a backward pass needs them).

Non-finite values: the branch loops read a copy of the values with inf and
NaN as 0 (``ops.finite_values``), so that a masked probability 0 never meets
one (``0 * inf = NaN`` would reach earlier queries of the key tile); after a
loop, the steps whose rows a prefix count flags (``ops.nonfinite_prefix``,
:func:`_nonfinite_rows`) add those values over the kept pairs alone
(:func:`_add_nonfinite`). With finite values that is one flag test per branch
and tile.

Sequences are addressed as ``base + b * stride_b + (start[b] + t) * stride_t``:
``start`` is 0 for ``[B, H, L, D]`` tensors and ``cu_seqlens[b]`` for packed
varlen tensors (``stride_b = 0``). Batch, head-group and first-row offsets are
64-bit (:func:`_rows_at`); offsets within a group's rows stay 32-bit.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    # The interpreter runs tl.sort's xor-reduction element by element in
    # Python (minutes per test); this bitonic network uses plain sums instead.
    @triton.jit
    def _cas(x, flip, i: tl.constexpr, n_dims: tl.constexpr):
        n_outer: tl.constexpr = x.numel >> n_dims
        shape: tl.constexpr = [n_outer * (1 << i), 2, 1 << (n_dims - i - 1)]
        y = tl.reshape(x, shape)
        m = tl.arange(0, 2)[None, :, None]
        left = tl.broadcast_to(tl.sum(tl.where(m == 0, y, 0), 1)[:, None, :], shape)
        right = tl.broadcast_to(tl.sum(tl.where(m == 1, y, 0), 1)[:, None, :], shape)
        left = tl.reshape(left, x.shape)
        right = tl.reshape(right, x.shape)
        swap = ((left > right).to(tl.int32) ^ flip) != 0
        return tl.where(swap, x ^ left ^ right, x)

    @triton.jit
    def _bitonic_merge_i(x, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
        n_outer: tl.constexpr = x.numel >> n_dims
        if order == 2:
            shape: tl.constexpr = [n_outer * (1 << (n_dims - 1 - stage)), 2, 1 << stage]
            flip = tl.reshape(tl.broadcast_to(tl.arange(0, 2)[None, :, None], shape), x.shape)
        else:
            flip = order
        for i in tl.static_range(stage):
            x = _cas(x, flip, i + (n_dims - stage), n_dims)
        return x

    @triton.jit
    def _sort_last(x, N_LOG: tl.constexpr, DESC: tl.constexpr):
        """Sort integer x along its last dimension (2**N_LOG long)."""
        for i in tl.static_range(1, N_LOG + 1):
            x = _bitonic_merge_i(x, i, 2 if i < N_LOG else DESC, N_LOG)
        return x

else:

    @triton.jit
    def _sort_last(x, N_LOG: tl.constexpr, DESC: tl.constexpr):
        """Sort x along its last dimension (2**N_LOG long)."""
        return tl.sort(x, descending=DESC)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_softmax(m, s, scale):
    """One step of the streaming softmax over a block of raw scores ``s [R, BK]``
    (``q . k``, masked entries ``-inf``) taken to base 2 by ``scale``
    (``log2(e) / sqrt(D)``): the new running max (of the scaled scores), the
    factor that rescales the sums kept so far, and ``p = exp2(s * scale - max)``.
    Rows with nothing visible yet keep max ``-inf`` and contribute zeros.

    The scale is applied to the row max and inside one fused multiply-add per
    entry (the max of scaled scores is the scaled max), not by a separate
    multiply of the whole block."""
    m_new = tl.maximum(m, tl.max(s, axis=1) * scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m - m_use), tl.exp2(tl.fma(s, scale, -m_use[:, None]))


@triton.jit
def _online_softmax_rows(m, s, scale, sel):
    """:func:`_online_softmax` for a block whose mask is a whole row's: rows
    with ``sel`` [R] false keep their max and sums (factor 1, ``p`` = 0), the
    others see every entry. The mask acts once per row, on the max and on the
    exponent's offset (+inf: ``exp2(-inf) = 0``), instead of a compare and
    select per entry; the values are those :func:`_online_softmax` gives for
    the same block masked per entry."""
    m_new = tl.where(sel, tl.maximum(m, tl.max(s, axis=1) * scale), m)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.where(sel, tl.exp2(m - m_use), 1.0)
    return m_new, alpha, tl.exp2(tl.fma(s, scale, -tl.where(sel, m_use, float("inf"))[:, None]))


@triton.jit
def _accumulate(acc, acc_l, alpha, p, vv, IEEE: tl.constexpr):
    """The streaming softmax's sums after one block: ``acc_l = acc_l * alpha +
    rowsum(p)`` and ``acc = acc * alpha + p @ vv``."""
    acc_l = acc_l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, IEEE)
    return acc, acc_l


@triton.jit
def _nonfinite_rows(BAD, first, last):
    """Whether value rows ``[first, last)`` of a sequence hold inf or NaN:
    ``BAD`` points at the sequence's exclusive prefix counts of such rows
    (``ops.nonfinite_prefix``). Two scalar loads; no value is read."""
    return tl.load(BAD + last) != tl.load(BAD + first)


@triton.jit
def _add_nonfinite(acc, kept, VRAW, rows, rmask, stride, d):
    """``acc`` [R, D] plus the non-finite values of the key rows ``rows`` [N]
    (those with ``rmask``) of ``VRAW`` (the values as given, ``stride`` apart)
    over the pairs ``kept`` [R, N] keeps, as ``nsaflex.reference.masked_product``
    adds them: +inf, -inf, or NaN where a row keeps both or a NaN. The branch
    loops read these values as 0 (their ``V`` holds the finite part), so
    ``acc`` holds the finite part.

    Kept pairs weigh ``H = 2^100`` (the others 0) against codes ``H`` where a
    value is +inf or NaN (``up``) and where it is -inf or NaN (``down``), else
    0. ``H * H`` passes fp32's range, so ``weight @ up`` is +inf where a kept
    value is +inf or NaN and ``weight @ down`` where one is -inf or NaN;
    ``acc`` gains their difference: a kept +inf gives +inf, a kept -inf
    -inf, both (here or in an earlier call) inf - inf = NaN; finite codes
    meet the weights 0 as 0 (where ``p @ v`` would add ``0 * inf = NaN``
    over the masked pairs). Each product starts from zero, never from
    ``acc`` or the other: a fused multiply-add rounds ``inf - 2^200`` once,
    to inf (the GPU's matrix units and FMA dots do; the interpreter's
    products overflow first, which hid it). bf16 operands (H and 0 are exact
    there) take the matrix units."""
    vv = tl.load(VRAW + rows[:, None] * stride + d[None, :], mask=rmask[:, None], other=0.0)
    finite = tl.abs(vv) < float("inf")
    weight = tl.where(kept, 1.2676506002282294e30, 0.0)
    up = tl.where(finite | (vv < 0), 0.0, 1.2676506002282294e30)
    down = tl.where(finite | (vv > 0), 0.0, 1.2676506002282294e30)
    if vv.dtype == tl.float32:
        plus = tl.dot(weight, up, input_precision="ieee")
        minus = tl.dot(weight, down, input_precision="ieee")
    else:
        plus = tl.dot(weight.to(tl.bfloat16), up.to(tl.bfloat16))
        minus = tl.dot(weight.to(tl.bfloat16), down.to(tl.bfloat16))
    # One sum of the two, then onto acc: Triton folds `acc + dot(a, b)` into the
    # dot's own accumulator, where -inf + 2^200 rounds to -inf.
    return acc + (plus - minus)


@triton.jit
def _finish_branch(out, acc, acc_l, m, gate, valid, O, LSE, q_base, row_off, lse_off, d, SAVE: tl.constexpr):
    """The end of one branch of :func:`slc_win_kernel`: its output ``o = acc /
    acc_l`` added to ``out`` with the rows' ``gate`` [R]; where ``SAVE`` (a
    backward follows) ``o`` into ``O`` (q's layout) and its log-sum-exp
    ``m + log2(acc_l)`` (0 where nothing is visible) into ``LSE``."""
    o = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
    out += gate[:, None] * o
    if SAVE:
        tl.store(O + q_base + row_off[:, None] + d[None, :], o.to(O.dtype.element_ty), mask=valid[:, None])
        tl.store(LSE + lse_off, tl.where(acc_l > 0, m + tl.log2(acc_l), 0.0), mask=valid)
    return out


@triton.jit
def _seq_field(SEQ, b, FIELD: tl.constexpr):
    """Field ``FIELD`` of sequence ``b`` in the sequence table ``SEQ`` [B, 4]
    int32 (``SeqLayout.table``): 0 its first row, 1 its length, 2 its first
    compressed row, 3 its number of compressed tokens."""
    return tl.load(SEQ + 4 * b + FIELD)


@triton.constexpr_function
def union_log(sel_rows, width):
    """log2 of a union list's capacity: the ``sel_rows x width`` list slots
    packed without padding (``_tile_keys``), rounded up to a power of two."""
    return (max(1, sel_rows * width) - 1).bit_length()


@triton.constexpr_function
def key_tile(block):
    """Key columns per selection step for blocks of ``block`` keys: the block
    padded to a power of two and to the 16 columns a matrix product takes on
    the GPU (the interpreter takes 8, so only a GPU compile catches it; the
    padding columns are masked off)."""
    return max(16, 1 << max(0, block - 1).bit_length())


@triton.constexpr_function
def row_log(sel_rows):
    """log2 of the selecting rows of a tile: the bits of a row index in the
    union's sort keys ``block << row_log | row`` (``_tile_union``)."""
    return max(0, (sel_rows - 1).bit_length())


@triton.jit
def _program_tile(LENS, BT: tl.constexpr, SEQ_STRIDE: tl.constexpr):
    """A program of a row-tile grid ``(tiles, B, Hkv)``: (tile index, sequence
    ``b``, kv head ``hk``, the sequence's length, the tile's first token).
    ``LENS``: the lengths, ``SEQ_STRIDE`` int32 apart (4 in the sequence
    table, :func:`_seq_field`)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    return pid_t, b, tl.program_id(2), tl.load(LENS + SEQ_STRIDE * b), pid_t * BT


@triton.jit
def _query_tile(Q, STARTS, b, hk, t0, length, sq,
                G: tl.constexpr, GR: tl.constexpr, BT: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                SEQ_STRIDE: tl.constexpr):
    """The set-up of a row tile (:func:`_tile_rows`) of the selection kernel and
    ``bwd_dq``: (the sequence's first row ``start``, r, t, g, valid, head ``h``
    [R], ``d``, the rows' place :func:`_rows_at` in q's layout ``q_base,
    row_off``, and the query rows ``q`` [R, D]). ``sq``: q's (batch, head,
    token) strides."""
    start = tl.load(STARTS + SEQ_STRIDE * b).to(tl.int64)
    r, t, g, valid = _tile_rows(t0, length, G, GR, BT, R)
    d = tl.arange(0, D)
    q_base, row_off = _rows_at(b, hk, start, g, t, sq[0], sq[1], sq[2], G)
    q = tl.load(Q + q_base + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    return start, r, t, g, valid, hk * G + g, d, q_base, row_off, q


@triton.jit
def _key_value_rows(K, V, off, d, mask):
    """Rows ``off`` [N] (with ``mask``; the others read as zeros) of the key and
    the value tensor: ([N, D], [N, D])."""
    kk = tl.load(K + off[:, None] + d[None, :], mask=mask[:, None], other=0.0)
    return kk, tl.load(V + off[:, None] + d[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _key_rows(base, desc, s0, s_pos, kmask, stride, d, TMA: tl.constexpr):
    """Rows ``s_pos`` (``s0 + arange``) of a key or value sequence: through the
    tensor descriptor ``desc`` (one bulk copy, rows past the sequence read as
    zeros) when ``TMA``, else one pointer per element with ``kmask`` (rows to
    load; the others read as zeros)."""
    if TMA:
        return desc.load([s0, 0])
    else:
        return tl.load(base + s_pos[:, None] * stride + d[None, :], mask=kmask[:, None], other=0.0)


@triton.jit
def _sequence_desc(base, length, stride, BK: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """A tensor descriptor over one sequence's ``[length, D]`` rows (``TMA``),
    read ``BK`` rows at a time; otherwise ``base`` itself, which
    :func:`_key_rows` then ignores (triton 3.6 cannot return ``None``). Rows
    past ``length`` read as zeros, like the masked pointer loads they replace."""
    if TMA:
        return tl.make_tensor_descriptor(base, [length, D], [stride, 1], [BK, D])
    else:
        return base


@triton.jit
def _num_visible(t, n_cmp, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr):
    """Causal visibility: compressed tokens 0 .. num_visible(t) - 1 are visible to t."""
    nv = tl.where(t + 1 >= CBLOCK, (t + 1 - CBLOCK) // CSTRIDE + 1, 0)
    return tl.minimum(nv, n_cmp)


@triton.jit
def _first_visible(t, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr):
    """videonsa_legacy visibility: tokens i >= first_visible(t) are visible to t."""
    x = t + 1 - CBLOCK
    return tl.where(x <= 0, 0, (x + CSTRIDE - 1) // CSTRIDE)


@triton.jit
def _visible(i, t, n_cmp, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr):
    """[rows, cols] visibility of compressed tokens ``i`` [cols] to queries ``t`` [rows]."""
    if LEGACY:
        return (i[None, :] >= _first_visible(t, CBLOCK, CSTRIDE)[:, None]) & (i[None, :] < n_cmp)
    else:
        return i[None, :] < _num_visible(t, n_cmp, CBLOCK, CSTRIDE)[:, None]


@triton.jit
def _visible_span(t0, t_last, n_cmp, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr):
    """Compressed tokens ``[lo, hi)`` that some row of tokens ``t0 .. t_last``
    sees (:func:`_visible`): causal, everything up to the last token's; legacy,
    everything from the first token's on."""
    if LEGACY:
        return _first_visible(t0, CBLOCK, CSTRIDE), n_cmp
    else:
        return 0, _num_visible(t_last, n_cmp, CBLOCK, CSTRIDE)


@triton.jit
def _eq9_count(s, A: tl.constexpr, BB: tl.constexpr):
    """Number of (m, n), m < A, n < BB with m + n = s."""
    hi = tl.minimum(s, A - 1)
    lo = tl.maximum(s - BB + 1, 0)
    return tl.where((s >= 0) & (s <= A + BB - 2), hi - lo + 1, 0).to(tl.float32)


@triton.jit
def _forced(ts, LS: tl.constexpr, FIRST: tl.constexpr, PREV: tl.constexpr, CUR: tl.constexpr):
    cur = ts // LS
    f0 = tl.where(cur >= 0, 0, -1) if FIRST else tl.full(cur.shape, -1, tl.int32)
    f1 = tl.where(cur >= 1, cur - 1, -1) if PREV else tl.full(cur.shape, -1, tl.int32)
    f2 = cur if CUR else tl.full(cur.shape, -1, tl.int32)
    if FIRST:
        f1 = tl.where(f1 == 0, -1, f1)
        f2 = tl.where(f2 == 0, -1, f2)
    return f0, f1, f2


@triton.jit
def _num_forced(f0, f1, f2):
    """How many of a row's forced blocks exist (:func:`_forced`: -1 for none)."""
    return (f0 >= 0).to(tl.int32) + (f1 >= 0).to(tl.int32) + (f2 >= 0).to(tl.int32)


@triton.jit
def _forced_candidate(f, n_cand):
    """Whether forced block ``f`` (-1: none) is among the candidates ``j < n_cand``."""
    return (f >= 0) & (f < n_cand)


@triton.jit
def _rows_at(b, hk, start, g, t, sb, sh, st, G: tl.constexpr):
    """Where rows (head ``hk * G + g``, token ``start + t``; ``g, t`` [R]) of
    sequence ``b`` lie in a ``[B, H, T, ...]`` tensor of strides ``sb, sh,
    st``: (base, offsets). The base (batch, the group's first head, the
    sequence's first token) is 64-bit: a head times the head stride passes
    2^31 in long sequences (head 27 of q [1, 28, 1M, 128] starts at element
    3.5 G). The rows' offsets from it stay 32-bit, as registers in the loops
    want (``G`` x head stride + length x token stride < 2^31 is checked
    before launch)."""
    base = b.to(tl.int64) * sb + (hk * G).to(tl.int64) * sh + start * st
    return base, g * sh + t * st


@triton.jit
def _tile_rows(t0, length, G: tl.constexpr, GR: tl.constexpr, BT: tl.constexpr, R: tl.constexpr):
    """Rows of a tile of ``BT`` tokens from ``t0``: row ``r`` is head ``r % GR``
    of token ``t0 + r // GR``. ``GR = G`` packs the group's heads densely (9
    tokens x 7 heads = 63 of 64 rows for Qwen2.5-VL's G = 7); ``GR = GP`` gives
    every token a power of two of rows, the heads past ``G`` padding. Returns
    (r, t, g, valid), ``valid`` false for padding rows and tokens past the end."""
    r = tl.arange(0, R)
    tok = r // GR
    g = r % GR
    t = t0 + tok
    valid = (g < G) & (tok < BT) & (t < length)
    return r, t, g, valid


@triton.jit
def _lse_step(q, t, valid, i0, hi, n_cmp, kbase, kdesc, vbase, vdesc, skt, d, m, acc_l, acc, scale_log2,
              BN: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr,
              IEEE: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr, OUTPUT: tl.constexpr):
    """One step of :func:`cmp_lse_kernel` over compressed tokens ``i0 .. i0 + BN``:
    the running max ``m``, sum ``acc_l`` and (``OUTPUT``) output ``acc``. ``MASKED``:
    apply the visibility rule per element (off where every row sees the chunk whole)."""
    i = i0 + tl.arange(0, BN)
    kc = _key_rows(kbase, kdesc, i0, i, i < hi, skt, d, TMA)
    s = _dot(q, tl.trans(kc), IEEE)
    if MASKED:
        vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
        s = tl.where(vis, s, float("-inf"))
    m, alpha, p = _online_softmax(m, s, scale_log2)
    if OUTPUT:
        vc = _key_rows(vbase, vdesc, i0, i, i < hi, skt, d, TMA)
        acc, acc_l = _accumulate(acc, acc_l, alpha, p, vc, IEEE)
    else:
        acc_l = acc_l * alpha + tl.sum(p, axis=1)
    return m, acc_l, acc


@triton.jit
def cmp_lse_kernel(
    Q, KC, VC, LSE, OC, SEQ, NONFINITE,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, sbad,
    scale_log2,
    G: tl.constexpr, GR: tl.constexpr, BT: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    OUTPUT: tl.constexpr,
):
    """Log-sum-exp (base 2) of every row over its visible compressed tokens,
    ``lse = log2 sum_i exp2(s_i)`` with ``s_i = q . kc_i * log2(e) / sqrt(D)``,
    into ``LSE [B, H, T]`` (0 where nothing is visible), and the compression
    output ``o = sum_i exp2(s_i - lse) vc_i`` into ``OC [B, H, T, D]`` (q's strides
    and dtype), accumulated flash-style (running max, rescaled sums), so that
    the score pass needs no values. H200, 128K
    video: the two passes 10.6 ms against 12.3 with the output in the score pass.
    ``OUTPUT`` False (the FlexAttention backend's scoring, which runs the
    compression branch itself): the log-sum-exp alone; ``VC``, ``OC`` and
    ``NONFINITE`` are not read or written.
    ``VC``: the compressed values with inf and NaN read as 0; ``NONFINITE``:
    (the compressed values as given, ``[B, Hkv, Tc + 1]`` prefix counts of
    their rows holding inf or NaN (``ops.nonfinite_prefix``, (batch, head)
    strides ``sbad``)): chunks with such rows add them after the loop
    (:func:`_add_nonfinite`), over the pairs visibility keeps.

    Rows: :func:`_tile_rows` (``BT`` tokens, ``GR`` rows per token, ``R`` rows).
    ``TMA``: compressed keys (and values) through tensor descriptors (:func:`_sequence_desc`)."""
    pid_t, b, hk, length, t0 = _program_tile(SEQ + 1, BT, 4)
    if t0 < length:
        start = _seq_field(SEQ, b, 0).to(tl.int64)
        cstart = _seq_field(SEQ, b, 2).to(tl.int64)
        n_cmp = _seq_field(SEQ, b, 3)
        r, t, g, valid = _tile_rows(t0, length, G, GR, BT, R)
        h = hk * G + g
        d = tl.arange(0, D)
        bb = b.to(tl.int64)
        q_base, q_rows = _rows_at(b, hk, start, g, t, sqb, sqh, sqt, G)
        q = tl.load(Q + q_base + q_rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        t_last = tl.minimum(t0 + BT, length) - 1
        lo, hi = _visible_span(t0, t_last, n_cmp, CBLOCK, CSTRIDE, LEGACY)
        m = tl.full([R], float("-inf"), tl.float32)
        acc_l = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        kbase = KC + bb * skb + hk.to(tl.int64) * skh + cstart * skt
        kdesc = _sequence_desc(kbase, n_cmp, skt, BN, D, TMA)
        vbase = VC + bb * skb + hk.to(tl.int64) * skh + cstart * skt
        if OUTPUT:
            vdesc = _sequence_desc(vbase, n_cmp, skt, BN, D, TMA)
        else:
            vdesc = vbase  # not read
        # Chunks every row of the tile sees whole (causal: the tile's first token sees
        # them) need no per-element mask; rows past the end or padding heads compute
        # finite garbage there that is never stored.
        # Two loops (unrolled at compile time): [lo, mid) unmasked, then [mid, hi) masked.
        mid = lo if LEGACY else _num_visible(t0, n_cmp, CBLOCK, CSTRIDE) // BN * BN
        for masked in tl.static_range(2):
            for i0 in range(mid if masked else lo, hi if masked else mid, BN):
                m, acc_l, acc = _lse_step(q, t, valid, i0, hi, n_cmp, kbase, kdesc, vbase, vdesc, skt, d, m, acc_l,
                                          acc, scale_log2, BN, CBLOCK, CSTRIDE, LEGACY, IEEE, TMA, masked == 1,
                                          OUTPUT)
        if OUTPUT:
            VCRAW, BADC = NONFINITE
            bad = BADC + bb * sbad[0] + hk.to(tl.int64) * sbad[1] + cstart
            if _nonfinite_rows(bad, lo, hi):
                vraw = VCRAW + bb * skb + hk.to(tl.int64) * skh + cstart * skt
                for i0 in range(lo, hi, BN):
                    if _nonfinite_rows(bad, i0, tl.minimum(i0 + BN, hi)):
                        # 16 keys at a time: the fewest registers a matrix product takes.
                        for c in range(0, BN, 16):
                            i = i0 + c + tl.arange(0, 16)
                            kept = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None] & (i < hi)[None, :]
                            acc = _add_nonfinite(acc, kept, vraw, i, i < hi, skt, d)
        lse = tl.where(acc_l > 0, m + tl.log2(acc_l), 0.0)
        lse_base, lse_rows = _rows_at(b, hk, start, g, t, slb, slh, slt, G)
        tl.store(LSE + lse_base + lse_rows, lse, mask=valid)
        if OUTPUT:
            o = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
            tl.store(OC + q_base + q_rows[:, None] + d[None, :], o.to(OC.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _score_rows(t0, length, G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, PERM: tl.constexpr):
    """Rows of a score-pass tile of ``R // GP`` tokens from ``t0``: (t, g, valid).

    Plain: row ``r`` is head ``r % GP`` of token ``t0 + r // GP``. ``PERM``
    (2 <= GP <= 8, R a multiple of 16) orders each 16-row slab as (head bit
    ``hi``, token, head ``lo``): row ``16 * slab + 8 * hi + (GP / 2) * tok + lo``
    is head ``(GP / 2) * hi + lo`` of token ``(16 / GP) * slab + tok``. A
    Hopper matrix product gives each thread rows ``x`` and ``x + 8`` of a slab,
    so the group sum over a token's heads (:func:`_group_sum`) adds half of
    them inside the thread and shuffles across log2(GP / 2) lanes instead of
    log2(GP): a third of the shuffles for GP = 8. Any layout gives the same
    sums; only the cost differs."""
    r = tl.arange(0, R)
    if PERM:
        HALF: tl.constexpr = GP // 2
        slab = r // 16
        low = r % 8
        tok = slab * (16 // GP) + low // HALF
        g = ((r // 8) % 2) * HALF + low % HALF
    else:
        tok = r // GP
        g = r % GP
    t = t0 + tok
    return t, g, (g < G) & (t < length)


@triton.jit
def _group_sum(p, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, PERM: tl.constexpr):
    """``[BT * GP, BN]`` per-row probabilities summed over each token's heads:
    ``[BT, BN]`` in token order (rows as :func:`_score_rows` lays them out)."""
    if PERM:
        R: tl.constexpr = BT * GP
        x = tl.reshape(p, [R // 16, 2, 16 // GP, GP // 2, BN])
        x = tl.sum(tl.sum(x, axis=1), axis=2)  # in-thread first: fewer values to shuffle
        return tl.reshape(x, [BT, BN])
    else:
        return tl.sum(tl.reshape(p, [BT, GP, BN]), axis=1)


@triton.jit
def _chunk_probs(kt, q, lse, t, valid, i, n_cmp, scale_log2, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
                 CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr,
                 HEAD_SCORING: tl.constexpr, PERM: tl.constexpr, MASKED: tl.constexpr):
    """The normalised probabilities ``p = exp2(q . kc * scale_log2 - lse)`` of a
    score tile's rows against compressed tokens ``i`` [BN] (keys ``kt`` [D,
    BN]): per row ``[R, BN]`` (head scoring) or summed over each token's heads
    ``[BT, BN]`` (group scoring). ``MASKED``: apply the visibility rule per
    element (off where every row sees the chunk whole; padding rows have lse =
    +inf, so p = 0 there)."""
    s = _dot(q, kt, IEEE)
    p = tl.exp2(tl.fma(s, scale_log2, -lse[:, None]))
    if MASKED:
        vis = _visible(i, t, n_cmp, CBLOCK, CSTRIDE, LEGACY) & valid[:, None]
        p = tl.where(vis, p, 0.0)
    if HEAD_SCORING:
        ps = p
    else:
        ps = _group_sum(p, BT, GP, BN, PERM)
    return ps


@triton.jit
def _eq9_scores(ps, carry, m_self, m_next, A: tl.constexpr, BB: tl.constexpr):
    """Summed probabilities ``ps`` [rows, A * NT] of one chunk -> its blocks'
    Eq. 9 scores [rows, NT] (the band matrix ``m_self``, plus the ``carry``
    from the chunk before) and the carry into the next chunk."""
    if A == 1 and BB == 1:
        bs = ps
    else:
        bs = tl.dot(ps, m_self, input_precision="ieee") + carry
        carry = tl.dot(ps, m_next, input_precision="ieee")
    return bs, carry


@triton.jit
def _store_scores(SBUF, sb_row, bs, j, n_cand, valid_s):
    """Block scores ``bs`` [rows, NT] of blocks ``j`` [NT], clamped at +0 (+0
    for -0), into the selecting rows' buffer rows ``sb_row``: only the
    candidates ``j < n_cand`` of valid rows."""
    put = (j[None, :] < n_cand[:, None]) & valid_s[:, None]
    tl.store(SBUF + sb_row[:, None] + j[None, :], tl.where(bs > 0, bs, 0.0), mask=put)


@triton.jit
def _mark_forced(SBUF, sb_row, f0, f1, f2, n_cand, valid_s):
    """Forced blocks among the candidates read -1 for :func:`topn_select_kernel`
    (one comparison there marks candidates). The score loop's stores to these
    entries came from other threads of the program: a barrier first."""
    tl.debug_barrier()
    sb_ptr = SBUF + sb_row
    tl.store(sb_ptr + f0, -1.0, mask=_forced_candidate(f0, n_cand) & valid_s)
    tl.store(sb_ptr + f1, -1.0, mask=_forced_candidate(f1, n_cand) & valid_s)
    tl.store(sb_ptr + f2, -1.0, mask=_forced_candidate(f2, n_cand) & valid_s)


@triton.jit
def _score_step(c, q, lse, t, valid, n_cmp, kbase, kdesc, skt, d, carry, m_self, m_next, jl, n_cand, valid_s,
                SBUF, sb_row, scale_log2, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, NT: tl.constexpr,
                A: tl.constexpr, BB: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr,
                LEGACY: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, HEAD_SCORING: tl.constexpr,
                PERM: tl.constexpr, MASKED: tl.constexpr):
    """Chunk ``c`` of :func:`cmp_score_kernel`'s scoring loop (compressed tokens
    ``c * BN ..``, blocks ``c * NT ..``): probabilities, the block scores of the
    candidate blocks (+0 for -0) into the chunk's buffer. Returns the Eq. 9
    carry into the next chunk."""
    i = c * BN + tl.arange(0, BN)
    kc = _key_rows(kbase, kdesc, c * BN, i, i < n_cmp, skt, d, TMA)
    ps = _chunk_probs(tl.trans(kc), q, lse, t, valid, i, n_cmp, scale_log2, BT, GP, BN, CBLOCK, CSTRIDE, LEGACY, IEEE,
                      HEAD_SCORING, PERM, MASKED)
    bs, carry = _eq9_scores(ps, carry, m_self, m_next, A, BB)
    _store_scores(SBUF, sb_row, bs, c * NT + jl, n_cand, valid_s)
    return carry


@triton.jit
def _eq9_bands(NT: tl.constexpr, BN: tl.constexpr, A: tl.constexpr, BB: tl.constexpr):
    """(block offsets ``jl`` [NT], token offsets ``il`` [BN], the Eq. 9 band
    matrices [BN, NT] of a score chunk's own blocks and of the next chunk's)."""
    jl = tl.arange(0, NT)
    il = tl.arange(0, BN)
    m_self = _eq9_count(A * jl[None, :] - il[:, None], A, BB)
    m_next = _eq9_count(A * (jl[None, :] + NT) - il[:, None], A, BB)
    return jl, il, m_self, m_next


@triton.jit
def _score_chunks(t0, t_last, n_cmp, BN: tl.constexpr, NT: tl.constexpr, LS: tl.constexpr, CBLOCK: tl.constexpr,
                  CSTRIDE: tl.constexpr, LEGACY: tl.constexpr):
    """(n_full, n_iter): the score loop's chunks for tokens ``t0 .. t_last``,
    enough to cover their visible compressed tokens and candidate blocks.
    Chunks that every row sees whole (causal: the tile's first token sees
    them) skip the per-element visibility mask: two loops, unrolled at
    compile time, [0, n_full) unmasked, then [n_full, n_iter) masked."""
    jc_last = (t_last + 1) // LS
    if LEGACY:
        n_iter = tl.maximum(tl.cdiv(n_cmp, BN), tl.cdiv(jc_last, NT))
    else:
        n_iter = tl.maximum(tl.cdiv(_num_visible(t_last, n_cmp, CBLOCK, CSTRIDE), BN), tl.cdiv(jc_last, NT))
    n_full = 0 if LEGACY else tl.minimum(_num_visible(t0, n_cmp, CBLOCK, CSTRIDE) // BN, n_iter)
    return n_full, n_iter


@triton.constexpr_function
def unit_tile_tokens(bt, unit):
    """Tokens of a score-pass program for selection units of ``unit`` queries
    (query-block granularity; 1: tokens): ``bt`` tokens holding ``bt // unit``
    whole units where ``unit`` divides ``bt``, else one unit, scored in
    sub-tiles of ``bt`` tokens (the last one masked past the unit)."""
    return bt if bt % unit == 0 else unit


@triton.jit
def _score_tile(Q, LSE, b, hk, start, t0, length, sqb, sqh, sqt, slb, slh, slt,
                G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, D: tl.constexpr, PERM: tl.constexpr):
    """A score-pass tile of ``R // GP`` tokens from ``t0`` (rows :func:`_score_rows`,
    tokens at or past ``length`` not valid): (t, valid, q [R, D], lse [R]),
    the lse +inf on rows that are not valid."""
    t, g, valid = _score_rows(t0, length, G, GP, R, PERM)
    q_base, q_rows = _rows_at(b, hk, start, g, t, sqb, sqh, sqt, G)
    q = tl.load(Q + q_base + q_rows[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)
    lse = tl.load(LSE + b.to(tl.int64) * slb + (hk * G + g) * slh + (start + t) * slt, mask=valid, other=0.0)
    return t, valid, q, tl.where(valid, lse, float("inf"))


@triton.jit
def _unit_sum(bs, BT: tl.constexpr, GP: tl.constexpr, NT: tl.constexpr, UNIT: tl.constexpr, UPT: tl.constexpr,
              HEAD_SCORING: tl.constexpr):
    """Token-row block scores of a score tile -> its units' scores: ``[BT, NT]``
    (group scoring) -> ``[UPT, NT]``, or ``[BT * GP, NT]`` (head scoring, row
    ``tok * GP + g``) -> ``[UPT * GP, NT]`` (row ``unit * GP + g``). ``UPT`` = 1:
    every row belongs to the one unit (rows past it hold zeros)."""
    if HEAD_SCORING:
        if UPT == 1:
            return tl.sum(tl.reshape(bs, [BT, GP, NT]), axis=0)
        else:
            return tl.reshape(tl.sum(tl.reshape(bs, [UPT, UNIT, GP, NT]), axis=1), [UPT * GP, NT])
    else:
        if UPT == 1:
            return tl.sum(bs, axis=0)[None, :]
        else:
            return tl.sum(tl.reshape(bs, [UPT, UNIT, NT]), axis=1)


@triton.jit
def _unit_block_scores(Q, KC, LSE, SBUF, b, hk, t0, length, start, cstart, n_cmp,
                       sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, sbb, sbh, sbt, scale_log2, T_OFF,
                       G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                       CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr,
                       BN: tl.constexpr, LS: tl.constexpr, FIRST: tl.constexpr, PREV: tl.constexpr,
                       CUR: tl.constexpr, HEAD_SCORING: tl.constexpr, NT: tl.constexpr, A: tl.constexpr,
                       BB: tl.constexpr, TMA: tl.constexpr, UNIT: tl.constexpr):
    """:func:`cmp_score_kernel` for selection units of ``UNIT`` > 1 queries
    (query-block granularity): the program's units ``(t0 - T_OFF) / UNIT ..``
    (:func:`unit_tile_tokens`) get one buffer row each (per head for head
    scoring), their queries' probabilities summed (Eq. 9 is linear, so the
    per-token block scores are summed), the candidates and forced blocks those
    of each unit's first query."""
    TP: tl.constexpr = unit_tile_tokens(BT, UNIT)
    UPT: tl.constexpr = TP // UNIT
    SUB: tl.constexpr = (TP + BT - 1) // BT
    R: tl.constexpr = BT * GP
    PERM: tl.constexpr = (not HEAD_SCORING) and GP >= 2 and GP <= 8 and R % 16 == 0
    bb = b.to(tl.int64)
    d = tl.arange(0, D)
    end = tl.minimum(t0 + TP, length)  # the program's tokens: whole units, cut at the sequence's end
    kbase = KC + bb * skb + hk.to(tl.int64) * skh + cstart * skt
    kdesc = _sequence_desc(kbase, n_cmp, skt, BN, D, TMA)
    if HEAD_SCORING:
        e = tl.arange(0, UPT * GP)
        tu = t0 + (e // GP) * UNIT
        gu = e % GP
        valid_u = (gu < G) & (tu < length)
        hs = hk * G + gu
    else:
        tu = t0 + tl.arange(0, UPT) * UNIT
        valid_u = tu < length
        hs = hk
    f0, f1, f2 = _forced(tu, LS, FIRST, PREV, CUR)
    n_cand = (tu + 1) // LS
    sb_row = bb * sbb + hs * sbh + ((tu - T_OFF) // UNIT).to(tl.int64) * sbt
    jl, il, m_self, m_next = _eq9_bands(NT, BN, A, BB)
    carry = tl.zeros([R if HEAD_SCORING else BT, NT], tl.float32)
    n_full, n_iter = _score_chunks(t0, end - 1, n_cmp, BN, NT, LS, CBLOCK, CSTRIDE, LEGACY)
    if SUB == 1:
        t, valid, q, lse = _score_tile(Q, LSE, b, hk, start, t0, end, sqb, sqh, sqt, slb, slh, slt, G, GP, R, D, PERM)
    for masked in tl.static_range(2):
        for c in range(n_full if masked else 0, n_iter if masked else n_full):
            i = c * BN + il
            kt = tl.trans(_key_rows(kbase, kdesc, c * BN, i, i < n_cmp, skt, d, TMA))
            if SUB == 1:
                ps = _chunk_probs(kt, q, lse, t, valid, i, n_cmp, scale_log2, BT, GP, BN, CBLOCK, CSTRIDE, LEGACY,
                                  IEEE, HEAD_SCORING, PERM, masked == 1)
            else:
                # A unit longer than the tile: its sub-tiles' probabilities summed
                # element-wise (row r of every sub-tile belongs to the one unit).
                ps = tl.zeros([R if HEAD_SCORING else BT, BN], tl.float32)
                for sub in range(SUB):
                    t, valid, q, lse = _score_tile(Q, LSE, b, hk, start, t0 + sub * BT, end, sqb, sqh, sqt, slb, slh,
                                                   slt, G, GP, R, D, PERM)
                    ps += _chunk_probs(kt, q, lse, t, valid, i, n_cmp, scale_log2, BT, GP, BN, CBLOCK, CSTRIDE,
                                       LEGACY, IEEE, HEAD_SCORING, PERM, masked == 1)
            bs, carry = _eq9_scores(ps, carry, m_self, m_next, A, BB)
            _store_scores(SBUF, sb_row, _unit_sum(bs, BT, GP, NT, UNIT, UPT, HEAD_SCORING), c * NT + jl, n_cand,
                          valid_u)
    _mark_forced(SBUF, sb_row, f0, f1, f2, n_cand, valid_u)


@triton.jit
def cmp_score_kernel(
    Q, KC, LSE, SBUF, SEQ,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, sbb, sbh, sbt,
    scale_log2, T_OFF, T_END,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
    CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, LEGACY: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr,
    LS: tl.constexpr, FIRST: tl.constexpr, PREV: tl.constexpr, CUR: tl.constexpr,
    HEAD_SCORING: tl.constexpr, NT: tl.constexpr, A: tl.constexpr, BB: tl.constexpr, TMA: tl.constexpr,
    UNIT: tl.constexpr,
):
    """Block scores from probabilities recomputed with the lse pass's
    log-sum-exp: ``p_i = exp2(s_i - lse)``, (group-summed, then) mapped to
    selection blocks by NSA Eq. 9. The loop walks block chunks of NT blocks;
    its compressed chunk is [A*jc0, A*jc0 + A*NT) (A = l'/d), so BN = A*NT.

    ``UNIT`` = 1 (token granularity): the program covers tokens ``T_OFF + pid
    * BT ...`` below ``T_END`` (a query chunk). The block scores (fp32,
    clamped at +0) of the candidate blocks ``j < (t + 1) // LS`` are written
    to ``SBUF[b, hs, t - T_OFF, j]``, the forced blocks among them as -1 (so
    that :func:`topn_select_kernel` tells candidates by their sign); nothing
    else of the row is written. ``UNIT`` = m > 1 (query-block granularity):
    the same for each tile of m queries ``u * m ..`` (``T_OFF`` a multiple of
    m), summed over the tile's queries, into ``SBUF[b, hs, u - T_OFF / m, j]``
    (:func:`_unit_block_scores`).
    """
    TP: tl.constexpr = unit_tile_tokens(BT, UNIT)
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    length = tl.minimum(_seq_field(SEQ, b, 1), T_END)
    t0 = T_OFF + pid_t * TP
    if t0 < length:
        start = _seq_field(SEQ, b, 0).to(tl.int64)
        cstart = _seq_field(SEQ, b, 2).to(tl.int64)
        n_cmp = _seq_field(SEQ, b, 3)
        if UNIT > 1:
            _unit_block_scores(Q, KC, LSE, SBUF, b, hk, t0, length, start, cstart, n_cmp,
                               sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, sbb, sbh, sbt, scale_log2, T_OFF,
                               G, GP, BT, D, CBLOCK, CSTRIDE, LEGACY, IEEE, BN, LS, FIRST, PREV, CUR, HEAD_SCORING,
                               NT, A, BB, TMA, UNIT)
        else:
            R: tl.constexpr = BT * GP
            PERM: tl.constexpr = (not HEAD_SCORING) and GP >= 2 and GP <= 8 and R % 16 == 0
            t, g, valid = _score_rows(t0, length, G, GP, R, PERM)
            h = hk * G + g
            d = tl.arange(0, D)
            bb = b.to(tl.int64)
            q_base, q_rows = _rows_at(b, hk, start, g, t, sqb, sqh, sqt, G)
            q = tl.load(Q + q_base + q_rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            lse = tl.load(LSE + bb * slb + h * slh + (start + t) * slt, mask=valid, other=0.0)
            # Padding heads and rows past the end have q = 0, so s = 0: an lse of +inf
            # makes their p = exp2(s - lse) zero where the loop applies no mask.
            lse = tl.where(valid, lse, float("inf"))
            t_last = tl.minimum(t0 + BT, length) - 1
            kbase = KC + bb * skb + hk.to(tl.int64) * skh + cstart * skt
            kdesc = _sequence_desc(kbase, n_cmp, skt, BN, D, TMA)
            # Selecting rows: one per token (group scoring) or one per row (head scoring).
            if HEAD_SCORING:
                ts = t
                valid_s = valid
                hs = h
            else:
                ts = t0 + tl.arange(0, BT)
                valid_s = ts < length
                hs = hk
            f0, f1, f2 = _forced(ts, LS, FIRST, PREV, CUR)
            n_cand = (ts + 1) // LS  # complete blocks ending at or before ts
            sb_row = bb * sbb + hs * sbh + (ts - T_OFF).to(tl.int64) * sbt
            jl, il, m_self, m_next = _eq9_bands(NT, BN, A, BB)
            carry = tl.zeros([R if HEAD_SCORING else BT, NT], tl.float32)
            n_full, n_iter = _score_chunks(t0, t_last, n_cmp, BN, NT, LS, CBLOCK, CSTRIDE, LEGACY)
            for masked in tl.static_range(2):
                for c in range(n_full if masked else 0, n_iter if masked else n_full):
                    carry = _score_step(c, q, lse, t, valid, n_cmp, kbase, kdesc, skt, d, carry, m_self, m_next, jl,
                                        n_cand, valid_s, SBUF, sb_row, scale_log2, BT, GP, BN, NT, A, BB, CBLOCK,
                                        CSTRIDE, LEGACY, IEEE, TMA, HEAD_SCORING, PERM, masked == 1)
            _mark_forced(SBUF, sb_row, f0, f1, f2, n_cand, valid_s)


@triton.jit
def _write_block_list(SEL, sel_row, valid, cols, jsel, chosen, n_chosen, f0, f1, f2, NT: tl.constexpr):
    """One token's block-list row: the chosen blocks in slots 0.. (``jsel`` at
    the columns ``cols`` of the chosen entries), -1 up to NT, then the
    forced blocks and a -1."""
    # One 64-bit row pointer, then int32 column offsets: a row of up to 2,048
    # candidates pays no 64-bit address arithmetic per entry.
    row = SEL + sel_row
    tl.store(row[:, None] + cols, jsel, mask=chosen & valid[:, None])
    s = tl.arange(0, NT)
    tl.store(row[:, None] + s[None, :], tl.full([1, NT], -1, tl.int32),
             mask=(s[None, :] >= n_chosen[:, None]) & valid[:, None])
    tl.store(row + NT, f0, mask=valid)
    tl.store(row + NT + 1, f1, mask=valid)
    tl.store(row + NT + 2, f2, mask=valid)
    tl.store(row + NT + 3, tl.full(f0.shape, -1, tl.int32), mask=valid)


@triton.jit
def _copy_list(SEL, sel_row, sst, ts, valid, length, NT: tl.constexpr, UNIT: tl.constexpr):
    """The block lists just written at rows ``sel_row`` (queries ``ts``, each
    the first of a tile of ``UNIT``) copied to the tile's other queries ``ts +
    1 .. ts + UNIT - 1`` that lie before ``length``: ``NT + 4`` slots a row.
    The lists were stored by other threads of the program: a barrier first."""
    tl.debug_barrier()
    slots = tl.arange(0, NT)
    extra = NT + tl.arange(0, 4)
    head = tl.load(SEL + sel_row[:, None] + slots[None, :], mask=valid[:, None], other=-1)
    tail = tl.load(SEL + sel_row[:, None] + extra[None, :], mask=valid[:, None], other=-1)
    for k in range(1, UNIT):
        there = (valid & (ts + k < length))[:, None]
        row = SEL + (sel_row + k * sst)
        tl.store(row[:, None] + slots[None, :], head, mask=there)
        tl.store(row[:, None] + extra[None, :], tail, mask=there)


@triton.jit
def _count_at_least(bits, probe):
    """Per row of ``bits [ROWS, JP]``: how many entries are >= ``probe [ROWS]``."""
    return tl.sum((bits >= probe[:, None]).to(tl.int32), axis=1)


@triton.jit
def _count_row(bits, bits_tail, probe, TAIL: tl.constexpr):
    """:func:`_count_at_least` over a row held in two parts (the tail only
    where ``TAIL``)."""
    c = _count_at_least(bits, probe)
    if TAIL:
        c += _count_at_least(bits_tail, probe)
    return c


@triton.jit
def _row_bits(row, cols, n_cand, valid):
    """Block scores ``cols`` of each row (``row`` [ROWS]: the rows' pointers) as
    int32 bits: candidates (``cols < n_cand``) as stored, the others -1.0's
    bits, so that a negative value marks every non-candidate."""
    x = tl.load(row[:, None] + cols[None, :], mask=(cols[None, :] < n_cand[:, None]) & valid[:, None], other=-1.0)
    return x.to(tl.int32, bitcast=True)


@triton.jit
def _tie_pick(bits, lo, exact, r, eq_before):
    """One part of a row at its threshold ``lo``: where ``exact`` (the count at
    ``lo`` is k) the entries >= ``lo``; elsewhere those above it and the first
    ``r`` equal to it, ``eq_before`` equal entries lying in earlier parts.
    Returns (pick, equal entries in this part)."""
    eq = bits == lo[:, None]
    rank = tl.cumsum(eq.to(tl.int32), axis=1) + eq_before[:, None]
    pick = tl.where(exact[:, None], bits >= lo[:, None], (bits > lo[:, None]) | (eq & (rank <= r[:, None])))
    return pick, tl.sum(eq.to(tl.int32), axis=1)


@triton.jit
def _chosen_slots(bits, pick, active, k, first):
    """Chosen blocks of one part of a row (``pick`` in searched rows; in the
    others every candidate, where k > 0), their slots from ``first`` on, and
    how many."""
    chosen = tl.where(active[:, None], pick, (bits >= 0) & (k > 0)[:, None])
    ones = chosen.to(tl.int32)
    return chosen, tl.cumsum(ones, axis=1) - 1 + first[:, None], tl.sum(ones, axis=1)


@triton.jit
def topn_select_kernel(
    S, SEL, STARTS, LENS,
    sbb, sbh, sbt, ssb, ssh, sst,
    T_OFF, T_END,
    ROWS: tl.constexpr, JP: tl.constexpr, CHAIN: tl.constexpr, SPREAD: tl.constexpr,
    LS: tl.constexpr, COUNT: tl.constexpr, FIRST: tl.constexpr, PREV: tl.constexpr, CUR: tl.constexpr,
    NT: tl.constexpr, JT: tl.constexpr, TAIL: tl.constexpr, UNIT: tl.constexpr, CURRENT: tl.constexpr,
):
    """Exact top-(n - |forced|) of ``ROWS x CHAIN`` tokens' block scores (a
    query chunk's ``[B, Hsel, C, >= JW]`` fp32 buffer written by
    ``cmp_score_kernel``: scores >= +0 for the candidate blocks
    ``j < (t + 1) // LS``, negative for the forced ones among them), written
    as the block lists of ``SEL``.

    Scores are >= +0, so their int32 bit patterns order like the floats: a
    bisection over the bits finds the k-th largest score T, keeping
    ``count(bits >= lo) >= k > count(bits >= hi)`` and stopping early once
    exactly k scores lie at or above ``lo``. Then every block above T is
    chosen and, among the blocks equal to T, the lowest indices (an inclusive
    prefix count): the reference's "ties to the lower index", exactly.

    Row ``r`` of the program walks ``CHAIN`` consecutive tokens. Neighbouring
    tokens' thresholds lie close, so after the first token the search starts
    from ``[T' - SPREAD, T' + SPREAD)`` around the previous token's ``lo`` (two
    counts check the bracket; where it fails, that side falls back to the
    whole range): the invariant, hence the result, is the same; only the
    number of steps falls.

    A row is held as blocks ``[0, JP)`` and, where ``TAIL``, ``[JP, JP +
    JT)``: powers of two that together cover the chunk's largest candidate
    count. Past 64K tokens at l' = 64 a chunk's rows hold 1,024 to 2,048
    candidates; one power-of-two width of 2,048 would spend every count and
    scan on up to half a row of padding.

    ``CURRENT``: the token's own block ``t // LS`` is a candidate as well
    (``j < t // LS + 1``), scored by the caller where the score pass leaves it
    (a partial block): the released VideoNSA's selection.

    ``UNIT`` = m > 1 (query-block granularity): the buffer's rows are tiles of
    m queries (row ``u - T_OFF / m`` holds tile ``u``, scored by
    :func:`cmp_score_kernel` with the same ``UNIT``); each is ranked once, for
    its first query ``u * m``, and its block list is written to the rows of
    all of the tile's queries (:func:`_copy_list`), so that the selection
    kernels read per-token lists as for token granularity.
    """
    pid = tl.program_id(0)
    hs = tl.program_id(1).to(tl.int64)  # head x head stride passes 2^31 in long sequences
    b = tl.program_id(2)
    length = tl.minimum(tl.load(LENS + b), T_END)
    t0 = T_OFF + pid * (ROWS * CHAIN * UNIT)
    if t0 < length:
        start = tl.load(STARTS + b).to(tl.int64)
        bb = b.to(tl.int64)
        j = tl.arange(0, JP)
        jt = JP + tl.arange(0, JT)
        guess = tl.full([ROWS], -1, tl.int32)  # the previous token's lo (-1: none yet)
        for step in range(CHAIN):
            if UNIT == 1:
                ts = t0 + tl.arange(0, ROWS) * CHAIN + step
            else:
                ts = t0 + (tl.arange(0, ROWS) * CHAIN + step) * UNIT  # each row's tile's first query
            valid = ts < length
            f0, f1, f2 = _forced(ts, LS, FIRST, PREV, CUR)
            if CURRENT:
                n_cand = ts // LS + 1
            else:
                n_cand = (ts + 1) // LS
            # Candidates: scores >= +0 of blocks j < n_cand; forced blocks read -1
            # (written so by the score pass), blocks past n_cand load as -1: every
            # non-candidate has negative bits, so no mask is built per score.
            if UNIT == 1:
                row = S + (bb * sbb + hs * sbh + (ts - T_OFF).to(tl.int64) * sbt)
            else:
                row = S + (bb * sbb + hs * sbh + ((ts - T_OFF) // UNIT).to(tl.int64) * sbt)
            bits = _row_bits(row, j, n_cand, valid)
            bits_tail = bits  # stands in for the tail in _count_row's arguments without TAIL
            if TAIL:
                bits_tail = _row_bits(row, jt, n_cand, valid)
            nforced = _num_forced(f0, f1, f2)
            k = COUNT - nforced
            forced_cand = _forced_candidate(f0, n_cand).to(tl.int32) + _forced_candidate(f1, n_cand).to(tl.int32) \
                + _forced_candidate(f2, n_cand).to(tl.int32)
            n_c = tl.where(valid, n_cand - forced_cand, 0)
            active = (n_c > k) & (k > 0)
            lo = tl.zeros([ROWS], tl.int32)
            hi = tl.full([ROWS], 0x7F800001, tl.int32)
            cnt_lo = n_c
            if step > 0:
                # Bracket around the previous token's threshold (int64: no overflow near +inf).
                g_lo = tl.maximum(guess.to(tl.int64) - SPREAD, 0).to(tl.int32)
                g_hi = tl.minimum(guess.to(tl.int64) + SPREAD, 0x7F800001).to(tl.int32)
                c_glo = _count_row(bits, bits_tail, g_lo, TAIL)
                c_ghi = _count_row(bits, bits_tail, g_hi, TAIL)
                use = active & (guess >= 0)
                fits_lo = use & (c_glo >= k)
                lo = tl.where(fits_lo, g_lo, lo)
                cnt_lo = tl.where(fits_lo, c_glo, cnt_lo)
                hi = tl.where(use & (c_glo < k), g_lo, hi)
                fits_hi = use & (c_ghi >= k)
                lo = tl.where(fits_hi, g_hi, lo)
                cnt_lo = tl.where(fits_hi, c_ghi, cnt_lo)
                hi = tl.where(use & (c_ghi < k), tl.minimum(hi, g_hi), hi)
            go = active & (hi - lo > 1) & (cnt_lo != k)
            while tl.max(go.to(tl.int32), axis=0) > 0:
                mid = lo + (hi - lo) // 2
                c = _count_row(bits, bits_tail, mid, TAIL)
                up = go & (c >= k)
                down = go & (c < k)
                lo = tl.where(up, mid, lo)
                cnt_lo = tl.where(up, c, cnt_lo)
                hi = tl.where(down, mid, hi)
                go = active & (hi - lo > 1) & (cnt_lo != k)
            guess = tl.where(active, lo, guess)
            # Rows whose count reached exactly k: the scores >= lo. Otherwise lo is
            # the k-th largest score itself (hi = lo + 1): all above it, then the
            # first r equal ones.
            zero = tl.zeros([ROWS], tl.int32)
            pick = bits >= lo[:, None]
            if TAIL:
                pick_tail = bits_tail >= lo[:, None]
            if tl.max((active & (cnt_lo != k)).to(tl.int32), axis=0) > 0:
                # Ties at the threshold (rare for real scores): the prefix count
                # over the row is paid only here. Bits are integers: "> lo" is ">= lo + 1".
                exact = cnt_lo == k
                r = k - _count_row(bits, bits_tail, lo + 1, TAIL)
                pick, n_eq = _tie_pick(bits, lo, exact, r, zero)
                if TAIL:
                    # The tail's equal entries rank after all of the head's.
                    pick_tail, _ = _tie_pick(bits_tail, lo, exact, r, n_eq)
            chosen, slot, n_chosen = _chosen_slots(bits, pick, active, k, zero)
            sel_row = bb * ssb + hs * ssh + (start + ts) * sst
            if TAIL:
                # The tail's chosen blocks take the slots after the head's.
                chosen_tail, slot_tail, n_tail = _chosen_slots(bits_tail, pick_tail, active, k, n_chosen)
                n_chosen += n_tail
                tl.store(SEL + sel_row[:, None] + slot_tail, jt[None, :].to(tl.int32) + tl.zeros([ROWS, JT], tl.int32),
                         mask=chosen_tail & valid[:, None])
            _write_block_list(SEL, sel_row, valid, slot, j[None, :].to(tl.int32) + tl.zeros([ROWS, JP], tl.int32),
                              chosen, n_chosen, f0, f1, f2, NT)
            if UNIT > 1:
                _copy_list(SEL, sel_row, sst, ts, valid, length, NT, UNIT)


@triton.jit
def _tile_keys(sel_base, ssh, sst, t0, length, G: tl.constexpr, GR: tl.constexpr, SR: tl.constexpr,
               W: tl.constexpr, HEAD_SCORING: tl.constexpr, U_LOG: tl.constexpr, ROW_LOG: tl.constexpr):
    """[2**U_LOG] sort keys ``block << ROW_LOG | e`` of a tile's block lists
    (``SENT`` = 0x7FFFFFFF for empty slots). Selecting row ``e`` < ``SR`` is token
    ``t0 + e`` (group scoring; ``sel_base`` at the kv head's row of token 0) or
    matrix row ``e`` = token ``t0 + e // GR``, head ``e % GR`` (head scoring;
    ``sel_base`` at the group's first head); its ``W`` slots are the entries
    ``e * W .. e * W + W - 1``, so the lists are packed without padding."""
    N: tl.constexpr = 1 << U_LOG
    p = tl.arange(0, N)
    e = p // W
    col = p % W
    if HEAD_SCORING:
        tok = e // GR
        g = e % GR
        ok = (g < G) & (e < SR) & (t0 + tok < length)
        ptr = sel_base + g.to(tl.int64) * ssh + (t0 + tok) * sst + col
    else:
        ok = (e < SR) & (t0 + e < length)
        ptr = sel_base + (t0 + e) * sst + col
    block = tl.load(ptr, mask=ok, other=-1)
    return tl.where(block < 0, 0x7FFFFFFF, (block << ROW_LOG) | e)


@triton.jit
def _seg_or(start_a, bits_a, start_b, bits_b):
    """Combine of a segmented OR scan: a run restarts where ``start`` is set."""
    return start_a | start_b, tl.where(start_b != 0, bits_b, bits_a | bits_b)


@triton.jit
def _tile_union(key, U, UM, UC, prog, U_LOG: tl.constexpr, ROW_LOG: tl.constexpr):
    """Sorted distinct blocks of a tile's keys (:func:`_tile_keys`), written to
    U[prog, :count], with UM[prog, i] the bit mask of the selecting rows that
    list block U[prog, i] (bit e: selecting row e); UC[prog] = count. Returns
    count.

    The masks let each step of the union loop find the rows that selected its
    block from one scalar load, instead of comparing the block with the tile's
    whole block lists and moving the answer into the matrix layout every step.
    A row lists a block at most once, so a block's mask is the OR over the run
    of sorted keys that share the block."""
    N: tl.constexpr = 1 << U_LOG
    SENT: tl.constexpr = 0x7FFFFFFF
    pos = tl.arange(0, N)
    srt = _sort_last(key, U_LOG, False)
    ubase = U + prog.to(tl.int64) * N
    tl.store(ubase + pos, srt)
    tl.debug_barrier()
    prev = tl.load(ubase + pos - 1, mask=pos > 0, other=-1)
    following = tl.load(ubase + pos + 1, mask=pos + 1 < N, other=SENT)
    tl.debug_barrier()
    real = srt != SENT
    block = srt >> ROW_LOG
    first = (block != (prev >> ROW_LOG)) & real
    # The last key of a run holds the run's whole mask after the scan.
    last = (block != (following >> ROW_LOG)) & real
    bits = tl.full([N], 1, UM.dtype.element_ty) << (srt & ((1 << ROW_LOG) - 1)).to(UM.dtype.element_ty)
    _, run_bits = tl.associative_scan((first.to(tl.int32), bits), 0, _seg_or)
    slot = tl.cumsum(first.to(tl.int32), axis=0) - 1
    count = tl.sum(first.to(tl.int32), axis=0)
    tl.store(ubase + slot, block, mask=first)
    tl.store(UM + prog.to(tl.int64) * N + slot, run_bits, mask=last)
    tl.store(UC + prog, count)
    tl.debug_barrier()
    return count


@triton.jit
def _union_lists(sel_seq, U, UM, UC, prog, ssh, sst, hk, t0, length, r,
                 G: tl.constexpr, GR: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
                 HEAD_SCORING: tl.constexpr, U_LOG: tl.constexpr, ROW_LOG: tl.constexpr, BUILD: tl.constexpr):
    """The union list of tile ``prog`` (rows :func:`_tile_rows`): built from the
    block lists (``sel_seq``: SEL at the sequence's first token) when ``BUILD``,
    else read back from an earlier kernel. Returns (count, list base, row-mask
    base, ``hit_row`` [R]: each matrix row's bit in the row masks)."""
    if HEAD_SCORING:
        SR: tl.constexpr = BT * GR
        sel_base = sel_seq + (hk * G).to(tl.int64) * ssh
        hit_row = r
    else:
        SR: tl.constexpr = BT
        sel_base = sel_seq + hk * ssh
        hit_row = r // GR
    if BUILD:
        key = _tile_keys(sel_base, ssh, sst, t0, length, G, GR, SR, W, HEAD_SCORING, U_LOG, ROW_LOG)
        count = _tile_union(key, U, UM, UC, prog, U_LOG, ROW_LOG)
    else:
        count = tl.load(UC + prog)
    ubase = U + prog.to(tl.int64) * (1 << U_LOG)
    umbase = UM + prog.to(tl.int64) * (1 << U_LOG)
    return count, ubase, umbase, hit_row


@triton.jit
def _union_setup(SEL, UNION, b, hk, pid_t, n_tiles, start, ss, t0, length, r, kbase, vbase, skt,
                 G: tl.constexpr, GR: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                 LS: tl.constexpr, BS: tl.constexpr, HEAD_SCORING: tl.constexpr, TMA: tl.constexpr,
                 BUILD: tl.constexpr):
    """The set-up of a union loop of :func:`slc_win_kernel` (``BUILD``: it
    writes the tile's union list) and ``bwd_dq_kernel`` (it reads it back):
    (count, list base, row-mask base, each row's bit ``hit_row``, key and
    value descriptors, the steps ``n_whole`` that need no per-entry mask).
    ``UNION``: (U, UM, UC) of :func:`_tile_union`; ``ss``: SEL's (batch, head,
    token) strides."""
    SR: tl.constexpr = BT * G if HEAD_SCORING else BT  # selecting rows: token-heads, or tokens
    U_LOG: tl.constexpr = union_log(SR, W)
    ROW_LOG: tl.constexpr = row_log(SR)
    prog = (b * tl.num_programs(2) + hk) * n_tiles + pid_t
    count, ubase, umbase, hit_row = _union_lists(
        SEL + b.to(tl.int64) * ss[0] + start * ss[2], UNION[0], UNION[1], UNION[2], prog, ss[1], ss[2], hk, t0, length, r,
        G, GR, BT, W, HEAD_SCORING, U_LOG, ROW_LOG, BUILD)
    kdesc = _sequence_desc(kbase, length, skt, BS, D, TMA)
    vdesc = _sequence_desc(vbase, length, skt, BS, D, TMA)
    return count, ubase, umbase, hit_row, kdesc, vdesc, _num_whole(ubase, count, t0, LS, BS, U_LOG)


@triton.jit
def _row_limit(bits, hit_row, valid, t):
    """[R] causal limit of each row for a union block with row mask ``bits``:
    the row's position ``t`` where its bit is set (and the row is real), else
    -1, which no key position reaches."""
    return tl.where((((bits >> hit_row) & 1) != 0) & valid, t, -1)


@triton.jit
def _union_entry(ubase, umbase, it, count):
    """Entry ``it`` of a tile's union list ``ubase[:count]`` (row masks
    ``umbase[:count]``, see :func:`_tile_union`): block index ``j`` and row mask
    ``bits``. An entry past the list reads as block -1 with no rows."""
    here = it < count
    j = tl.load(ubase + it, mask=here, other=-1)
    bits = tl.load(umbase + it, mask=here, other=0)
    return j, bits


@triton.jit
def _union_block(j, bits, hit_row, t, valid, length, LS: tl.constexpr, BS: tl.constexpr):
    """Union block ``j`` with row mask ``bits`` (``hit_row`` [R]: each row's bit
    in the masks): key positions ``s_pos`` [BS], which of them to load
    ``kmask``, each row's causal limit (:func:`_row_limit`: -1 for rows that
    did not select the block) and the first key position (where a
    descriptor load starts)."""
    offset = tl.arange(0, BS)
    first = j * LS
    s_pos = first + offset
    limit = _row_limit(bits, hit_row, valid, t)
    return s_pos, (offset < LS) & (s_pos < length), limit, first


@triton.jit
def _num_whole(ubase, count, t0, LS: tl.constexpr, BS: tl.constexpr, U_LOG: tl.constexpr):
    """How many of a tile's sorted union blocks ``ubase[:count]`` end before
    its first token ``t0`` (a prefix of the list): the steps that need no
    per-entry mask, since every row either selected the block or not. 0
    unless blocks are exactly one step wide (``BS == LS``; otherwise a
    step's extra columns need the mask)."""
    if BS == LS:
        pos = tl.arange(0, 1 << U_LOG)
        bound = (t0 + 1) // LS
        blocks = tl.load(ubase + pos, mask=pos < count, other=bound)
        return tl.sum((blocks < bound).to(tl.int32), axis=0)
    else:
        return 0


@triton.jit
def _union_step_loads(ubase, umbase, it, count, ahead, hit_row, t, valid, length, kbase, kdesc, vbase, vdesc, skt, d,
                      LS: tl.constexpr, BS: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
                      PREFETCH: tl.constexpr):
    """Step ``it`` of a union loop: its list entry, key rows ``kk``, value rows
    ``vv`` and ``mask``: [R, BS] per entry where ``MASKED`` (the row selected
    the key's block, the key exists and is causal for the row: a row that did
    not select the block has the limit -1, so one comparison per entry does
    all of it), else [R], the rows that selected the step's block (it lies
    wholly before the tile's tokens, see :func:`_num_whole`). Where
    ``PREFETCH`` the entry is ``ahead`` (loaded during the step before) and
    the next step's is loaded here, so that the copy of a key block does not
    wait on its index; otherwise it is loaded at the step. Returns (kk, vv,
    mask, the entry for the next step)."""
    if PREFETCH:
        entry = ahead
        ahead = _union_entry(ubase, umbase, it + 1, count)
    else:
        entry = _union_entry(ubase, umbase, it, count)
    s_pos, kmask, limit, first_key = _union_block(entry[0], entry[1], hit_row, t, valid, length, LS, BS)
    if MASKED:
        mask = s_pos[None, :] <= limit[:, None]
        if BS != LS:
            mask = mask & (tl.arange(0, BS) < LS)[None, :]
    else:
        mask = limit >= 0
    kk = _key_rows(kbase, kdesc, first_key, s_pos, kmask, skt, d, TMA)
    vv = _key_rows(vbase, vdesc, first_key, s_pos, kmask, skt, d, TMA)
    return kk, vv, mask, ahead


@triton.jit
def slc_win_kernel(
    Q, K, V, OC, GATES, SEL, UNION, OUT, OS, OW, LSES, LSEW, STARTS, LENS, NONFINITE,
    sq, sk, sg, ss, slse, sbad,
    scale_log2, n_tiles,
    G: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
    GI_CMP: tl.constexpr, GI_SLC: tl.constexpr, GI_WIN: tl.constexpr,
    LS: tl.constexpr, W: tl.constexpr, HEAD_SCORING: tl.constexpr,
    WIN: tl.constexpr, SAVE: tl.constexpr, TMA: tl.constexpr,
):
    """Strides come as tuples of a tensor's (batch, head, token) strides
    (``ops.SeqLayout.strides``; batch 0 for packed sequences): ``sq`` of q
    (OUT, OC, OS, OW share them), ``sk`` of k and v, ``sg`` of the gates (and
    their column stride), ``ss`` of the block lists SEL, ``slse`` of the lse
    tensors. ``UNION``: the union lists, their row masks and counts (U, UM,
    UC of :func:`_tile_union`).
    ``GI_*``: each branch's gate column, -1 for a branch the pattern lacks
    (``GI_SLC >= 0``: the pattern selects).
    Rows: :func:`_tile_rows` (``BT <= R // G`` tokens, ``G`` rows per token, ``R`` rows).
    fp32 inputs multiply in IEEE fp32 (:func:`_dot`).
    ``TMA``: key and value blocks arrive through tensor descriptors (no
    per-element addresses in registers). Union blocks that end before the
    tile's first token are masked per row (see the loop).
    ``V``: the values with inf and NaN read as 0; ``NONFINITE``: (the values
    as given (k's strides), ``[B, Hkv, T + 1]`` prefix counts of their rows
    holding inf or NaN (``ops.nonfinite_prefix``, (batch, head) strides
    ``sbad``)): after each branch's loop, its steps over such rows add them
    over the pairs the branch keeps (:func:`_add_nonfinite`), so a
    non-finite value reaches only the rows that see it."""
    BS: tl.constexpr = key_tile(LS)
    IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    BKW: tl.constexpr = 64  # window keys per step
    pid_t, b, hk, length, t0 = _program_tile(LENS, BT, 1)
    if t0 < length:
        start, r, t, g, valid, h, d, q_base, row_off, q = _query_tile(Q, STARTS, b, hk, t0, length, sq,
                                                                      G, G, BT, R, D, 1)
        bb = b.to(tl.int64)
        kbase = K + bb * sk[0] + hk.to(tl.int64) * sk[1] + start * sk[2]
        vbase = V + bb * sk[0] + hk.to(tl.int64) * sk[1] + start * sk[2]
        gate_off = bb * sg[0] + h * sg[1] + (start + t) * sg[2]
        lse_off = bb * slse[0] + h * slse[1] + (start + t) * slse[2]
        t_last = tl.minimum(t0 + BT, length) - 1
        VRAW, BADV = NONFINITE
        vraw = VRAW + bb * sk[0] + hk.to(tl.int64) * sk[1] + start * sk[2]
        bad = BADV + bb * sbad[0] + hk.to(tl.int64) * sbad[1] + start
        # Branches finish one after another so at most two [R, D] accumulators
        # are live: the running output and the branch in progress.
        out = tl.zeros([R, D], tl.float32)
        if GI_SLC >= 0:
            count, ubase, umbase, hit_row, kdesc, vdesc, n_whole = _union_setup(
                SEL, UNION, b, hk, pid_t, n_tiles, start, ss, t0, length, r, kbase, vbase, sk[2],
                G, G, BT, D, W, LS, BS, HEAD_SCORING, TMA, True)
            m = tl.full([R], float("-inf"), tl.float32)
            acc_l = tl.zeros([R], tl.float32)
            acc = tl.zeros([R, D], tl.float32)
            # Steps [0, n_whole) masked per row (_online_softmax_rows: no compare and
            # select per entry), then the rest per entry.
            # The next step's entry is loaded during this one (a step's key copies then
            # need not wait on its index): H200, 128K video, training forward, slc_win
            # 27.6 ms against 32.2 loading at the step.
            for masked in tl.static_range(2):
                ahead = _union_entry(ubase, umbase, n_whole if masked else 0, count)
                for it in range(n_whole if masked else 0, count if masked else n_whole):
                    kk, vv, mask, ahead = _union_step_loads(ubase, umbase, it, count, ahead, hit_row, t, valid, length,
                                                            kbase, kdesc, vbase, vdesc, sk[2], d, LS, BS, masked == 1,
                                                            TMA, True)
                    s = _dot(q, tl.trans(kk), IEEE)
                    if masked:
                        m, alpha, p = _online_softmax(m, tl.where(mask, s, float("-inf")), scale_log2)
                    else:
                        m, alpha, p = _online_softmax_rows(m, s, scale_log2, mask)
                    acc, acc_l = _accumulate(acc, acc_l, alpha, p, vv, IEEE)
            # Outside the loop: the steps over finite values keep the loop's code.
            if _nonfinite_rows(bad, 0, t_last + 1):
                for it in range(0, count):
                    j, bits = _union_entry(ubase, umbase, it, count)
                    _, _, limit, first_key = _union_block(j, bits, hit_row, t, valid, length, LS, BS)
                    if _nonfinite_rows(bad, first_key, tl.minimum(first_key + LS, length)):
                        # 16 keys at a time: the fewest registers a matrix product takes.
                        for c in range(0, BS, 16):
                            pos = first_key + c + tl.arange(0, 16)
                            rmask = (c + tl.arange(0, 16) < LS) & (pos < length)
                            kept = (pos[None, :] <= limit[:, None]) & rmask[None, :]
                            acc = _add_nonfinite(acc, kept, vraw, pos, rmask, sk[2], d)
            gate = tl.load(GATES + gate_off + GI_SLC * sg[3], mask=valid, other=0.0).to(tl.float32)
            out = _finish_branch(out, acc, acc_l, m, gate, valid, OS, LSES, q_base, row_off, lse_off, d, SAVE)
        if GI_WIN >= 0:
            lo = tl.maximum(t0 - WIN + 1, 0)
            kdesc_w = _sequence_desc(kbase, length, sk[2], BKW, D, TMA)
            vdesc_w = _sequence_desc(vbase, length, sk[2], BKW, D, TMA)
            m = tl.full([R], float("-inf"), tl.float32)
            acc_l = tl.zeros([R], tl.float32)
            acc = tl.zeros([R, D], tl.float32)
            for s0 in range(lo, t_last + 1, BKW):
                s_pos = s0 + tl.arange(0, BKW)
                kmask = s_pos <= t_last
                kk = _key_rows(kbase, kdesc_w, s0, s_pos, kmask, sk[2], d, TMA)
                vv = _key_rows(vbase, vdesc_w, s0, s_pos, kmask, sk[2], d, TMA)
                mask = valid[:, None] & (s_pos[None, :] <= t[:, None]) & (s_pos[None, :] > t[:, None] - WIN)
                s = tl.where(mask, _dot(q, tl.trans(kk), IEEE), float("-inf"))
                m, alpha, p = _online_softmax(m, s, scale_log2)
                acc, acc_l = _accumulate(acc, acc_l, alpha, p, vv, IEEE)
            if _nonfinite_rows(bad, lo, t_last + 1):
                for s0 in range(lo, t_last + 1, BKW):
                    if _nonfinite_rows(bad, s0, tl.minimum(s0 + BKW, t_last + 1)):
                        for c in range(0, BKW, 16):
                            pos = s0 + c + tl.arange(0, 16)
                            kept = valid[:, None] & (pos[None, :] <= t[:, None]) & (pos[None, :] > t[:, None] - WIN)
                            acc = _add_nonfinite(acc, kept, vraw, pos, pos <= t_last, sk[2], d)
            gate = tl.load(GATES + gate_off + GI_WIN * sg[3], mask=valid, other=0.0).to(tl.float32)
            out = _finish_branch(out, acc, acc_l, m, gate, valid, OW, LSEW, q_base, row_off, lse_off, d, SAVE)
        if GI_CMP >= 0:
            oc = tl.load(OC + q_base + row_off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            gc = tl.load(GATES + gate_off + GI_CMP * sg[3], mask=valid, other=0.0).to(tl.float32)
            out += gc[:, None] * oc
        tl.store(OUT + q_base + row_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=valid[:, None])
