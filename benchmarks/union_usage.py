"""How many of a selection tile's tokens use each block of its union? (CPU)

``slc_win_kernel`` runs a tile of 9 consecutive tokens (x 7 heads = 63 of 64
matrix rows) over the union of their selected blocks; a block chosen by one
token keeps 56 of the 63 rows busy for nothing. This prints, for the
``videonsa`` pattern on ``--inputs video|random`` (the float32 reference
scoring, as ``union_regroup_check.py``), the share of union blocks that 1, 2,
..., 9 of a tile's tokens chose, the union over one token's selection for each
quarter of the sequence, and the useful share of the executed (token, block)
pairs.

    python benchmarks/union_usage.py --length 131072 --inputs video   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from union_regroup_check import selection_bits  # noqa: E402

TOKENS = 9  # tokens of one slc_win tile at G = 7 (dense rows: 9 x 7 of 64)


def tile_usage(bits: torch.Tensor, tokens: int = TOKENS) -> dict:
    """Figures of the tiles of ``tokens`` consecutive tokens over ``bits``
    ``[Hs, L, J]`` (block ``j`` selected by token ``t`` of selection head ``h``;
    the last partial tile is left out)."""
    heads, length, blocks = bits.shape
    tiles = length // tokens
    users = bits[:, : tiles * tokens].reshape(heads, tiles, tokens, blocks).sum(dim=2)  # [Hs, tiles, J]
    histogram = torch.bincount(users.flatten(), minlength=tokens + 1)[1:].double()
    union = (users > 0).sum(dim=-1).double()  # [Hs, tiles]
    selected = bits[:, : tiles * tokens].sum(dim=-1).double().mean()
    quarters = [(union[:, q * tiles // 4:(q + 1) * tiles // 4].mean() / selected).item() for q in range(4)]
    return {
        "tokens_per_tile": tokens,
        "blocks_per_token": selected.item(),
        "share_of_union_blocks_by_users": (histogram / histogram.sum()).tolist(),
        "union_over_selected": (union.mean() / selected).item(),
        "union_over_selected_by_quarter": quarters,
        "useful_share": ((histogram * torch.arange(1, tokens + 1)).sum() / (histogram.sum() * tokens)).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--inputs", default="video", choices=("video", "random"))
    parser.add_argument("--pattern", default="videonsa")
    args = parser.parse_args()
    record = {"length": args.length, "inputs": args.inputs, "pattern": args.pattern,
              **tile_usage(selection_bits(args.length, args.inputs, args.pattern))}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
