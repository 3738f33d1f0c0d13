"""benchmarks/qblock_fidelity.py (the query-block fidelity table) on the CPU:
a tiny run through the reference backend, and its block-overlap measure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qblock_fidelity.py"


def _script():
    spec = importlib.util.spec_from_file_location("qblock_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blocks_in_common_counts_the_token_lists_share():
    fidelity = _script()
    token = torch.tensor([[[[0, 2, -1], [1, 3, 5], [-1, -1, -1]]]])
    tiled = torch.tensor([[[[2, 0, -1], [1, 4, -1], [7, -1, -1]]]])
    # query 0: both of 2; query 1: one of 3; query 2 has no per-token block (skipped)
    assert abs(fidelity.blocks_in_common(tiled, token, chunk=1) - (1.0 + 1 / 3) / 2) < 1e-12
    assert fidelity.blocks_in_common(token, token) == 1.0


def test_tiny_run_writes_the_table(tmp_path):
    fidelity = _script()
    out_json, out_md = tmp_path / "rows.json", tmp_path / "table.md"
    code = fidelity.main(["--device", "cpu", "--backend", "reference", "--length", "320", "--heads", "2/1",
                          "--dim", "16", "--count", "2", "--tiles", "4", "64", "--inputs", "video", "random",
                          "--json", str(out_json), "--md", str(out_md)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(row["inputs"], row["m"]) for row in rows] == [("video", 4), ("video", 64), ("random", 4), ("random", 64)]
    for row in rows:
        assert row["backend"] == "reference" and row["length"] == 320
        assert row["output_error"] >= 0 and row["selection_error"] >= 0
        assert 0.0 <= row["blocks_in_common"] <= 1.0
    # tiles of 64 queries share one choice among more queries than tiles of 4
    assert rows[1]["blocks_in_common"] < 1.0
    assert "| video | 64 | 320 | reference |" in out_md.read_text()
