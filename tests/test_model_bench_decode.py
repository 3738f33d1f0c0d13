"""benchmarks/model_bench.py's per-token decode timing in its ``--tiny`` CPU
mode: text and vision tokens over a prefilled cache, unpatched and patched,
each patched row naming the decode path its layers take."""

from __future__ import annotations

import json

from tests.test_model_bench import load


def test_tiny_run_times_text_and_vision_decode_steps(tmp_path):
    path = tmp_path / "decode.json"
    script = load("model_bench")
    argv = ["--tiny", "--lengths", "96", "--train-lengths", "--decode-lengths", "96", "--breakdown-length", "0",
            "--json", str(path)]
    assert script.main(argv) == 0
    record = json.loads(path.read_text())
    rows = {(row["config"], row["token"]): row for row in record["decode"]}
    assert set(rows) == {(config, token) for config in ("sdpa", "nsaflex-reference") for token in ("text", "vision")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["pass"] == "decode" and row["length"] == 96
        assert row["ms"] > 0 and len(row["ms_all"]) == 3 and row["logits_finite"] is True
    assert rows[("nsaflex-reference", "vision")]["decode_path"] == [
        "exact per-row (reference backend, float64, nsaflex.adapters.decode)"
    ]
    assert "decode_path" not in rows[("sdpa", "text")]
