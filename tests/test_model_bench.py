"""benchmarks/model_bench.py in its ``--tiny`` CPU mode: the record it writes
holds the unpatched and the patched model's measurements (prefill with its
first token, training step), the per-stage breakdown of a patched layer, and
benchmarks/results.py renders it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    path = tmp_path_factory.mktemp("model_bench") / "model-bench.json"
    script = load("model_bench")
    assert script.main(["--tiny", "--json", str(path)]) == 0
    return script, json.loads(path.read_text()), path


def test_tiny_run_measures_the_unpatched_and_the_patched_model(tiny_record):
    script, record, _ = tiny_record
    assert record["record"] == "model-bench" and record["complete"]
    assert record["configs"] == ["sdpa", "nsaflex-reference"]
    assert record["model"]["layers"] == 2 and record["model"]["shape"] == "tiny"
    assert record["environment"]["torch"] and record["command"].startswith("python benchmarks/model_bench.py --tiny")
    rows = {(row["pass"], row["config"]): row for row in record["rows"]}
    assert set(rows) == {(passes, config) for passes in ("prefill", "train") for config in record["configs"]}
    for (passes, config), row in rows.items():
        assert "error" not in row, row
        assert row["ms"] > 0 and len(row["ms_all"]) == 1 and row["length"] == 160
        if passes == "prefill":
            assert row["logits_finite"] is True and isinstance(row["first_token"], int)
    assert rows[("prefill", "nsaflex-reference")]["backend"] == "reference"


def test_tiny_run_breaks_one_patched_layer_into_stages(tiny_record):
    script, record, _ = tiny_record
    (entry,) = record["breakdown"]
    assert entry["config"] == "nsaflex-reference" and entry["length"] == 160
    stages = entry["stages_ms"]
    assert set(stages) == set(script.STAGES) | {"layer"}
    assert all(ms >= 0 for ms in stages.values())
    # Every stage lies inside the layer; "other" is what the named stages leave.
    assert sum(stages[name] for name in script.STAGES) == pytest.approx(stages["layer"], rel=1e-6)
    for name in ("projections", "gates", "kernels", "output", "mlp"):
        assert stages[name] > 0, name


def test_the_tiny_record_renders(tiny_record, tmp_path):
    _, _, path = tiny_record
    results = load("results")
    (tmp_path / "model-bench.json").write_text(path.read_text())
    text = results.render_results(tmp_path)
    assert "## The whole model (`benchmarks/model_bench.py`)" in text
    assert "| L | sdpa ms | nsaflex-reference ms | sdpa peak GiB | nsaflex-reference peak GiB |" in text
    assert "| kernels |" in text and "python benchmarks/model_bench.py --tiny" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", ","], "comma-separated list of nsaflex backends"),
        (["--text", "200"], "--text 200 must be below every length (found 160)"),
    ],
)
def test_bad_options_are_refused_before_running(argv, message, capsys, tmp_path):
    script = load("model_bench")
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--json", str(tmp_path / "out.json"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_kernels_are_told_apart_by_name():
    """On CUDA the compiled attention's kernels are classed by name: nsaflex's
    Triton kernels and FlexAttention's are the kernels, SDPA's the text path,
    PyTorch's own (gathers, copies, elementwise) the packing around them."""
    pytest.importorskip("triton")
    script = load("model_bench")
    names = script.sparse_kernel_names()
    assert {"cmp_lse_kernel", "slc_win_kernel"} <= names
    assert script._kernel_kind("slc_win_kernel", names) == "kernels"
    assert script._kernel_kind("triton_tem_fused_flex_attention_0", names) == "kernels"
    assert script._kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)", names) == "text path"
    assert script._kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)", names) == "token-class packing"
    assert script._kernel_kind("void at::native::index_elementwise_kernel<128, 4>(long)", names) == "token-class packing"
