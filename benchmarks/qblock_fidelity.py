"""How far query-block selection moves from per-token selection: the fidelity table.

For each tile size m (default 4, 8, 16, 64) the pattern (default ``videonsa``,
every token vision) runs twice on the same inputs, once with per-token selection
(``granularity: token``) and once with one selection per tile of m queries
(``granularity: query_block``); for video-like inputs
(:func:`nsaflex.video_inputs.video_qkv`) and i.i.d. Gaussian ones
(:func:`nsaflex.video_inputs.random_qkv`) it reports

* ``output error``: ``||o_m - o_token|| / ||o_token||`` of the gated output,
* ``selection error``: the same for the selection branch's output alone,
* ``blocks in common``: the mean over queries (and selecting heads) of the
  share of a query's per-token blocks that its tile also selected
  (``|A_m n A_token| / |A_token|``).

Gates are constant (1/3 per branch), so the outputs differ only through the
selection. On CUDA at 32K (what the table is for)::

    python benchmarks/qblock_fidelity.py --length 32768 --json qblock.json --md qblock.md

and small on the CPU (the script's own check; the reference backend)::

    python benchmarks/qblock_fidelity.py --device cpu --backend reference --length 512 --heads 4/2 --dim 16 --count 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

import nsaflex
from nsaflex.spec import Pattern
from nsaflex.video_inputs import random_qkv, video_qkv

INPUTS = {"video": video_qkv, "random": random_qkv}


def tile_pattern(base: Pattern, tile: int | None) -> Pattern:
    """``base`` with every token vision (no hybrid section), head counts and
    dim left to the inputs, and per-token selection (``tile`` None) or
    query-block selection with tiles of ``tile``."""
    assert base.selection is not None
    selection = dataclasses.replace(base.selection, granularity="token" if tile is None else "query_block",
                                    query_block=tile)
    model = dataclasses.replace(base.model, query_heads=None, kv_heads=None, head_dim=None)
    return dataclasses.replace(base, name=f"{base.name}-{'token' if tile is None else f'q{tile}'}",
                               selection=selection, hybrid=None, budget=None, model=model)


def blocks_in_common(tiled: torch.Tensor, token: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over queries of ``|tiled n token| / |token|`` for block lists
    ``[B, H, L, n]`` (``-1``: empty; queries without a block skipped)."""
    shared_sum, counted = 0.0, 0
    for start in range(0, token.shape[2], chunk):
        a, b = tiled[:, :, start:start + chunk], token[:, :, start:start + chunk]
        hit = ((a[..., :, None] == b[..., None, :]) & (b[..., None, :] >= 0)).any(dim=-2).sum(dim=-1)
        size = (b >= 0).sum(dim=-1)
        keep = size > 0
        shared_sum += float((hit[keep].double() / size[keep].double()).sum())
        counted += int(keep.sum())
    return shared_sum / max(1, counted)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(base: Pattern, tiles: list[int], inputs: list[str], *, length: int, query_heads: int, kv_heads: int,
            dim: int, backend: str, device: str, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One row per (inputs, tile): the errors and the share of blocks in common."""
    rows = []
    for kind in inputs:
        q, k, v = INPUTS[kind](1, query_heads, kv_heads, length, dim, seed=seed, device=device, dtype=dtype)
        gates = torch.full((1, query_heads, length, len(base.branches)), 1.0 / len(base.branches), device=device,
                           dtype=dtype)
        with torch.no_grad():
            token = nsaflex.compile(tile_pattern(base, None), backend=backend, device=device)
            token_out, token_info = token(q, k, v, gates, return_info=True)
            for tile in tiles:
                attn = nsaflex.compile(tile_pattern(base, tile), backend=backend, device=device)
                out, info = attn(q, k, v, gates, return_info=True)
                rows.append({
                    "inputs": kind, "m": tile, "length": length, "backend": attn.plan.backend,
                    "output_error": relative(out, token_out),
                    "selection_error": relative(info.outputs["selection"], token_info.outputs["selection"]),
                    "blocks_in_common": blocks_in_common(info.selected_blocks, token_info.selected_blocks),
                })
                print(json.dumps(rows[-1]), flush=True)
                del out, info
    return rows


def markdown(rows: list[dict], pattern: str, device: str) -> str:
    lines = [f"Query-block against per-token selection, {pattern}, {device}",
             "", "| inputs | m | length | backend | output error | selection error | blocks in common |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['inputs']} | {row['m']} | {row['length']} | {row['backend']} | {row['output_error']:.3e} "
                     f"| {row['selection_error']:.3e} | {row['blocks_in_common']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="videonsa", help="bundled pattern name or YAML path (default videonsa)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16, 64], help="tile sizes m")
    parser.add_argument("--count", type=int, help="selection.count instead of the pattern's (short CPU checks)")
    parser.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=["video", "random"])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", default="28/4", help="query/kv heads (default 28/4)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--md", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)
    query_heads, kv_heads = (int(x) for x in args.heads.split("/"))
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    base = nsaflex.load_pattern(args.pattern)
    if base.selection is None:
        parser.error(f"pattern {base.name!r} has no selection branch")
    if args.count is not None:
        base = dataclasses.replace(base, selection=dataclasses.replace(base.selection, count=args.count))
    bad = [m for m in args.tiles if base.selection.block % m]
    if bad:
        parser.error(f"tile sizes {bad} do not divide selection.block = {base.selection.block}")
    rows = measure(base, args.tiles, args.inputs, length=args.length, query_heads=query_heads, kv_heads=kv_heads,
                   dim=args.dim, backend=args.backend, device=args.device, dtype=dtype, seed=args.seed)
    table = markdown(rows, base.name, f"{args.device} {dtype_name}")
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"pattern": base.name, "device": args.device, "dtype": dtype_name,
                                         "rows": rows}, indent=1))
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
