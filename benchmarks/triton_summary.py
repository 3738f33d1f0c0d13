"""Short text summary of triton_bench.py JSON records (the last lines of a device run).

    python benchmarks/triton_summary.py run5.json [run5_topn.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt(x, nd=1):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main(paths):
    for path in paths:
        try:
            doc = json.load(open(path))
        except Exception as e:  # noqa: BLE001
            print(path, "unreadable:", e)
            continue
        for r in doc.get("results", []):
            if "error" in r:
                print("ERR", {k: r.get(k) for k in ("what", "topn", "variant", "L", "inputs")}, r["error"][:200])
            elif r.get("what") == "topn":
                print(f"topn {r['topn']:6s} L={r['L'] // 1024}K {r['inputs']:6s} fwd {fmt(r.get('fwd_ms'))} "
                      f"score {fmt(r.get('score_ms'))} topn {fmt(r.get('topn_ms'))} same={r.get('same_blocks_as_fused')} "
                      f"diff_rows={r.get('rows_differing_from_fused')}")
            elif r.get("what") == "tile":
                print(f"tile {r['variant']:16s} L={r['L'] // 1024}K {r['inputs']:6s} fwd {fmt(r.get('fwd_ms'))} "
                      f"slc_win {fmt(r.get('slc_win_ms'))} fb {fmt(r.get('fwdbwd_ms'))} dq {fmt(r.get('bwd_dq_ms'))} "
                      f"union {fmt(r.get('union_blocks_per_tile_mean'))} u/n {fmt(r.get('union_over_n'), 2)}")
            elif "fwd_ms" in r:
                per = r.get("per_kernel_fwd", {})
                print(f"L={r['L'] // 1024}K {r['inputs']:6s} fwd {fmt(r.get('fwd_ms'))} fb {fmt(r.get('fwdbwd_ms'))} "
                      f"cudnn {fmt(r.get('cudnn_causal_fwd_ms'))}/{fmt(r.get('cudnn_causal_fwdbwd_ms'))} "
                      f"lse {fmt(per.get('cmp_lse', {}).get('ms'), 2)} score {fmt(per.get('cmp_score', {}).get('ms'), 2)} "
                      f"sel {fmt(per.get('topn_select', {}).get('ms'), 2)} slcwin {fmt(per.get('slc_win', {}).get('ms'), 2)} "
                      f"union {fmt(r.get('union_blocks_per_tile_mean'))}")


if __name__ == "__main__":
    main(sys.argv[1:])
