"""Would regrouping tokens shrink the union of the Triton selection tiles?

``slc_win_kernel`` runs a tile of 8 consecutive tokens over the union of their
selected blocks. This check (CPU, the float32 reference scoring) compares the
mean union per tile, divided by the blocks one token selects, for consecutive
8-token tiles against tiles regrouped greedily inside each aligned window of
``--window`` tokens (seed = first ungrouped token, then its 7 ungrouped
neighbours with the largest selection overlap); a regrouped kernel would gather
its rows instead of reading consecutive ones.

    python benchmarks/union_regroup_check.py --length 32768 --inputs video
"""

from __future__ import annotations

import argparse
import json

import torch

from nsaflex import scoring
from nsaflex.loader import load_pattern
from nsaflex.pooling import compress
from nsaflex.video_inputs import random_qkv, video_qkv

TILE = 8


def selection_bits(length: int, inputs: str, pattern_name: str) -> torch.Tensor:
    """``[Hs, L, J]`` bool: block ``j`` selected by token ``t`` of selection head ``h``."""
    pattern = load_pattern(pattern_name)
    maker = video_qkv if inputs == "video" else random_qkv
    q, k, v = maker(1, 28, 4, length, 128)
    compressed_k, _ = compress(k, v, pattern.compression, None)
    result = scoring.select(q, compressed_k, pattern.compression, pattern.selection, score_dtype=torch.float32)
    return scoring.selected_mask(result, length)[0]


def mean_union(bits: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean distinct blocks of the tiles ``groups [Hs, tiles, TILE]`` (token ids)."""
    heads, _, blocks = bits.shape
    members = bits.gather(1, groups.reshape(heads, -1, 1).expand(-1, -1, blocks))
    return members.reshape(heads, groups.shape[1], TILE, blocks).any(dim=2).sum(dim=-1).double().mean().item()


def greedy_groups(bits: torch.Tensor, window: int) -> torch.Tensor:
    heads, length, _ = bits.shape
    windows = length // window
    chunks = bits[:, : windows * window].reshape(heads, windows, window, -1).float()
    overlap = torch.einsum("hwaj,hwbj->hwab", chunks, chunks)
    groups = torch.empty(heads, windows, window, dtype=torch.long)
    for head in range(heads):
        for w in range(windows):
            left, order = list(range(window)), []
            while left:
                seed = left.pop(0)
                ranked = sorted(left, key=lambda other: -overlap[head, w, seed, other].item())[: TILE - 1]
                left = [token for token in left if token not in ranked]
                order += [seed, *ranked]
            groups[head, w] = torch.tensor(order) + w * window
    return groups.reshape(heads, -1, TILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--inputs", default="video", choices=("video", "random"))
    parser.add_argument("--pattern", default="videonsa")
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    bits = selection_bits(args.length, args.inputs, args.pattern)
    per_token = bits.sum(dim=-1).double().mean().item()
    usable = (args.length // args.window) * args.window
    consecutive = torch.arange(usable).reshape(1, -1, TILE).expand(bits.shape[0], -1, -1)
    record = {
        "length": args.length, "inputs": args.inputs, "pattern": args.pattern, "window": args.window,
        "blocks_per_token": per_token,
        "union_over_selected_consecutive": mean_union(bits, consecutive) / per_token,
        "union_over_selected_regrouped": mean_union(bits, greedy_groups(bits, args.window)) / per_token,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
