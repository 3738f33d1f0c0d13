"""How many bisection steps does topn_select_kernel's search take per token,
and how many would other starting brackets save? (CPU; the answer recorded in
NOTES-triton.md, runs 44-49.)

    python benchmarks/topn_search_steps.py 16k     # ~1 min on 2 cores

Block scores as the score pass writes them for one kv head (videonsa pattern:
mean-pooled compressed tokens, l = d = l' = 64, group scoring over 7 heads,
``--inputs video``), fp32, for the last 2,048 tokens. The search is the
kernel's: over the int32 bits of the scores, keeping
``count(>= lo) >= k > count(>= hi)``, stopping once ``count(>= lo) == k``
(k = 31: n = 32 minus the forced current block). Counted for
* the whole range ``[0, +inf]`` (the kernel before run 46);
* bounds from 32 group maxima: ``lo`` = the smallest non-empty group's
  maximum (valid when at least k groups are non-empty), ``hi`` = the row
  maximum + 1 (plus one count for ``lo``);
* a chain of C tokens a row, each search after the first starting from
  ``[T' - spread, T' + spread)`` around the previous token's threshold T'
  (plus two counts for the bracket): what the kernel does since run 46.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from triton_bench import parse_len  # noqa: E402

from nsaflex.video_inputs import video_qkv  # noqa: E402

GROUP, BLOCK, TAKE, ROWS = 7, 64, 31, 2048
TOP = 0x7F800001


def block_scores(length: int) -> list[np.ndarray]:
    """Per token of the last ROWS: the int32 bits of its candidate blocks' group scores."""
    q, k, _ = video_qkv(1, GROUP, 1, length, 128)
    compressed = k.view(length // BLOCK, BLOCK, 128).mean(1)
    tokens = torch.arange(length - ROWS, length)
    logits = torch.einsum("gtd,cd->gtc", q[0][:, tokens], compressed) / 128**0.5
    visible = torch.arange(length // BLOCK)[None, :] < ((tokens + 1) // BLOCK)[:, None]
    scores = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0).sum(0)
    rows = []
    for row, t in enumerate(tokens.tolist()):
        candidates = [j for j in range((t + 1) // BLOCK) if j != t // BLOCK]
        rows.append(scores[row, candidates].numpy().astype(np.float32).view(np.int32).astype(np.int64))
    return rows


def bisect(bits: np.ndarray, lo: int, hi: int, count_lo: int) -> tuple[int, int]:
    """The kernel's search from a valid bracket: (steps, final lo)."""
    steps = 0
    while hi - lo > 1 and count_lo != TAKE:
        mid = lo + (hi - lo) // 2
        count = int((bits >= mid).sum())
        steps += 1
        if count >= TAKE:
            lo, count_lo = mid, count
        else:
            hi = mid
    return steps, lo


def group_bounds(bits: np.ndarray) -> int:
    padded = np.full(-(-len(bits) // 32) * 32, -1, np.int64)
    padded[: len(bits)] = bits
    maxima = padded.reshape(32, -1).max(1)
    filled = maxima[maxima >= 0]
    lo = int(filled.min()) if len(filled) >= TAKE else 0
    return 1 + bisect(bits, lo, int(maxima.max()) + 1, int((bits >= lo).sum()))[0]


def chained(rows: list[np.ndarray], chain: int, spread: int) -> float:
    steps, guess = [], -1
    for index, bits in enumerate(rows):
        if index % chain == 0 or guess < 0:
            n, guess = bisect(bits, 0, TOP, len(bits))
        else:
            lo, hi, count_lo = 0, TOP, len(bits)
            g_lo, g_hi = max(guess - spread, 0), min(guess + spread, TOP)
            c_lo, c_hi = int((bits >= g_lo).sum()), int((bits >= g_hi).sum())
            if c_lo >= TAKE:
                lo, count_lo = g_lo, c_lo
            else:
                hi = g_lo
            if c_hi >= TAKE:
                lo, count_lo = g_hi, c_hi
            else:
                hi = min(hi, g_hi)
            n, guess = bisect(bits, lo, hi, count_lo)
            n += 2
        steps.append(n)
    return float(np.mean(steps))


def main(length: int) -> dict:
    rows = [bits for bits in block_scores(length) if len(bits) > TAKE]
    out = {"length": length, "tokens": len(rows), "take": TAKE,
           "whole_range": float(np.mean([bisect(bits, 0, TOP, len(bits))[0] for bits in rows])),
           "group_maxima_bounds": float(np.mean([group_bounds(bits) for bits in rows]))}
    for chain in (4, 8):
        for spread in (1 << 21, 1 << 22, 1 << 23):
            out[f"chain_{chain}_spread_2^{spread.bit_length() - 1}"] = chained(rows, chain, spread)
    return out


if __name__ == "__main__":
    print(json.dumps(main(parse_len(sys.argv[1] if len(sys.argv) > 1 else "16k")), indent=1))
