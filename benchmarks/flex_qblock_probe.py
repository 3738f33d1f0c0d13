"""Where the flex backend's `videonsa-qblock` forward spends its time, and what the
selection FlexAttention call costs in other layouts (H100 probe, flex run 5).

    PYTHONPATH=.:benchmarks/flex-shim python benchmarks/flex_qblock_probe.py --length 131072 --json $OUT/probe.json

Sections (each wrapped so one failure does not lose the rest; the JSON is
rewritten after every section):

1. ``stages``: `--breakdown`-style CUDA-event split of one forward call, and the
   top CUDA kernels of a forward and of a forward+backward (torch.profiler).
2. ``selection``: the selection branch's own FlexAttention call, from the same
   top-n indices, in three layouts:
   * ``heads`` (what the backend runs): q ``[B, 28, L, D]``, 64 x 64 tiles,
     ``enable_gqa``; with a few ``num_warps``/``num_stages`` settings;
   * ``packed``: the G heads of a kv group stacked inside each 64-query unit
     (G padded to 8): q ``[B, Hkv, U * 8 * 64, D]``, rows ``(unit, head, token)``,
     so a 128-row tile holds two heads of one unit and runs exactly that unit's
     n blocks with 128 x 64 tiles;
   * ``anchor``: ../shared/anchors' 8 x 128 query-block selection (128 x 128 tiles,
     random blocks), to tie this run to the anchor's 5.5 ms.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from triton.testing import do_bench

import nsaflex
from nsaflex import scoring
from nsaflex.backends import flex_masks as fm
from nsaflex.bench import environment
from nsaflex.pooling import compress
from nsaflex.video_inputs import video_qkv

RESULTS: dict = {}
SECTIONS: set[str] = set()
# Every kernel_options variant is a recompile of flex_attention; past dynamo's limit
# (8) it would fall back to the eager path, which materialises L x L scores.
for _name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def save(path: str) -> None:
    with open(path, "w") as handle:
        json.dump(RESULTS, handle, indent=1)


def section(name: str, path: str):
    def wrap(fn):
        if name not in SECTIONS:
            return fn
        started = time.time()
        try:
            RESULTS[name] = fn()
        except Exception as error:  # keep going: the other sections still count
            RESULTS[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        RESULTS[name + "_seconds"] = round(time.time() - started, 1)
        print(name, json.dumps(RESULTS[name], default=str)[:3000], flush=True)
        save(path)
        return fn

    return wrap


def kernel_table(fn, rows: int = 18) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = []
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:rows]:
        table.append({"kernel": event.key[:120], "ms": round(event.device_time_total / 1000.0, 3), "calls": event.count})
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--json", default="probe.json")
    parser.add_argument("--skip-bwd", action="store_true")
    parser.add_argument("--sections", default="stages,stages_bwd,selection_heads,selection_packed,selection_bwd,anchor")
    args = parser.parse_args()
    length, path = args.length, args.json
    SECTIONS.update(args.sections.split(","))
    RESULTS["environment"] = environment("cuda")
    RESULTS["length"] = length
    pattern = nsaflex.load_pattern("videonsa-qblock")
    q, k, v = video_qkv(1, 28, 4, length, 128, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(1, 28, length, 3, device="cuda", dtype=torch.bfloat16)
    types = torch.ones(1, length, dtype=torch.long, device="cuda")  # every token vision
    attn = nsaflex.compile(pattern, backend="flex", device="cuda")

    @section("stages", path)
    def _stages():
        with torch.no_grad():
            call = lambda: attn(q, k, v, gates, types)  # noqa: E731
            total = bench(call)
            kernel = attn._kernel
            kernel.profile = True
            call()
            split = dict(kernel.stats.get("timings_ms", {}))
            kernel.profile = False
            return {"fwd_ms": total, "split_ms": split, "kernels": kernel_table(call)}

    if not args.skip_bwd:
        @section("stages_bwd", path)
        def _stages_bwd():
            leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
            out = attn(*leaves, types)
            grad = torch.randn_like(out)

            def call():
                return torch.autograd.grad(attn(*leaves, types), leaves, grad)

            kernel = attn._kernel
            kernel.profile = True
            attn(*leaves, types)
            split = dict(kernel.stats.get("timings_ms", {}))
            kernel.profile = False
            return {"fwd_bwd_ms": bench(call), "fwd_split_with_grad_ms": split, "kernels": kernel_table(call, 24)}

    # -- the selection call in three layouts ------------------------------------------------------
    compression, selection = pattern.compression, pattern.selection
    with torch.no_grad():
        compressed_k, _ = compress(k, v, compression)
        result = scoring.select(q, compressed_k, compression, selection)
    bitmap = scoring.selection_bitmap(result)
    scale = 128 ** -0.5
    compiled = torch.compile(flex_attention, dynamic=False)

    tiles, _ = fm.selection_tiles(result, length, selection.block, 64, 64, narrow=True)
    heads_mask = tiles.expand_heads(7).block_mask(fm.selection_mask_mod(bitmap, 7, result.unit, selection.block),
                                                  compute_q_blocks=False)
    reference_out = compiled(q, k, v, block_mask=heads_mask, scale=scale, enable_gqa=True,
                             kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})

    @section("selection_heads", path)
    def _heads():
        out = {}
        for warps, stages in ((4, 2), (4, 1), (8, 1), (4, 3)):
            options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": warps, "num_stages": stages}
            try:
                out[f"w{warps}s{stages}"] = bench(lambda: compiled(q, k, v, block_mask=heads_mask, scale=scale,
                                                                   enable_gqa=True, kernel_options=options))
            except Exception as error:
                out[f"w{warps}s{stages}"] = f"{type(error).__name__}: {str(error)[:200]}"
        return out

    # packed: rows (unit, head, token) with the group padded to 8 heads.
    unit, group, padded = result.unit, 7, 8
    units = length // unit
    rows_per_unit = padded * unit

    def pack(x):  # [1, 28, L, D] -> [1, 4, U * 8 * m, D]
        x = x.view(1, 4, group, units, unit, 128).permute(0, 1, 3, 2, 4, 5)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - group))
        return x.reshape(1, 4, units * rows_per_unit, 128)

    def unpack(y):
        y = y.view(1, 4, units, padded, unit, 128)[:, :, :, :group]
        return y.permute(0, 1, 3, 2, 4, 5).reshape(1, 28, length, 128)

    unit_tiles, _ = fm.selection_tiles(result, length, selection.block, unit, 64, narrow=True)
    per_unit = rows_per_unit // 128
    rep = lambda t: t.repeat_interleave(per_unit, dim=2).contiguous()  # noqa: E731

    def packed_causal(b, h, q_idx, kv_idx):
        token = (q_idx // rows_per_unit) * unit + q_idx % unit
        return kv_idx <= token

    def packed_block_mask():
        return BlockMask.from_kv_blocks(
            rep(unit_tiles.kv_num), rep(unit_tiles.kv_idx), rep(unit_tiles.full_num), rep(unit_tiles.full_idx),
            BLOCK_SIZE=(128, 64), mask_mod=packed_causal, seq_lengths=(units * rows_per_unit, length),
            compute_q_blocks=False)

    packed_q = pack(q)

    @section("selection_packed", path)
    def _packed():
        out = {}
        packed_mask = packed_block_mask()
        for warps, stages in ((8, 2), (4, 2), (8, 1), (4, 3)):
            options = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": warps, "num_stages": stages}
            try:
                fn = lambda: compiled(packed_q, k, v, block_mask=packed_mask, scale=scale, kernel_options=options)  # noqa: E731
                out[f"w{warps}s{stages}"] = bench(fn)
                error = (unpack(fn()).float() - reference_out.float()).abs().max().item()
                out[f"w{warps}s{stages}_max_abs_diff"] = error
            except Exception as error:
                out[f"w{warps}s{stages}"] = f"{type(error).__name__}: {str(error)[:200]}"
        out["pack_ms"] = bench(lambda: pack(q))
        out["unpack_ms"] = bench(lambda: unpack(packed_q))
        return out

    if not args.skip_bwd:
        @section("selection_bwd", path)
        def _bwd():
            out = {}
            qh = q.detach().requires_grad_()
            kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
            # what the backend runs with gradients: 128 x 128 tiles over the union of two units
            union_tiles, _ = fm.selection_tiles(result, length, selection.block, 128, 128)
            union_mask = union_tiles.expand_heads(7).block_mask(fm.selection_mask_mod(bitmap, 7, result.unit, selection.block))
            g = torch.randn_like(reference_out)
            if "skip_union" not in SECTIONS:
                out["heads_128x128_union"] = bench(lambda: torch.autograd.grad(
                    compiled(qh, kk, vv, block_mask=union_mask, scale=scale, enable_gqa=True), (qh, kk, vv), g))
            tiles64 = fm.selection_tiles(result, length, selection.block, 64, 64)[0].expand_heads(7)
            mask64 = tiles64.block_mask(fm.selection_mask_mod(bitmap, 7, result.unit, selection.block))
            # Hopper's default backward config tiles 64 x 128 / 128 x 64, which 64-key
            # blocks cannot take; max_autotune adds configs that can.
            autotuned = torch.compile(flex_attention, dynamic=False, options={"max_autotune": True})
            fwd64 = {"BLOCK_M": 64, "BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 2}
            variants = [
                ("heads_64x64_autotune", fwd64),
                ("heads_64x64_autotune_m32", {**fwd64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32}),
            ]
            for name, options in variants:
                try:
                    fn = lambda: torch.autograd.grad(  # noqa: E731
                        autotuned(qh, kk, vv, block_mask=mask64, scale=scale, enable_gqa=True, kernel_options=options),
                        (qh, kk, vv), g)
                    started = time.time()
                    fn()
                    torch.cuda.synchronize()
                    out[name + "_first_call_s"] = round(time.time() - started, 1)
                    out[name] = bench(fn)
                    out[name + "_fwd"] = bench(lambda: autotuned(qh.detach(), kk.detach(), vv.detach(), block_mask=mask64,
                                                                 scale=scale, enable_gqa=True, kernel_options=options))
                except Exception as error:
                    out[name] = f"{type(error).__name__}: {str(error)[:300]}"
            return out

    @section("anchor", path)
    def _anchor():
        query_tiles = key_tiles = length // 128
        scores = torch.rand(1, 4, query_tiles, key_tiles, device="cuda")
        causal = torch.arange(key_tiles, device="cuda")[None, :] <= torch.arange(query_tiles, device="cuda")[:, None]
        scores = scores.masked_fill(~causal, -1)
        scores[..., 0] = 2.0
        chosen = torch.topk(scores, 8, dim=-1).indices.sort(-1).values.to(torch.int32)
        indices = torch.zeros(1, 4, query_tiles, key_tiles, dtype=torch.int32, device="cuda")
        indices[..., :8] = chosen
        counts = torch.minimum(torch.arange(query_tiles, device="cuda") + 1, torch.tensor(8, device="cuda")).to(torch.int32)
        counts = counts.expand(1, 4, query_tiles)
        mask = BlockMask.from_kv_blocks(counts.repeat_interleave(7, 1).contiguous(), indices.repeat_interleave(7, 1).contiguous(),
                                        BLOCK_SIZE=(128, 128), mask_mod=fm.causal_mask_mod(), seq_lengths=(length, length))
        return {"flex_8x128_fwd_ms": bench(lambda: compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True))}

    print(json.dumps(RESULTS, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
