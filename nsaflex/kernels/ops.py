"""Host side of the token-level NSA kernels: configuration, launches, autograd.

:func:`nsa_attention` runs the sparse branches of a pattern over sparse
sequences given either as ``[B, H, L, D]`` tensors (every row one sequence) or
packed ``[1, H, total, D]`` with ``starts = cu_seqlens[:-1]`` (the hybrid
vision-only mode), with compressed keys/values ``kc, vc`` computed by the
caller in torch (mean or MLP pooling; their gradients flow back through
autograd, so the MLP's parameters train).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
from torch.nn import functional as F
from triton.runtime.errors import OutOfResources, PTXASError

from nsaflex.kernels import backward as bwd
from nsaflex.kernels import forward as fwd
from nsaflex.errors import InputError
from nsaflex.inputs import nonfinite
from nsaflex.spec import Compression, Pattern, Selection


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1)."""
    return 1 << max(0, int(n).bit_length() - 1)


@dataclass(frozen=True)
class KernelConfig:
    """The constants the kernels specialise on, derived from one pattern
    (:func:`make_config`), and the one user choice, ``atomic``."""

    has_cmp: bool
    has_slc: bool
    has_win: bool
    gate_index: tuple[int, int, int]
    cblock: int = 1
    cstride: int = 1
    legacy: bool = False
    slc_block: int = 1
    count: int = 1
    first: bool = False
    prev: bool = False
    cur: bool = False
    head_scoring: bool = False
    nt: int = 16
    eq9_a: int = 1
    eq9_b: int = 1
    window: int = 1
    unit: int = 1  # queries per selection unit: m for query-block granularity, else 1
    current_candidate: bool = False  # the top-n ranks the own (partial) block too, scored by the caller (release)
    atomic: bool = False  # backward: fp32 atomics for the selection's dk, dv (the plan's deterministic=False)

    @property
    def list_width(self) -> int:
        """Slots of a token's block list: ``nt`` free ones, then the forced blocks'."""
        return self.nt + 4

    @property
    def slc_tile(self) -> int:
        """Key columns per selection step (:func:`forward.key_tile`; the row-tile kernels derive it likewise)."""
        return fwd.key_tile(self.slc_block)


@dataclass(frozen=True)
class Launch:
    """How the kernels are launched (:func:`launch_choices`): tile sizes,
    warps, pipeline stages and register caps (ptxas maxnreg; 0: none)."""

    select_tokens: int  # tokens of a slc_win_kernel / bwd_dq_kernel tile (before the 64-row bound of _Tiles)
    select_warps: int
    select_stages: int  # slc_win_kernel
    select_cap: int
    dq_stages: int
    lse_block: int  # compressed tokens per lse-pass step (a power of two, >= 16)
    lse_stages: int
    lse_cap: int
    score_tokens: int  # tokens of a score-pass tile
    score_warps: int  # the lse and the score pass
    score_stages: int
    score_cap: int
    dkv_stages: int  # bwd_cmp_dkv_kernel and bwd_win_dkv_kernel
    slc_dkv_stages: int
    topn_lane_scores: int  # topn_select_kernel: warps per row such that each lane holds this many scores
    topn_chain: int  # topn_select_kernel: consecutive tokens a row walks
    topn_spread: int  # their search's bracket around the previous threshold (float bits)
    topn_chunk: int  # tokens per query chunk of the block-score buffer
    topn_buffer_bytes: int  # the chunk shrinks so that the buffer stays under this


def launch_choices(head_dim: int, group: int) -> Launch:
    """The launch of one call from what decides it: the head dim (the widths
    of the [rows, D] tiles) and the GQA group (the rows per token).

    Tuned on Qwen2.5-VL's geometry (28/4 heads, D = 128, bf16); the figures
    beside each choice are H200 timings at 128K video tokens of the kernel
    the choice affects. Other geometries keep these values, and
    :func:`_launch` lowers a pipeline depth or drops a register cap that a
    kernel's resources cannot meet. The inference and the training forward
    launch slc_win_kernel alike: with each step's union entry loaded a step
    ahead, three stages uncapped won both (forward 38.7 ms against 41.0 with
    one stage under a cap of 128 registers)."""
    return Launch(
        # 64-row tiles (9 tokens x 7 heads for G = 7); rows packed densely over the group
        # ran bwd_dq 49.8 ms against 54.6 and slc_win 36.5 against 37.5 (8 x 8 rows, one idle).
        select_tokens=max(1, 64 // next_pow2(group)),
        select_warps=4,  # one warpgroup per 64-row tile
        select_stages=3,  # two 4-warp programs an SM (244 registers a thread uncapped): 37.1 ms against 40.1 with 2
        select_cap=0,  # a cap of 128 with one stage: forward 41.0 ms against 38.7 uncapped with three
        dq_stages=2,  # two programs an SM fit in shared memory: bwd_dq 52.9 ms against 65.3 with 3
        lse_block=64,  # 128 compressed tokens a step: 26.5 ms against 5.3
        lse_stages=2,  # 3.10 ms against 3.33 with 3
        # Two 8-warp programs an SM at 128 registers a thread (uncapped: 192, one program):
        # lse pass 5.57 ms against 6.82. A [128, 256] fp32 accumulator needs more than 128.
        lse_cap=128 if head_dim <= 128 else 0,
        score_tokens=16,  # 16 tokens x GP rows: the score pass's group sum stays inside 16-row slabs
        score_warps=8,
        score_stages=2,  # with descriptor loads: 3.17-3.45 ms against 3.44-3.54 with 3
        score_cap=128,  # as the lse pass (two programs an SM)
        dkv_stages=2,  # bwd_cmp_dkv 12.3 + bwd_win_dkv 4.0 ms against 14.9 + 5.7 with 3
        slc_dkv_stages=3,  # 2 stages measured the same (30.0 ms)
        topn_lane_scores=16,  # 4.92 ms against 5.42 (32), 7.15 (64), 6.14 (8)
        topn_chain=4,  # 4.71 ms against 4.83 (chain 1), 4.76 (chain 8)
        topn_spread=1 << 22,  # half a binade: a chain's next threshold lies inside it for most tokens
        topn_chunk=16384,  # a 16K chunk's buffer at 128K: 4 heads x 16K x 2K scores = 512 MiB
        topn_buffer_bytes=1 << 30,
    )


def unsupported_reason(pattern: Pattern) -> str | None:
    """Why the kernels cannot serve ``pattern`` (None when they can)."""
    sel = pattern.selection
    if sel is not None:
        if sel.block > 256:
            return f"selection.block = {sel.block} > 256 (one kv block must fit a register tile)"
        cfg = make_config(pattern)
        if cfg.nt > 128:
            return f"selection.count = {sel.count}: a block list keeps at most 128 free slots"
        if cfg.eq9_a * cfg.nt > 1024:
            return "compression.stride too small for selection.block (more than 1024 compressed tokens per score chunk)"
        return score_step_reason(cfg)
    return None


def score_step_reason(cfg: KernelConfig) -> str | None:
    """Why cmp_score_kernel cannot step over this selection's compressed tokens
    (None: it can): a step's ``l'/d x blocks`` tokens must be a power of two of
    at most 1024."""
    tokens = cfg.eq9_a * _score_blocks(cfg)
    if tokens & (tokens - 1):
        return f"selection.block / compression.stride = {cfg.eq9_a} is not a power of two (the score pass steps over " \
               "a power of two of compressed tokens)"
    if tokens > 1024:
        return "compression.stride too small for selection.block (more than 1024 compressed tokens per score step)"
    return None


def make_config(pattern: Pattern, **overrides) -> KernelConfig:
    branches = pattern.branches
    index = tuple(branches.index(b) if b in branches else 0 for b in ("compression", "selection", "window"))
    kw: dict = {"has_cmp": "compression" in branches, "has_slc": "selection" in branches, "has_win": "window" in branches, "gate_index": index}
    if pattern.compression is not None:
        c = pattern.compression
        kw.update(cblock=c.block, cstride=c.stride, legacy=c.visibility == "videonsa_legacy")
    if pattern.selection is not None:
        kw.update(_selection_fields(pattern.compression, pattern.selection))
    if pattern.window is not None:
        kw["window"] = pattern.window.size
    kw.update(overrides)
    return KernelConfig(**kw)


def _selection_fields(c: Compression, s: Selection) -> dict:
    """The KernelConfig fields of a selection over compression ``c``."""
    a, b = s.block // c.stride, c.block // c.stride
    min_forced = 1 if ("first" in s.forced or "current" in s.forced) else 0
    nt = max(16, next_pow2(max(1, s.count - min_forced)))
    while a * nt < a + b - 2:
        nt *= 2
    return dict(slc_block=s.block, count=s.count, first="first" in s.forced, prev="previous" in s.forced,
                cur="current" in s.forced, head_scoring=s.scoring == "head", nt=nt, eq9_a=a, eq9_b=b,
                unit=s.query_block if s.granularity == "query_block" else 1)


def scoring_config(compression: Compression, selection: Selection) -> KernelConfig:
    """The KernelConfig of the scoring kernels alone (compression and selection
    branches; what :func:`nsaflex.scoring.select` launches for the flex backend)."""
    return KernelConfig(has_cmp=True, has_slc=True, has_win=False, gate_index=(0, 1, 2), cblock=compression.block,
                        cstride=compression.stride, legacy=compression.visibility == "videonsa_legacy",
                        **_selection_fields(compression, selection))


@dataclass
class SeqLayout:
    """Sequences inside the tensors handed to the kernels."""

    starts: torch.Tensor  # [B] int32: first row of each sequence (0 unless packed)
    lens: torch.Tensor  # [B] int32
    cstarts: torch.Tensor  # [B] int32: first compressed row
    clens: torch.Tensor  # [B] int32
    max_len: int
    max_cmp: int
    packed: bool
    min_cmp: int = 0  # the fewest compressed tokens of any sequence (host int)
    # False where a sequence may end before its rows do (rows padded in place, not packed): the
    # kernels write no gradient there, so the backward's buffers start as zeros.
    full_rows: bool = True

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """[B, 4] int32: starts, lens, cstarts, clens side by side, one kernel
        argument for the four (``forward._seq_field`` reads it); zeros for the
        compressed rows of a layout without them."""
        fields = [x if x is not None else torch.zeros_like(self.lens) for x in (self.starts, self.lens, self.cstarts, self.clens)]
        return torch.stack(fields, dim=1).to(torch.int32).contiguous()

    @property
    def batch(self) -> int:
        return self.lens.shape[0]

    def strides(self, x: torch.Tensor | None, dims: int = 3) -> tuple[int, ...]:
        """The kernels' stride tuple of a ``[B, H, T, ...]`` tensor in this
        layout: its first ``dims`` strides (batch, head, token, and for the
        gates ``[B, H, T, branches]`` their column: ``dims = 4``), the batch
        stride 0 when packed (every sequence lives in row 0, found by its
        ``starts``). ``x`` None (a tensor the pattern does not make): zeros."""
        if x is None:
            return (0,) * dims
        return _layout_strides(x, self.packed, dims)


def _layout_strides(x: torch.Tensor, packed: bool, dims: int) -> tuple[int, ...]:
    """:meth:`SeqLayout.strides` of a layout that is ``packed`` or not."""
    return (0 if packed else x.stride(0),) + tuple(x.stride(i) for i in range(1, dims))


def _qs(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of ``x`` (:meth:`SeqLayout.strides`)."""
    return _layout_strides(x, packed, 3)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether a kernel's key/value loads may go through tensor descriptors
    (bulk copies, Hopper's TMA) instead of one address per element: every
    tensor's base and leading strides 16-byte aligned with a contiguous last
    dimension of at least 16 bytes (what a descriptor requires; a kernel reads
    each sequence from ``base + row offsets``, so the row offsets inherit the
    alignment from the strides). H200, 128K video: forward 46.7 ms and
    forward+backward 154.9 with descriptors against 55.1 and 162.8 without."""
    for x in tensors:
        size = x.element_size()
        if x.stride(-1) != 1 or x.shape[-1] * size < 16 or x.data_ptr() % 16:
            return False
        if any((stride * size) % 16 for stride in x.stride()[:-1]):
            return False
    return True


@contextlib.contextmanager
def descriptor_workspace(device: torch.device | None) -> Iterator[None]:
    """Global memory for the tensor descriptors a kernel creates (Triton asks
    its allocator at launch), from torch's caching allocator on ``device``
    (None: nothing to install). Installed only around nsaflex's own launches:
    the caller's allocator is restored after."""
    if device is None:
        yield
        return
    from triton.runtime import _allocation

    def allocate(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    # triton.set_allocator sets this ContextVar (triton 3.6 and 3.9) and offers no reset.
    token = _allocation._allocator.set(allocate)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def nonfinite_prefix(values: torch.Tensor) -> torch.Tensor:
    """``[B, H, T + 1]`` int32 exclusive prefix counts of the rows of ``values
    [B, H, T, D]`` that hold inf or NaN: entry ``i`` counts the rows ``< i``,
    so rows ``[a, b)`` hold one where entries ``a`` and ``b`` differ. The
    kernels find the steps that need their non-finite values added by it
    (``forward._nonfinite_rows``), with no host read. A row is tested by its
    float32 sum (no bool tensor of ``values``' size): a finite row whose sum
    overflows only takes that step, which adds nothing."""
    bad = nonfinite(values.sum(dim=-1, dtype=torch.float32))
    return torch.nn.functional.pad(bad.cumsum(dim=-1, dtype=torch.int32), (1, 0))


def finite_values(values: torch.Tensor) -> torch.Tensor:
    """``values`` with inf and NaN read as 0, in ``values``' strides (the
    kernels address it with them): what the attention loops multiply by the
    probabilities, so that a masked probability 0 never meets an inf
    (``0 * inf = NaN``); the non-finite values are added over the kept pairs
    apart (``forward._add_nonfinite``)."""
    out = torch.empty_strided(values.shape, values.stride(), dtype=values.dtype, device=values.device)
    return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0, out=out)


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32


# Launch options that fitted, per kernel specialisation and device: later
# launches start from the pipeline depth and register cap that worked instead
# of failing again.
_FITTED: dict = {}


def _launch(kernel, grid, *args, num_stages: int, maxnreg: int | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``num_stages`` pipeline stages, or
    fewer when that depth needs more shared memory than the GPU has (the score
    kernel for 256-key selection blocks over stride-2 compression asked for
    233,472 bytes with 3 stages on an H200, 1 KB over). Triton raises
    ``OutOfResources`` at the first launch of a specialisation that does not
    fit; the next shallower depth is compiled and tried.

    A register cap per thread (``maxnreg``; None or 0: none) is a speed choice:
    where ptxas cannot compile the kernel under it (``PTXASError``, e.g. a
    [128, 256] fp32 accumulator already needs 128 registers a thread), the
    kernel is compiled without it."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = str(first.device) if first is not None else ""
    key = (getattr(kernel, "__name__", repr(kernel)), device, num_stages, maxnreg, tuple(sorted(kwargs.items())))
    stages, cap = _FITTED.get(key, (num_stages, maxnreg or None))
    # A kernel that makes tensor descriptors (TMA=True) needs their workspace.
    workspace = first.device if kwargs.get("TMA") and first is not None and first.is_cuda else None
    with descriptor_workspace(workspace):
        while True:
            try:
                kernel[grid](*args, num_stages=stages, **kwargs, **({} if cap is None else {"maxnreg": cap}))
                break
            except OutOfResources:
                if stages <= 1:
                    raise
                stages -= 1
            except PTXASError:
                if cap is None:
                    raise
                cap = None
    _FITTED[key] = (stages, cap)


class _Tiles:
    """Tile sizes of one launch. The selection kernel and ``bwd_dq`` run ``rows_sel``
    matrix rows (a power of two) holding ``bt_sel = rows_sel // G`` tokens, the
    group's heads packed densely (:func:`forward._tile_rows`); for query blocks of
    m queries, the largest divisor of m up to that, so no tile spans two."""

    def __init__(self, cfg: KernelConfig, launch: Launch, group: int):
        self.G = group
        self.GP = next_pow2(group)
        # A union's row masks have 64 bits: at most 64 selecting rows per tile (tokens,
        # or token-head rows for head scoring), whatever select_tokens asks; and a
        # tile's rows (base x GP) are a power of two.
        most = max(1, 64 // self.GP if cfg.head_scoring else 64 * group // self.GP)
        base = prev_pow2(min(max(launch.select_tokens, -(-16 // self.GP)), most))
        self.rows_sel = base * self.GP
        self.bt_sel = self.rows_sel // group
        if cfg.unit > 1:
            # A tile inside one tile of m queries runs that tile's one block list: a tile
            # spanning two (9 tokens over m = 8) runs the union of both lists.
            self.bt_sel = max(t for t in range(1, self.bt_sel + 1) if cfg.unit % t == 0)
        self.bt_score = max(launch.score_tokens, -(-16 // self.GP))
        # Score-pass program: bt_score tokens, or one selection unit of more (query blocks).
        self.tp_score = fwd.unit_tile_tokens(self.bt_score, cfg.unit)
        # The lse pass has no per-token group sum, so it packs its rows as the selection kernel does.
        self.rows_lse = self.bt_score * self.GP
        self.bt_lse = self.rows_lse // group
        # The dk, dv kernels keep GP rows per token: packed densely they ran 7-12 %
        # slower (H200, 128K video) although they take 11 % fewer steps.
        self.bt_kv = max(64 // self.GP, -(-16 // self.GP))
        self.width = cfg.list_width
        self.sel_rows = self.bt_sel * group if cfg.head_scoring else self.bt_sel

    def union_log(self, sel_rows: int) -> int:
        """:func:`forward.union_log` at this launch's list width (the kernels derive it likewise)."""
        return fwd.union_log(sel_rows, self.width)

    @staticmethod
    def row_log(sel_rows: int) -> int:
        """:func:`forward.row_log`."""
        return fwd.row_log(sel_rows)

    def union_buffers(self, programs: int, sel_rows: int, max_len: int, slc_block: int,
                      device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scratch for the union lists of ``programs`` row tiles (``_tile_union``
        writes them), the lists' row masks (one bit per selecting row: int32 up
        to 32 rows, else int64) and their counts."""
        if (max_len // slc_block + 2) << self.row_log(sel_rows) >= 2**31:
            raise InputError("q", f"at most {(2**31 >> self.row_log(sel_rows)) - 2} selection blocks per sequence "
                             "for the triton backend's union keys", f"{max_len} tokens in blocks of {slc_block}")
        cap = 1 << self.union_log(sel_rows)
        lists = torch.empty((programs, cap), dtype=torch.int32, device=device)
        masks = torch.empty((programs, cap), dtype=torch.int32 if sel_rows <= 32 else torch.int64, device=device)
        return lists, masks, torch.zeros((programs,), dtype=torch.int32, device=device)


# Dictionaries that receive each forward's residuals (see record_forward).
_RECORDERS: list[dict] = []


@contextlib.contextmanager
def record_forward() -> Iterator[dict]:
    """Collect what the forward kernels keep (``sel``: the block lists per token,
    etc.) for tests and benchmarks: ``with record_forward() as seen: attn(...)``."""
    seen: dict = {}
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


def _forward(q, k, v, kc, vc, gates, lay: SeqLayout, cfg: KernelConfig, launch: Launch, save: bool,
             select: Callable[[torch.Tensor], torch.Tensor] | None = None):
    Bv, Hq, Tv, D = q.shape
    Hkv = k.shape[1]
    tiles = _Tiles(cfg, launch, Hq // Hkv)
    G, GP = tiles.G, tiles.GP
    B = lay.batch
    dev = q.device
    scale = 1.0 / math.sqrt(D)
    scale_log2 = scale * 1.4426950408889634
    ieee = _ieee(q)
    P = lay.packed
    out = torch.empty_like(q)
    lse_shape = (Bv, Hq, Tv)
    res: dict = {"tiles": tiles, "launch": launch}
    oc = lse_c = sel = None
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    # The attention loops read the values with inf and NaN as 0, so that a masked
    # probability 0 never multiplies one; the kernels add them over the kept pairs apart.
    v_finite = finite_values(v)
    vc_finite = bad_vc = None
    if cfg.has_cmp and lay.max_cmp > 0:
        vc_finite, bad_vc = finite_values(vc), nonfinite_prefix(vc)
    if cfg.has_cmp:
        lse_c = torch.empty(lse_shape, dtype=torch.float32, device=dev)
        # Branch outputs are kept in q's dtype: the backward corrects the estimate
        # rowsum(dO * O_b) they give to fp32 as it goes (bwd.bwd_dq_kernel).
        oc = torch.empty_like(q)
        if lay.max_cmp > 0:
            compression_lse(q, kc, vc, lse_c, oc, lay, cfg, launch, tiles, vc_finite=vc_finite, bad_vc=bad_vc)
        else:
            lse_c.zero_()
            oc.zero_()
        if cfg.has_slc:
            hs = Hq if cfg.head_scoring else Hkv
            if select is not None:
                sel = _given_selection(select(lse_c), (Bv, hs, Tv), tiles.width)
            else:
                sel = torch.empty((Bv, hs, Tv, tiles.width), dtype=torch.int32, device=dev)

                def score(t_off: int, t_end: int, buf: torch.Tensor) -> None:
                    block_scores(q, kc, lse_c, buf, lay, cfg, launch, tiles, t_off, t_end)

                _chunked_topn(score, sel, lay, cfg, launch, tiles, hs, res)
    n_t3 = triton.cdiv(lay.max_len, tiles.bt_sel)
    grid3 = (n_t3, B, Hkv)
    if cfg.has_slc:
        U, UM, UC = tiles.union_buffers(B * Hkv * n_t3, tiles.sel_rows, lay.max_len, cfg.slc_block, dev)
    else:
        U = UM = UC = dummy_i
    o_s = torch.empty_like(q) if (save and cfg.has_slc) else None
    o_w = torch.empty_like(q) if (save and cfg.has_win) else None
    lse_s = torch.empty(lse_shape, dtype=torch.float32, device=dev) if (save and cfg.has_slc) else None
    lse_w = torch.empty(lse_shape, dtype=torch.float32, device=dev) if (save and cfg.has_win) else None
    lse_like = lse_c if lse_c is not None else (lse_s if lse_s is not None else (lse_w if lse_w is not None else torch.empty(lse_shape, dtype=torch.float32, device=dev)))
    sel_ = sel if sel is not None else dummy_i
    bad_v = nonfinite_prefix(v)
    _launch(fwd.slc_win_kernel, grid3,
        q, k, v_finite, oc if oc is not None else q, gates, sel_, (U, UM, UC), out,
        o_s if o_s is not None else out, o_w if o_w is not None else out,
        lse_s if lse_s is not None else dummy_f, lse_w if lse_w is not None else dummy_f,
        lay.starts, lay.lens, (v, bad_v),
        lay.strides(q), lay.strides(k), lay.strides(gates, 4), lay.strides(sel), lay.strides(lse_like),
        lay.strides(bad_v, 2),
        scale_log2, n_t3,
        G=G, R=tiles.rows_sel, BT=tiles.bt_sel, D=D, **_gate_columns(cfg),
        LS=cfg.slc_block, W=tiles.width, HEAD_SCORING=cfg.head_scoring,
        WIN=cfg.window, SAVE=save, TMA=tma_ready(k, v_finite),
        num_warps=launch.select_warps, num_stages=launch.select_stages, maxnreg=launch.select_cap,
    )
    res.update(oc=oc, lse_c=lse_c, sel=sel, U=U, UM=UM, UC=UC, o_s=o_s, o_w=o_w, lse_s=lse_s, lse_w=lse_w,
               v_finite=v_finite, vc_finite=vc_finite, bad_v=bad_v, bad_vc=bad_vc)
    for seen in _RECORDERS:
        seen.update(res)
    return out, res


def compression_lse(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor | None, lse: torch.Tensor,
                    oc: torch.Tensor | None, lay: SeqLayout, cfg: KernelConfig, launch: Launch, tiles: "_Tiles",
                    scale_log2: float | None = None, vc_finite: torch.Tensor | None = None,
                    bad_vc: torch.Tensor | None = None) -> None:
    """cmp_lse_kernel: the base-2 log-sum-exp of every row of ``q`` over its
    visible compressed keys ``kc`` into ``lse [B, Hq, T]`` and, where ``vc``
    is given, the compression output into ``oc`` (q's layout); ``vc`` None:
    the log-sum-exp alone (the flex backend's scoring). ``lay.max_cmp > 0``;
    ``scale_log2``: ``log2(e) / sqrt(D)`` (None: from q's head dim).
    ``vc_finite``, ``bad_vc``: :func:`finite_values` and
    :func:`nonfinite_prefix` of ``vc`` where the caller has them (None: made here)."""
    B, Hkv, D = lay.batch, kc.shape[1], q.shape[-1]
    output = vc is not None
    # A descriptor cannot be empty: every sequence needs a compressed token.
    vc_finite = finite_values(vc) if output and vc_finite is None else vc_finite
    bad_vc = nonfinite_prefix(vc) if output and bad_vc is None else bad_vc
    tma = lay.min_cmp > 0 and (tma_ready(kc, vc_finite) if output else tma_ready(kc))
    _launch(fwd.cmp_lse_kernel, (triton.cdiv(lay.max_len, tiles.bt_lse), B, Hkv),
        q, kc, vc_finite if output else kc, lse, oc if output else lse, lay.table,
        (vc, bad_vc) if output else (kc, lse),  # not read without the output
        *_qs(q, lay.packed), *_qs(kc, lay.packed), *_qs(lse, lay.packed),
        _layout_strides(bad_vc, lay.packed, 2) if output else (0, 0),
        _scale_log2(D) if scale_log2 is None else scale_log2,
        G=tiles.G, GR=tiles.G, BT=tiles.bt_lse, R=tiles.rows_lse, BN=launch.lse_block, D=D, CBLOCK=cfg.cblock,
        CSTRIDE=cfg.cstride, LEGACY=cfg.legacy, IEEE=_ieee(q), TMA=tma, OUTPUT=output,
        num_warps=launch.score_warps, num_stages=launch.lse_stages, maxnreg=launch.lse_cap,
    )


def block_scores(q: torch.Tensor, kc: torch.Tensor | None, lse: torch.Tensor, buf: torch.Tensor, lay: SeqLayout,
                 cfg: KernelConfig, launch: Launch, tiles: "_Tiles", t_off: int, t_end: int,
                 scale_log2: float | None = None) -> None:
    """cmp_score_kernel for the queries ``[t_off, t_end)`` of every sequence
    (``t_off`` a multiple of ``tiles.tp_score``): the Eq. 9 block scores of
    each selection unit (a query, or a tile of ``cfg.unit`` queries), summed
    over the group's heads for group scoring, into ``buf [B, Hsel, unit -
    t_off / unit, >= t_end / l']`` (candidates only; forced candidates -1).
    ``scale_log2``: ``log2(e) / sqrt(D)`` (None: from q's head dim)."""
    B, D = lay.batch, q.shape[-1]
    Hkv = kc.shape[1] if kc is not None else q.shape[1] // tiles.G
    # The score loop reads compressed rows even where a sequence has none (its
    # steps also write block scores), and a descriptor cannot be empty.
    kc_ = kc if lay.max_cmp > 0 else q  # any valid pointer; no compressed token is read
    tma = lay.min_cmp > 0 and tma_ready(kc)
    nt = _score_blocks(cfg)
    P = lay.packed
    _launch(fwd.cmp_score_kernel, (triton.cdiv(t_end - t_off, tiles.tp_score), B, Hkv),
        q, kc_, lse, buf, lay.table,
        *_qs(q, P), *_qs(kc_, P), *_qs(lse, P), *buf.stride()[:3], _scale_log2(D) if scale_log2 is None else scale_log2,
        t_off, t_end,
        G=tiles.G, GP=tiles.GP, BT=tiles.bt_score, D=D, CBLOCK=cfg.cblock, CSTRIDE=cfg.cstride, LEGACY=cfg.legacy,
        IEEE=_ieee(q), BN=cfg.eq9_a * nt, LS=cfg.slc_block, FIRST=cfg.first, PREV=cfg.prev, CUR=cfg.cur,
        HEAD_SCORING=cfg.head_scoring, NT=nt, A=cfg.eq9_a, BB=cfg.eq9_b, TMA=tma, UNIT=cfg.unit,
        num_warps=launch.score_warps, num_stages=launch.score_stages, maxnreg=launch.score_cap,
    )


def _scale_log2(head_dim: int) -> float:
    """``log2(e) / sqrt(D)``: softmax scale of the base-2 kernels."""
    return (1.0 / math.sqrt(head_dim)) * 1.4426950408889634


def _gate_columns(cfg: KernelConfig) -> dict[str, int]:
    """The row-tile kernels' ``GI_CMP``, ``GI_SLC``, ``GI_WIN``: each branch's
    gate column, -1 for a branch the pattern lacks (the kernels read the
    branch's presence from it)."""
    present = (cfg.has_cmp, cfg.has_slc, cfg.has_win)
    return {name: (column if has else -1)
            for name, column, has in zip(("GI_CMP", "GI_SLC", "GI_WIN"), cfg.gate_index, present)}


def _score_blocks(cfg: KernelConfig) -> int:
    """Blocks per step of the score loop: about 64 compressed tokens (the lse
    pass's step), a power of two, long enough that the Eq. 9 carry reaches
    only the next step."""
    nb = next_pow2(max(1, 64 // cfg.eq9_a))
    while cfg.eq9_a * nb < cfg.eq9_a + cfg.eq9_b - 2:
        nb *= 2
    return nb


def topn_chunk_tokens(cfg: KernelConfig, launch: Launch, batch: int, n_sel_heads: int, max_len: int,
                      score_tokens: int) -> tuple[int, int]:
    """(query-chunk length, buffer row width) of the two-step top-n: a
    multiple of ``score_tokens`` (a score-pass program's tokens) holding up to
    ``launch.topn_chunk`` buffer rows (selection units: queries, or tiles of
    ``cfg.unit`` queries) within the buffer's byte bound."""
    width = max(1, triton.cdiv(max_len, cfg.slc_block) if cfg.current_candidate else max_len // cfg.slc_block)
    rows = min(launch.topn_chunk, launch.topn_buffer_bytes // max(1, batch * n_sel_heads * width * 4))
    chunk = rows * cfg.unit
    chunk = max(score_tokens, chunk // score_tokens * score_tokens)
    return min(chunk, triton.cdiv(max_len, score_tokens) * score_tokens), width


def topn_row_parts(least: int, most: int) -> tuple[int, int]:
    """(head, tail) widths in which topn_select_kernel holds a chunk's rows of
    ``least`` to ``most`` candidate blocks: powers of two with head + tail >=
    most (tail 0: one part), the head the largest power of two not above
    ``least`` where two parts are narrower than ``next_pow2(most)``. E.g.
    1,024-1,280 candidates: 1,024 + 256 instead of 2,048. H200, 128K video:
    the kernel ~5 % faster (0.742-0.762 of the lse pass, against 0.782-0.804)."""
    width = next_pow2(max(1, most))
    head = prev_pow2(max(1, least))
    if head >= most:
        return width, 0
    tail = next_pow2(most - head)
    return (head, tail) if head + tail < width else (width, 0)


def _chunked_topn(score, sel, lay: SeqLayout, cfg: KernelConfig, launch: Launch, tiles: "_Tiles", n_sel_heads: int,
                  res: dict) -> None:
    """Two-step top-n over query chunks: cmp_score_kernel writes the chunk's
    block scores (``[B, Hsel, units, t_end / l']``, never all of ``[L, L/l']``
    at once; a unit is a query, or a tile of ``cfg.unit`` queries), then
    topn_select_kernel ranks each unit once and writes its block list to the
    unit's queries' rows of ``sel``."""
    B = lay.batch
    unit = cfg.unit
    chunk, width = topn_chunk_tokens(cfg, launch, B, n_sel_heads, lay.max_len, tiles.tp_score)
    flat = torch.empty(B * n_sel_heads * triton.cdiv(chunk, unit) * width, dtype=torch.float32, device=sel.device)
    res["topn_chunk"] = chunk
    ss = _qs(sel, lay.packed)
    for t_off in range(0, lay.max_len, chunk):
        t_end = min(lay.max_len, t_off + chunk)
        units = triton.cdiv(t_end - t_off, unit)
        jw = max(1, t_end // cfg.slc_block)  # candidates of tokens < t_end
        least = (t_off + 1) // cfg.slc_block
        if cfg.current_candidate:  # and each token's own block
            jw, least = triton.cdiv(t_end, cfg.slc_block), t_off // cfg.slc_block + 1
        buf = flat[: B * n_sel_heads * units * jw].view(B, n_sel_heads, units, jw)
        score(t_off, t_end, buf)
        jp = next_pow2(jw)
        rows = max(1, min(8, 1024 // jp))
        head, tail = topn_row_parts(least, jw)
        fwd.topn_select_kernel[(triton.cdiv(units, rows * launch.topn_chain), n_sel_heads, B)](
            buf, sel, lay.starts, lay.lens, *buf.stride()[:3], *ss, t_off, t_end,
            ROWS=rows, JP=head, CHAIN=launch.topn_chain, SPREAD=launch.topn_spread, LS=cfg.slc_block,
            COUNT=cfg.count, FIRST=cfg.first, PREV=cfg.prev, CUR=cfg.cur, NT=cfg.nt, JT=max(1, tail), TAIL=tail > 0,
            UNIT=unit, CURRENT=cfg.current_candidate, num_warps=max(1, min(8, jp // (32 * launch.topn_lane_scores))),
        )


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere, e.g. the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cmp_dkv_splits(max_len: int, programs_per_split: int, device: torch.device) -> int:
    """Query splits of bwd_cmp_dkv_kernel: one per 4,096 queries (at most 32),
    and more where its (compressed tiles x batch x kv heads) programs would
    leave SMs idle: about four programs per SM, down to 512 queries a split.
    At 16K (4 compressed tiles x 4 kv heads) one split per 4,096 queries made 64
    programs for the H200's 132 SMs: 1.16 ms for four products over the scores
    that the forward's lse pass covers with one in 0.12 ms."""
    splits = max(1, min(32, triton.cdiv(max_len, 4096)))
    fill = triton.cdiv(4 * _multiprocessors(device), max(1, programs_per_split))
    return max(splits, min(fill, max(1, triton.cdiv(max_len, 512))))


def _inverted_index(sel: torch.Tensor, lay: SeqLayout, cfg: KernelConfig, group: int, n_kv: int, n_blocks: int, seg_len: int):
    """Segments of the (block -> selecting entries) index, in key order, built
    without a host synchronisation: every shape is fixed by ``sel``'s shape.

    key = (sequence * Hkv + kv head) * n_blocks + block, for each of the
    ``nkeys`` blocks; the entries (tokens, or token * G + head for head scoring)
    that selected a key are a run of the key-sorted entries, cut into segments of
    at most ``seg_len``. There are at most ``nkeys + ceil(slots / seg_len)``
    segments (``slots`` = sel.numel()); the segments past the real count are
    empty (start = end) and their programs do nothing.

    Returns (entries, segment keys, segment starts, segment ends, first segment
    of each key ``[nkeys + 1]``), or None when ``sel`` has no slots.
    """
    dev = sel.device
    Bv, HS, Tv, W = sel.shape
    slots = sel.numel()
    if slots == 0:
        return None
    nkeys = lay.batch * n_kv * n_blocks
    p = torch.arange(Tv, device=dev).view(1, 1, Tv, 1)
    hs = torch.arange(HS, device=dev).view(1, HS, 1, 1)
    if lay.packed:
        seq = torch.repeat_interleave(torch.arange(lay.batch, device=dev), lay.lens.long(), output_size=Tv)
        t = p - lay.starts.long()[seq].view(1, 1, Tv, 1)
        seq = seq.view(1, 1, Tv, 1)
        listed = sel >= 0
    else:
        # Rows outside a sequence (before its start or past its end, rows as the model
        # laid them out) hold no list: the top-n never wrote them.
        seq = torch.arange(Bv, device=dev).view(Bv, 1, 1, 1)
        t = p - lay.starts.long().view(Bv, 1, 1, 1)
        listed = (sel >= 0) & (t >= 0) & (t < lay.lens.long().view(Bv, 1, 1, 1))
    if cfg.head_scoring:
        hk, ent = hs // group, t * group + hs % group
    else:
        hk, ent = hs, t
    # Empty slots get key nkeys, past every block: they sort last and belong to no segment.
    key_dtype = torch.int32 if nkeys < 2**31 - 1 else torch.int64
    key = torch.where(listed, (seq * n_kv + hk) * n_blocks + sel.long(), nkeys).to(key_dtype).flatten()
    key, order = torch.sort(key, stable=True)
    ent = ent.expand(Bv, HS, Tv, W).flatten()[order].to(torch.int32).contiguous()
    # Key j's run is [bounds[j], bounds[j + 1]); bounds[nkeys] counts the filled slots.
    bounds = torch.searchsorted(key, torch.arange(nkeys + 1, device=dev, dtype=key_dtype))
    first, end = bounds[:-1], bounds[1:]
    nseg = (end - first + seg_len - 1) // seg_len
    key_seg = F.pad(torch.cumsum(nseg, 0), (1, 0))
    max_segments = nkeys + -(-slots // seg_len)
    segment = torch.arange(max_segments, device=dev)
    owner = (torch.searchsorted(key_seg[1:], segment, right=True)).clamp_max(nkeys - 1)
    seg_start = first[owner] + (segment - key_seg[owner]) * seg_len
    seg_end = torch.minimum(seg_start + seg_len, end[owner])
    past = segment >= key_seg[-1]
    seg_start = torch.where(past, 0, seg_start)
    seg_end = torch.where(past, 0, seg_end)
    return ent, owner.contiguous(), seg_start.contiguous(), seg_end.contiguous(), key_seg.contiguous()


def _backward(do, q, k, v, kc, vc, gates, lay: SeqLayout, cfg: KernelConfig, res: dict, need_gates: bool):
    Bv, Hq, Tv, D = q.shape
    Hkv = k.shape[1]
    tiles: _Tiles = res["tiles"]
    launch: Launch = res["launch"]
    G = tiles.G
    B = lay.batch
    dev = q.device
    scale = 1.0 / math.sqrt(D)
    scale_log2 = scale * 1.4426950408889634
    ieee = _ieee(q)
    # dO, dq and the outputs take q's strides in the kernels, dk and dv k's (nsa_attention).
    if not _same_strides(do, q):
        do = torch.empty_like(q).copy_(do)
    nb = gates.shape[-1]
    fresh = torch.empty if lay.full_rows else torch.zeros
    fresh_like = torch.empty_like if lay.full_rows else torch.zeros_like
    dq = fresh_like(q)
    dg = fresh((Bv, Hq, Tv, nb), dtype=torch.float32, device=dev)
    delta = torch.empty((3, Bv, Hq, Tv), dtype=torch.float32, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    n_tq = triton.cdiv(lay.max_len, tiles.bt_sel)
    oc, lse_c, sel = res["oc"], res["lse_c"], res["sel"]
    any_lse = delta[0]
    # The loops read the values as the forward's did: inf and NaN as 0.
    v_finite, bad_v = res["v_finite"], res["bad_v"]
    kc_ = kc if (kc is not None and lay.max_cmp > 0) else k
    vc_ = res["vc_finite"] if (vc is not None and lay.max_cmp > 0) else v_finite
    bad_vc = res["bad_vc"] if (vc is not None and lay.max_cmp > 0) else bad_v
    branch_out = tuple(x if x is not None else q for x in (oc, res["o_s"], res["o_w"]))
    branch_lse = tuple(x if x is not None else any_lse for x in (lse_c, res["lse_s"], res["lse_w"]))
    kc_mean, k_mean = _mean_key(kc_, lay.max_cmp > 0), _mean_key(k, cfg.has_win or cfg.has_slc)
    _launch(bwd.bwd_dq_kernel, (n_tq, B, Hkv),
        q, k, v_finite, kc_, vc_, do, gates, branch_out, branch_lse,
        (kc_mean, k_mean, _layout_strides(k_mean, lay.packed, 2)),
        sel if sel is not None else dummy_i, (res["U"], res["UM"], res["UC"]), dq, dg, (delta, delta.stride(0)),
        lay.table,
        lay.strides(q), lay.strides(k), lay.strides(kc_), lay.strides(gates, 4), lay.strides(dg), lay.strides(sel),
        lay.strides(any_lse),
        (scale_log2, scale), (bad_v, bad_vc, lay.strides(bad_v, 2), lay.strides(bad_vc, 2)),
        G=G, R=tiles.rows_sel, BT=tiles.bt_sel, D=D, **_gate_columns(cfg),
        CBLOCK=cfg.cblock, CSTRIDE=cfg.cstride, LEGACY=cfg.legacy,
        LS=cfg.slc_block, W=tiles.width, HEAD_SCORING=cfg.head_scoring, WIN=cfg.window,
        TMA=tma_ready(k, v_finite, kc_, vc_), num_warps=launch.select_warps, num_stages=launch.dq_stages,
    )
    dkc = dvc = None
    if cfg.has_cmp and kc is not None and lay.max_cmp > 0:
        BNC = 64
        nsplit = _cmp_dkv_splits(lay.max_len, triton.cdiv(lay.max_cmp, BNC) * B * Hkv, dev)
        dkp = fresh((nsplit,) + tuple(kc.shape), dtype=torch.float32, device=dev)
        dvp = fresh(dkp.shape, dtype=torch.float32, device=dev)
        _launch(bwd.bwd_cmp_dkv_kernel, (triton.cdiv(lay.max_cmp, BNC), nsplit, B * Hkv),
            q, kc, vc_, do, gates, lse_c, delta[0], dkp, dvp, lay.starts, lay.lens, lay.cstarts, lay.clens,
            lay.strides(q), lay.strides(kc), lay.strides(gates, 4), lay.strides(any_lse), dkp.stride(0),
            scale_log2, scale, Hkv,
            G=G, GP=tiles.GP, BT=tiles.bt_kv, D=D, IEEE=ieee, GI_CMP=cfg.gate_index[0],
            CBLOCK=cfg.cblock, CSTRIDE=cfg.cstride, LEGACY=cfg.legacy, BNC=BNC,
            num_stages=launch.dkv_stages,
        )
        dkc = dkp.sum(0).to(kc.dtype)
        dvc = dvp.sum(0).to(vc.dtype)
    elif kc is not None:
        dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
    dk = dv = None
    if cfg.has_win or cfg.has_slc:
        alloc = fresh_like if cfg.has_win else torch.zeros_like
        dk = alloc(k, dtype=torch.float32)
        dv = alloc(k, dtype=torch.float32)
    if cfg.has_win:
        BK = 64
        _launch(bwd.bwd_win_dkv_kernel, (triton.cdiv(lay.max_len, BK), B, Hkv),
            q, k, v_finite, do, gates, res["lse_w"], delta[2], dk, dv, lay.starts, lay.lens,
            lay.strides(q), lay.strides(k), lay.strides(gates, 4), lay.strides(any_lse), scale_log2, scale,
            G=G, GP=tiles.GP, BT=tiles.bt_kv, D=D, IEEE=ieee, GI_WIN=cfg.gate_index[2], WIN=cfg.window, BK=BK,
            num_stages=launch.dkv_stages,
        )
    if cfg.has_slc:
        n_blocks = triton.cdiv(lay.max_len, cfg.slc_block)
        seg_len = 1024 if not cfg.head_scoring else 1024 * G
        index = _inverted_index(sel, lay, cfg, G, Hkv, n_blocks, seg_len)
        if index is not None:
            ent, seg_key, seg_start, seg_end, key_seg = index
            nseg = seg_key.shape[0]
            BS = cfg.slc_tile
            if cfg.atomic:
                dkp = dvp = dk
            else:
                dkp = torch.empty((nseg, BS, D), dtype=torch.float32, device=dev)
                dvp = torch.empty_like(dkp)
            _launch(bwd.bwd_slc_dkv_kernel, (nseg,),
                q, k, v_finite, do, gates, res["lse_s"], delta[1], ent, seg_key, seg_start, seg_end, dkp, dvp, dk, dv,
                lay.starts, lay.lens,
                lay.strides(q), lay.strides(k), lay.strides(gates, 4), lay.strides(any_lse), scale_log2, scale, Hkv,
                n_blocks,
                G=G, GP=tiles.GP, BT=tiles.bt_kv, D=D, IEEE=ieee, GI_SLC=cfg.gate_index[1], LS=cfg.slc_block, BS=BS,
                HEAD_SCORING=cfg.head_scoring, ATOMIC=cfg.atomic, num_stages=launch.slc_dkv_stages,
            )
            if not cfg.atomic:
                bwd.reduce_slc_kernel[(key_seg.shape[0] - 1,)](
                    dkp, dvp, key_seg, dk, dv, lay.starts, lay.lens,
                    lay.strides(k), Hkv, n_blocks, D=D, LS=cfg.slc_block, BS=BS,
                )
    dk = dk.to(k.dtype) if dk is not None else torch.zeros_like(k)
    dv = dv.to(v.dtype) if dv is not None else torch.zeros_like(v)
    dgates = dg.to(gates.dtype) if need_gates else None
    return dq, dk, dv, dkc, dvc, dgates


def _mean_key(keys: torch.Tensor, used: bool) -> torch.Tensor:
    """``[B, Hkv, D]`` fp32, contiguous (a backward's two share one stride
    tuple): the mean of ``keys [B, Hkv, T, D]`` over its tokens (a batch row's
    sequences together), non-finite parts as 0; zeros where the branch does not
    run (``used`` False). The backward's dq takes
    any per-head constant here (``bwd._branch_end``); the mean keeps the
    product's error to the keys' spread."""
    shape = (keys.shape[0], keys.shape[1], keys.shape[3])
    if not used or keys.shape[2] == 0:
        return torch.zeros(shape, dtype=torch.float32, device=keys.device)
    return torch.nan_to_num(keys.mean(dim=2).float(), nan=0.0, posinf=0.0, neginf=0.0).contiguous()


def _given_selection(sel: torch.Tensor, rows: tuple[int, int, int], width: int) -> torch.Tensor:
    """A caller's block lists ``[B, Hsel, T, n]`` (int32, ``-1`` empty) in the
    kernels' layout ``[B, Hsel, T, width]``."""
    if sel.shape[:3] != rows or sel.shape[3] > width or sel.dtype != torch.int32:
        raise AssertionError(f"select() gave {tuple(sel.shape)} {sel.dtype}, expected int32 {rows} x at most {width}")
    if sel.shape[3] < width:
        sel = torch.nn.functional.pad(sel, (0, width - sel.shape[3]), value=-1)
    return sel.contiguous()


class _NSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kc, vc, gates, lay, cfg, launch, select):
        out, res = _forward(q, k, v, kc, vc, gates, lay, cfg, launch, save=True, select=select)
        ctx.lay, ctx.cfg, ctx.res = lay, cfg, res
        ctx.save_for_backward(q, k, v, kc, vc, gates)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, kc, vc, gates = ctx.saved_tensors
        need_gates = ctx.needs_input_grad[5]
        dq, dk, dv, dkc, dvc, dg = _backward(do, q, k, v, kc, vc, gates, ctx.lay, ctx.cfg, ctx.res, need_gates)
        return dq, dk, dv, dkc, dvc, dg, None, None, None, None


def _permuted_contiguous(x: torch.Tensor) -> bool:
    """Whether ``x`` is a permutation of a contiguous tensor with its last dim
    contiguous: ``empty_like`` then gives a tensor of its strides."""
    if x.stride(-1) != 1:
        return False
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda pair: pair[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def kernel_strides_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`nsa_attention` takes ``q, k, v`` as they are: each dense
    with a contiguous head dim (the output, dO and dq are made in q's strides,
    dk and dv in k's), and ``v`` in ``k``'s strides (the kernels address both by
    one stride tuple). The model's own layout ``[B, L, H, D]`` read as
    ``[B, H, L, D]`` qualifies, so the adapter's tensors need no copy."""
    return all(_permuted_contiguous(x) for x in (q, k, v)) and k.shape == v.shape and _same_strides(k, v)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) are addressed alike: equal strides on
    every dim longer than 1 (a dim of size 1 is only ever read at index 0)."""
    return all(x == y for size, x, y in zip(a.shape, a.stride(), b.stride()) if size > 1)


def kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` as :func:`nsa_attention` takes them (:func:`kernel_strides_ok`),
    copying only what must be: q where it is not dense or its strides would pass
    the 32-bit offsets over sequences of ``max_len`` tokens (the contiguous
    layout packs a group's heads tighter), k where it is not dense, v where it
    is not dense or not in k's strides. The model's layout passes as it is."""
    if not _permuted_contiguous(q) or within_group_offset(q, k, max_len) >= 2**31:
        q = q.contiguous()
    if not _permuted_contiguous(k):
        k = k.contiguous()
    if not (_permuted_contiguous(v) and _same_strides(k, v)):
        v = torch.empty_like(k).copy_(v)
    return q, k, v


def within_group_offset(q: torch.Tensor, k: torch.Tensor, max_len: int) -> int:
    """The span of the 32-bit offsets the kernels add inside one GQA group of
    ``q`` (``[B, Hq, T, D]``, kv heads ``k.shape[1]``) over sequences of up to
    ``max_len`` tokens: the group's heads times the head stride plus the tokens
    times the token stride. It must stay below 2^31 (:func:`nsa_attention`)."""
    return q.shape[1] // k.shape[1] * q.stride(1) + max_len * q.stride(2)


def nsa_attention(q, k, v, kc, vc, gates, lay: SeqLayout, cfg: KernelConfig, launch: Launch | None = None,
                  select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Gated NSA output over the sparse sequences in ``lay`` (autograd-aware);
    ``launch`` None: :func:`launch_choices` for q's head dim and group.

    ``select``: the selection's block lists from elsewhere than the kernels'
    own top-n (the released VideoNSA's ranking): called once per forward with
    the compression branch's base-2 log-sum-exp ``[B, Hq, T]`` (float32), it
    returns ``[B, Hsel, T, n]`` int32 block indices (``-1`` empty, each block at
    most once, ``n <= nt + 4``), which the selection kernel and the backward
    read as they read the kernels' own lists. Needs a compression branch."""
    # Batch, group and first-row bases are 64-bit in the kernels; what is added to
    # them per row or per step stays 32-bit (registers in the hot loops): a row's
    # place within its group's heads and its sequence (keys: within the sequence;
    # k's rows are as wide as q's). q [1, 28, L, 128]: up to 2,097,151 tokens.
    group = q.shape[1] // k.shape[1]
    within_group = within_group_offset(q, k, lay.max_len)
    if within_group >= 2**31:
        raise InputError("q", "fewer than 2^31 elements from a group's first head to its last row (query heads per "
                         "kv head x head stride + tokens x token stride) for the triton backend (32-bit offsets "
                         "inside a group)", f"{group} x {q.stride(1)} + {lay.max_len} x {q.stride(2)} = {within_group}")
    if not kernel_strides_ok(q, k, v):
        # the outputs, dq and dO take q's strides inside the kernels (and v, dk, dv k's)
        raise AssertionError("q, k and v must be dense with a contiguous last dim, v in k's strides")
    if launch is None:
        launch = launch_choices(q.shape[-1], group)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, kc, vc, gates)
    )
    if select is not None and not (cfg.has_cmp and cfg.has_slc):
        raise AssertionError("select needs the compression branch's log-sum-exp and a selection branch")
    if needs_grad:
        return _NSAFunction.apply(q, k, v, kc, vc, gates, lay, cfg, launch, select)
    out, _ = _forward(q, k, v, kc, vc, gates, lay, cfg, launch, save=False, select=select)
    return out
