"""The flex backend's query-block selection branch timed alone, beside the anchor's
construction measured in the same process (CUDA only).

The anchor (../shared/anchors, "Flex 8x128 query-block selection": 5.5 ms forward,
49 ms forward+backward on an H100) times one FlexAttention call over a BlockMask of
8 blocks of 128 keys per 128-query tile (block 0 always in, the other 7 drawn at
random among the causal blocks), a causal ``mask_mod``, enable_gqa, bf16, B = 1,
28/4 heads, D = 128. This probe times, per pattern and length:

* ``call``: the whole compiled pattern (scores, every branch, gates), forward and
  forward+backward, as ``nsaflex bench`` does;
* ``selection``: only the selection branch's FlexAttention call, on the BlockMask
  and tiling the backend builds for these inputs (``FlexKernel.selection_mask``);
* ``anchor``: the anchor's construction rebuilt here (random blocks), same inputs.

Forward-only variants that separate the causes of a gap: the anchor's random
blocks with off-diagonal tiles in the full lists (``selection_split``), the
backend's BlockMask through a plain ``torch.compile(flex_attention)``
(``selection_plain_compile``) and with every tile partial (``selection_all_partial``).

Medians of ``triton.testing.do_bench``. Usage (device copy installed):

    python benchmarks/flex_selection_probe.py --lengths 128k \\
        --patterns benchmarks/qblock-anchor.yaml,videonsa-qblock --json $OUT/selection-probe.json
"""

from __future__ import annotations

import argparse
import json
import traceback

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from triton.testing import do_bench

import nsaflex
from nsaflex.backends.flex import _run_flex
from nsaflex.backends.flex_masks import _sorted_list as sorted_list  # counts + ascending kept indices
from nsaflex.cli.common import parse_length
from nsaflex.bench import _runner, environment
from nsaflex.pooling import compress
from nsaflex.video_inputs import video_qkv

QUERY_HEADS, KV_HEADS, DIM = 28, 4, 128
DEVICE = "cuda"  # do_bench times CUDA events


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def anchor_block_mask(length: int, device: torch.device, block: int = 128, count: int = 8, seed: int = 0,
                      split: bool = False) -> BlockMask:
    """The anchor's BlockMask: per (kv head, 128-query tile) block 0 and up to 7
    random causal blocks of 128, repeated over each kv head's query heads; every
    block partial (the anchor), or ``split``: off-diagonal blocks in the full
    lists, as nsaflex builds them."""
    tiles = length // block
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, KV_HEADS, tiles, tiles, device=device, generator=generator)
    causal = torch.arange(tiles, device=device)[None, :] <= torch.arange(tiles, device=device)[:, None]
    scores = scores.masked_fill(~causal, -1.0)
    scores[..., 0] = 2.0
    chosen = torch.topk(scores, min(count, tiles), dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    indices = torch.zeros(1, KV_HEADS, tiles, tiles, dtype=torch.int32, device=device)
    indices[..., : chosen.shape[-1]] = chosen
    counts = torch.clamp(torch.arange(tiles, device=device) + 1, max=count).to(torch.int32).expand(1, KV_HEADS, tiles)
    group = QUERY_HEADS // KV_HEADS
    indices = indices.repeat_interleave(group, dim=1).contiguous()
    counts = counts.repeat_interleave(group, dim=1).contiguous()

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    if not split:
        return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(block, block), mask_mod=causal_mod,
                                        seq_lengths=(length, length))
    listed = torch.arange(tiles, device=device) < counts[..., None]
    diagonal = indices == torch.arange(tiles, device=device)[:, None].to(torch.int32)
    partial = sorted_list(indices, listed & diagonal, tiles)
    full = sorted_list(indices, listed & ~diagonal, tiles)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=(block, block), mask_mod=causal_mod,
                                    seq_lengths=(length, length))


def all_partial(tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and indices of nsaflex's selection tile lists with every listed tile
    in the partial lists (``BlockMask.from_kv_blocks`` input without full lists)."""
    width = tiles.kv_idx.shape[-1] + tiles.full_idx.shape[-1]
    columns = lambda n, w: torch.arange(w, device=n.device) < n[..., None]  # noqa: E731
    indices = torch.cat([tiles.kv_idx, tiles.full_idx], dim=-1)
    keep = torch.cat([columns(tiles.kv_num, tiles.kv_idx.shape[-1]), columns(tiles.full_num, tiles.full_idx.shape[-1])], dim=-1)
    return sorted_list(indices, keep, width + tiles.kv_len)


def probe(pattern_name: str, length: int) -> dict:
    device = torch.device(DEVICE)
    q, k, v = video_qkv(1, QUERY_HEADS, KV_HEADS, length, DIM, device=device, dtype=torch.bfloat16)
    attn = nsaflex.compile(pattern_name, backend="flex", device=DEVICE, head_dim=DIM).to(device)
    pattern = attn.pattern
    gates = None
    if pattern.gate.kind != "constant":
        gates = torch.rand(1, QUERY_HEADS, length, len(pattern.branches), device=device, dtype=torch.bfloat16)
    types = torch.ones(1, length, dtype=torch.long, device=device) if pattern.hybrid is not None else None
    record: dict = {"pattern": pattern.name, "length": length}
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    gate_leaf = None if gates is None else gates.detach().clone().requires_grad_()
    record["call_fwd_ms"] = median_ms(_runner(lambda: attn(q, k, v, gates, types), None))
    grads = leaves + (() if gate_leaf is None else (gate_leaf,))
    record["call_fwd_bwd_ms"] = median_ms(_runner(lambda: attn(*leaves, gate_leaf, types), grads))

    kernel = attn._kernel
    with torch.no_grad():
        compressed_k, _ = compress(k, v, pattern.compression, attn.pooler)
        mask, tiling = kernel.selection_mask(q, compressed_k, None, compiled=True, needs_grad=False)
        grad_mask, grad_tiling = kernel.selection_mask(q, compressed_k, None, compiled=True, needs_grad=True)
    record["selection_stats"] = kernel.stats.get("selection")
    record["selection_tiling"] = {"forward": list(tiling[:2]), "backward": list(grad_tiling[:2]),
                                  "small_backward_tiles": grad_tiling.small_backward_tiles}
    record["selection_fwd_ms"] = median_ms(_runner(lambda: _run_flex("selection", q, k, v, mask, True, tiling), None))
    record["selection_fwd_bwd_ms"] = median_ms(
        _runner(lambda: _run_flex("selection", *leaves, grad_mask, True, grad_tiling), leaves))
    # The same lists with every tile partial (mask_mod on every tile, as the anchor's).
    counts, ordered = all_partial(mask.tiles)
    # Forward only: the lists are narrow (as the backend's forward), and torch's
    # transposed (q-block) lists assume full-width ones.
    partial_mask = BlockMask.from_kv_blocks(counts, ordered, BLOCK_SIZE=tuple(tiling[:2]), mask_mod=mask.mask_mod,
                                            seq_lengths=(length, length), compute_q_blocks=False)
    compiled = torch.compile(flex_attention)
    scale = 1.0 / DIM ** 0.5
    # The backend's own BlockMask through a plain torch.compile(flex_attention), as the anchor calls it.
    own_mask = mask.block_mask(False)
    record["selection_plain_compile_fwd_ms"] = median_ms(_runner(
        lambda: compiled(q, k, v, block_mask=own_mask, scale=scale, enable_gqa=True, kernel_options=tiling.options), None))
    record["selection_all_partial_fwd_ms"] = median_ms(_runner(
        lambda: compiled(q, k, v, block_mask=partial_mask, scale=scale, enable_gqa=True, kernel_options=tiling.options), None))
    return record


def probe_anchor(length: int) -> dict:
    device = torch.device(DEVICE)
    q, k, v = video_qkv(1, QUERY_HEADS, KV_HEADS, length, DIM, device=device, dtype=torch.bfloat16)
    block_mask = anchor_block_mask(length, device)
    compiled = torch.compile(flex_attention)
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    split_mask = anchor_block_mask(length, device, split=True)
    return {
        "selection_split_fwd_ms": median_ms(_runner(lambda: compiled(q, k, v, block_mask=split_mask, enable_gqa=True), None)),
        "pattern": "anchor construction (random 8 x 128, block 0 in)",
        "length": length,
        "selection_fwd_ms": median_ms(_runner(lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True), None)),
        "selection_fwd_bwd_ms": median_ms(
            _runner(lambda: compiled(*leaves, block_mask=block_mask, enable_gqa=True), leaves)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="128k")
    parser.add_argument("--patterns", default="benchmarks/qblock-anchor.yaml,videonsa-qblock")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    results: dict = {"environment": environment("cuda"), "rows": []}
    for length in map(parse_length, args.lengths.split(",")):
        steps = [("anchor", lambda: probe_anchor(length))]
        steps += [(name, lambda name=name: probe(name, length)) for name in args.patterns.split(",")]
        for name, run in steps:
            try:
                record = run()
            except Exception as error:  # keep the other rows
                traceback.print_exc()
                record = {"pattern": name, "length": length, "error": f"{type(error).__name__}: {str(error)[:600]}"}
            results["rows"].append(record)
            print(json.dumps(record, default=str), flush=True)
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1, default=str)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
