"""Can another grouping of queries into the selection kernel's tiles shrink the
union of blocks a tile runs? (CPU; the answer recorded in NOTES-triton.md, run 38.)

    python benchmarks/selection_regrouping.py 32k     # ~1 min on 2 cores

Selects blocks for one kv head's 7 query heads (videonsa pattern, group
scoring, ``--inputs video``) with ``nsaflex.scoring.select``, then reports,
over the second half of the sequence, the Jaccard index of the selections of
neighbouring tokens and of tokens one frame apart at the same patch
(``nsaflex.video_inputs.selection_overlap``), and the mean distinct blocks per
tile of 9 tokens (the kernel's 9 tokens x 7 heads) for tiles of
* consecutive tokens (what the kernel runs);
* tokens sorted by a min-hash of their selections inside windows of W tokens;
* patches x frames rectangles of the video (256 patches a frame), with the
  distinct window blocks such a tile would add;
* greedy clusters inside windows of W tokens: each tile grows from its first
  free token by the free token that adds the fewest new blocks.
"""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from triton_bench import parse_len  # noqa: E402

from nsaflex import scoring  # noqa: E402
from nsaflex.loader import load_pattern  # noqa: E402
from nsaflex.video_inputs import selection_overlap, video_qkv  # noqa: E402

TOKENS = 9
PATCHES = 256


def distinct(blocks: torch.Tensor) -> torch.Tensor:
    """Distinct non-negative entries per row of ``blocks [N, M]``."""
    ordered = blocks.sort(-1).values
    fresh = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    return (fresh.sum(-1) + (ordered[:, 0] >= 0)).float()


def tile_union(indices: torch.Tensor, order: torch.Tensor) -> float:
    usable = (order.numel() // TOKENS) * TOKENS
    return distinct(indices[order[:usable]].reshape(-1, TOKENS * indices.shape[1])).mean().item()


def min_hash(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """The smallest random rank of a token's selected blocks (its own current block excluded)."""
    length = indices.shape[0]
    rank = torch.randperm(int(indices.max()) + 2, generator=torch.Generator().manual_seed(seed))
    current = (torch.arange(length) // 64)[:, None]
    keep = (indices >= 0) & (indices != current)
    return torch.where(keep, rank[indices.clamp(min=0)], rank.numel()).min(-1).values


def sorted_in_windows(key: torch.Tensor, first: int, window: int) -> torch.Tensor:
    pieces = [start + torch.argsort(key[start:start + window], stable=True) for start in range(first, key.numel(), window)]
    return torch.cat(pieces)


def window_blocks(tokens: torch.Tensor, size: int = 256, block: int = 64) -> float:
    spans = [set().union(*(range(max(t - size + 1, 0) // block, t // block + 1) for t in row)) for row in tokens.tolist()]
    return sum(map(len, spans)) / len(spans)


def greedy(indices: torch.Tensor, first: int, window: int, windows: int) -> float:
    blocks = int(indices.max()) + 1
    unions = []
    starts = torch.randint(first // window, indices.shape[0] // window, (windows,), generator=torch.Generator().manual_seed(0))
    for start in (starts * window).tolist():
        rows = indices[start:start + window]
        bitmap = torch.zeros(window, blocks)
        bitmap.scatter_(1, rows.clamp(min=0).long(), (rows >= 0).float())
        free = torch.ones(window, dtype=torch.bool)
        while int(free.sum()) >= TOKENS:
            seed = int(torch.nonzero(free)[0])
            free[seed] = False
            union = bitmap[seed].clone()
            for _ in range(TOKENS - 1):
                added = (bitmap * (1 - union)).sum(1).masked_fill(~free, float("inf"))
                pick = int(added.argmin())
                free[pick] = False
                union = torch.maximum(union, bitmap[pick])
            unions.append(union.sum().item())
    return sum(unions) / len(unions)


def main(length: int) -> dict:
    pattern = load_pattern("videonsa")
    q, k, _ = video_qkv(1, 7, 1, length, 128)
    compressed = k.view(1, 1, length // 64, 64, 128).mean(3)
    indices = scoring.select(q, compressed, pattern.compression, pattern.selection).indices[0, 0]  # [L, slots]
    half = length // 2
    late = indices[half:]
    frames_late = late.shape[0] // PATCHES
    by_patch = late[:frames_late * PATCHES].reshape(frames_late, PATCHES, -1).transpose(0, 1)  # [patch, frame, slots]
    result = {"L": length, "tile_tokens": TOKENS, "selected_per_token": (late >= 0).sum(-1).float().mean().item(),
              "jaccard_next_token": selection_overlap(late[None, None]),
              "jaccard_next_frame_same_patch": selection_overlap(by_patch[None]),
              "consecutive": tile_union(indices, torch.arange(half, length))}
    for window in (64, 256, 1024):
        result[f"min_hash_sorted_w{window}"] = tile_union(indices, sorted_in_windows(min_hash(indices, 1), half, window))
    frames = length // PATCHES
    for patches, rows in ((9, 1), (3, 3), (1, 9)):
        first = (torch.arange(frames // 2, frames - rows + 1, rows)[:, None] * PATCHES
                 + torch.arange(0, PATCHES - patches + 1, patches)[None, :]).reshape(-1)
        tiles = first[:, None] + (torch.arange(rows)[:, None] * PATCHES + torch.arange(patches)[None, :]).reshape(1, -1)
        tiles = tiles[torch.randperm(tiles.shape[0], generator=torch.Generator().manual_seed(0))[:2000]]
        result[f"rect_{patches}x{rows}"] = {"selection": distinct(indices[tiles].reshape(tiles.shape[0], -1)).mean().item(),
                                            "window_blocks": window_blocks(tiles)}
    for window in (64, 256):
        result[f"greedy_w{window}"] = greedy(indices, half, window, windows=12)
    return result


if __name__ == "__main__":
    print(json.dumps(main(parse_len(sys.argv[1] if len(sys.argv) > 1 else "32k")), indent=1))
