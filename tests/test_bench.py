"""``nsaflex bench`` smoke tests on the CPU (small lengths), and the video input generator."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nsaflex import bench
from nsaflex.video_inputs import VideoSpec, random_qkv, selection_overlap, video_latents, video_qkv


@pytest.fixture
def runner(monkeypatch):
    # Eager flex keeps the smoke test free of CPU kernel compiles.
    monkeypatch.setenv("NSAFLEX_FLEX_MODE", "eager")
    from nsaflex.cli.main import main

    return lambda *args: CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


def test_bench_cpu_smoke_writes_every_figure(runner, tmp_path):
    path = tmp_path / "bench.json"
    result = runner("qblock-small", "--device", "cpu", "--lengths", "200,300", "--heads", "4/2", "--dim", "16", "--dtype", "fp32",
                    "--pass", "fwd,fwd+bwd", "--inputs", "random,video", "--backends", "flex", "--baselines", "sdpa,cudnn,fla",
                    "--check-length", "40", "--rep", "1", "--breakdown", "--json", str(path))
    assert result.exit_code == 0, result.output
    assert "cuDNN attention needs CUDA" in result.output
    document = json.loads(path.read_text())
    assert document["environment"]["torch"] == torch.__version__ and "triton" in document["environment"]
    assert "fla" in document["environment"]  # fla-core's version, null when not installed
    rows = document["results"]
    flex_rows = [r for r in rows if r["name"] == "flex"]
    assert len(flex_rows) == 2 * 2 * 2  # lengths x passes x inputs
    assert all(r["median_ms"] > 0 and r["tflops"] > 0 and "sdpa" in r["ratios"] for r in flex_rows)
    assert all(r["selection"]["count"] == 8 for r in flex_rows)
    stages = flex_rows[0]["breakdown"]
    assert {"selection: scores + top-n", "selection: flex", "window: flex", "compression: flex"} <= set(stages)
    assert all(value >= 0 for value in stages.values())
    assert "forward stages" in result.output
    assert "kernels of one call" in result.output
    assert all(r["kernels"] and all(ms > 0 for ms in r["kernels"].values()) for r in flex_rows)
    assert document["checks"]["flex"]["ok"]
    assert {item["inputs"] for item in document["selection"]} == {"random", "video"}
    assert all(0.0 <= item["mean_jaccard_neighbours"] <= 1.0 for item in document["selection"])
    skipped = {row["name"]: row["error"] for row in rows if row.get("error")}
    assert skipped["cudnn"].startswith("skipped") and skipped["fla"].startswith("skipped")


def test_bench_rejects_bad_options(runner):
    for args, text in ((("--heads", "28/5"), "--heads"), (("--pass", "backward"), "--pass"), (("--inputs", "noise"), "--inputs")):
        result = runner("window", "--device", "cpu", *args)
        assert result.exit_code == 2 and text in result.output


@pytest.mark.parametrize(("args", "fragments"), [
    (("--backends", "nope"), ("nope: unknown backend",)),
    (("--backends", "flx", "--baselines", "cudnn,nope"),
     ("flx: unknown backend", "did you mean 'flex'", "nope: unknown baseline")),
])
def test_bench_refuses_unknown_names_before_running(runner, tmp_path, monkeypatch, args, fragments):
    import nsaflex

    compiled = []
    monkeypatch.setattr(nsaflex, "compile", lambda *a, **kw: compiled.append(a))
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                    "--rep", "1", *args, "--json", str(path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert not compiled and not path.exists()


def test_bench_refuses_a_backend_that_cannot_serve_the_pattern_before_running(runner, tmp_path):
    path = tmp_path / "bench.json"
    # The triton score pass steps over a power of two of compressed tokens: l'/d = 3 is refused.
    pattern = tmp_path / "thirds.yaml"
    pattern.write_text("name: thirds\ncompression: {block: 16, stride: 16}\nselection: {block: 48, count: 2}\n"
                       "window: {size: 16}\ngate: {kind: constant, values: [1.0, 1.0, 1.0]}\n")
    result = runner(str(pattern), "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "16", "--dtype", "fp32",
                    "--backends", "flex,triton", "--baselines", "sdpa", "--rep", "1", "--json", str(path))
    assert result.exit_code == 2, result.output
    assert "--backends" in result.output and "triton:" in result.output and "Traceback" not in result.output
    assert not path.exists()


def test_bench_refuses_lengths_past_the_device_memory(runner, tmp_path):
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64,99999999999k", "--heads", "2/1", "--dim", "8",
                    "--dtype", "fp32", "--backends", "flex", "--baselines", "sdpa", "--rep", "1", "--json", str(path))
    assert result.exit_code == 2, result.output
    assert "--lengths" in result.output and "GiB" in result.output and "Traceback" not in result.output
    assert not path.exists()


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_refuses_an_unwritable_output_path_before_running(runner, tmp_path, monkeypatch, option):
    import nsaflex

    compiled = []
    monkeypatch.setattr(nsaflex, "compile", lambda *a, **kw: compiled.append(a))
    for path in (tmp_path / "missing" / "x.out", tmp_path):
        result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                        "--backends", "flex", "--baselines", "sdpa", "--rep", "1", option, str(path))
        assert result.exit_code == 2, result.output
        assert option in result.output and "Traceback" not in result.output
    assert not compiled


def test_bench_with_a_failed_measurement_writes_the_rest_and_fails(runner, tmp_path, monkeypatch):
    def broken(name, *args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench, "_measure_backend", broken)
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                    "--backends", "reference", "--baselines", "sdpa", "--check-length", "0", "--rep", "1", "--json", str(path))
    assert result.exit_code == 2, result.output
    assert "1 of the run's measurements failed" in result.output and "kernel exploded" in result.output
    rows = {row["name"]: row for row in json.loads(path.read_text())["results"]}
    assert rows["sdpa"]["median_ms"] > 0 and "kernel exploded" in rows["reference"]["error"]


def test_bench_with_nothing_to_run_says_why_and_fails(runner, tmp_path):
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--backends", "", "--baselines", "none", "--json", str(path))
    assert result.exit_code == 2, result.output
    assert "nothing to run" in result.output and "no backend or baseline was requested" in result.output
    assert "Traceback" not in result.output and not path.exists()


def test_bench_with_a_baseline_that_cannot_run_here_skips_it_and_runs_the_rest(runner, tmp_path):
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                    "--backends", "", "--baselines", "sdpa,cudnn", "--rep", "1", "--json", str(path))
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(path.read_text())["results"]}
    assert rows["sdpa"]["median_ms"] > 0 and rows["cudnn"]["error"].startswith("skipped")


def test_breakdown_names_the_longest_kernels_and_sums_the_rest():
    times = {f"k{i}": float(i) for i in range(12)}  # k0 takes no time and is left out
    kept = bench.longest(times, keep=3)
    assert list(kept) == ["k11", "k10", "k9", bench.OTHER_KERNELS]
    assert kept[bench.OTHER_KERNELS] == sum(range(1, 9))
    assert bench.OTHER_KERNELS not in bench.longest({"a": 1.0, "b": 0.0}, keep=3)


def test_breakdown_profiles_a_backend_without_stages(runner, tmp_path):
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                    "--backends", "reference", "--baselines", "none", "--pass", "fwd,fwd+bwd", "--check-length", "0",
                    "--rep", "1", "--breakdown", "--json", str(path))
    assert result.exit_code == 0, result.output
    rows = json.loads(path.read_text())["results"]
    assert [row["passes"] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        assert 0 < len(row["kernels"]) <= bench.BREAKDOWN_KERNELS + 1 and row["breakdown"] is None
        named = [ms for kernel, ms in row["kernels"].items() if kernel != bench.OTHER_KERNELS]
        assert named == sorted(named, reverse=True) and all(ms > 0 for ms in row["kernels"].values())
    assert "kernels of one call" in result.output


def test_bench_atomic_flag_reaches_the_compile_and_the_record(runner, tmp_path, monkeypatch):
    import nsaflex

    seen = []
    real = nsaflex.compile
    monkeypatch.setattr(nsaflex, "compile", lambda *a, **kw: seen.append(kw.get("deterministic")) or real(*a, **kw))
    path = tmp_path / "bench.json"
    result = runner("window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
                    "--backends", "reference", "--baselines", "none", "--rep", "1", "--atomic", "--json", str(path))
    assert result.exit_code == 0, result.output
    assert seen == [False] and "atomic gradients" in result.output
    assert json.loads(path.read_text())["config"]["deterministic"] is False


def test_environment_records_fla_core_version(monkeypatch):
    import importlib.metadata
    import importlib.util

    def installed_as(distribution):
        def version(name):
            if name == distribution:
                return "0.4.9"
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", installed_as("flash-linear-attention"))
    assert bench.environment("cpu")["fla"] == "0.4.9"
    monkeypatch.setattr(importlib.metadata, "version", installed_as("fla-core"))
    assert bench.environment("cpu")["fla"] == "0.4.9"
    # Not installed: null, not an error, even when the module lookup itself fails.
    monkeypatch.setattr(importlib.metadata, "version", installed_as("something-else"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert bench.environment("cpu")["fla"] is None

    def broken(name, *args):
        raise ValueError("broken sys.path entry")

    monkeypatch.setattr(importlib.util, "find_spec", broken)
    env = bench.environment("cpu")
    assert "fla" in env and env["fla"] is None


def test_union_columns_say_what_they_divide_and_the_tile():
    import io

    from rich.console import Console

    document = {
        "environment": {"device": "cpu", "cpu": "x86_64", "torch": "2", "triton": "3", "fla": None},
        "config": {"pattern": "p", "batch": 1, "query_heads": 4, "kv_heads": 2, "dim": 16, "dtype": "float32", "baselines": []},
        "results": [{"length": 256, "inputs": "random", "passes": "fwd", "kind": "backend", "name": "flex", "median_ms": 1.0,
                     "tflops": 1.0, "peak_mib": None, "ratios": {}, "note": "", "error": None,
                     "selection": {"mean_union_blocks": 12.5, "count": 8, "q_block": 64}}],
        "checks": {},
        "selection": [{"length": 256, "inputs": "random", "granularity": "token", "count": 8, "mean_jaccard_neighbours": 0.5,
                       "query_tile": bench.UNION_TILE, "tile_mean_union_blocks": 20.0, "tile_union_over_selected": 2.5}],
    }
    console = Console(file=io.StringIO(), width=400, highlight=False)
    bench.print_tables(document, console)
    text = console.file.getvalue()
    assert "union / n" not in text and "union/tile" not in text
    assert bench.UNION_COLUMN in text and "12.5/8 @64q" in text
    assert "union blocks per 128-query tile" in text
    assert "union blocks / selected blocks (per 128-query tile)" in text and "2.50" in text


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(bench.NsaflexError, match="matplotlib"):
        bench.write_plot({"results": [], "environment": {"device": "cpu"}, "config": {"pattern": "x"}}, "/tmp/never.png")


def test_attended_pairs_and_flops():
    import nsaflex

    pattern = nsaflex.load_pattern("window")
    assert bench.attended_pairs(pattern, 4) == 10  # window 512 > L: dense causal
    assert bench.flops_for(10, 2, 8, 1, "fwd") == 4 * 8 * 10 * 2
    assert bench.flops_for(10, 2, 8, 1, "fwd+bwd") == 3.5 * 4 * 8 * 10 * 2


def test_video_inputs_are_frame_structured():
    spec = VideoSpec(patches=32, rank=8)
    latent = video_latents(32 * 6, spec, seed=1)
    assert latent.shape == (192, 8)
    frames = latent.view(6, 32, 8)
    # Consecutive frames correlate strongly (rho), distant ones less.
    near = torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1).mean()
    far = torch.nn.functional.cosine_similarity(frames[5], torch.roll(frames[0], 16, dims=0), dim=-1).mean()
    assert near > 0.8 and near > far
    q, k, v = video_qkv(2, 4, 2, 100, 16, spec=spec)
    assert q.shape == (2, 4, 100, 16) and k.shape == v.shape == (2, 2, 100, 16)
    r = random_qkv(1, 2, 1, 10, 4)
    assert r[0].shape == (1, 2, 10, 4)


def test_selection_overlap():
    same = torch.tensor([[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]])
    assert selection_overlap(same) == 1.0
    disjoint = torch.tensor([[[[0, 1, -1], [2, 3, -1]]]])
    assert selection_overlap(disjoint) == 0.0
    half = torch.tensor([[[[0, 1], [1, 2]]]])
    assert selection_overlap(half) == pytest.approx(1 / 3)


def test_plot_writes_a_png(tmp_path):
    # matplotlib is in the test extra: no skip, so CI runs the PNG writer.
    document = {"results": [{"name": "flex", "passes": "fwd", "inputs": "video", "kind": "backend", "length": n, "median_ms": n / 1000}
                            for n in (1024, 2048)], "environment": {"device": "cpu"}, "config": {"pattern": "x"}}
    bench.write_plot(document, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --- benchmarks/results.py: RESULTS.md and README's table from the committed JSON ---------------


@pytest.fixture(scope="module")
def results_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results.py"
    spec = importlib.util.spec_from_file_location("benchmark_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_and_readme_table_are_what_the_json_generates(results_script):
    assert results_script.RESULTS_MD.read_text() == results_script.render_results(), "run python benchmarks/results.py"
    readme = results_script.README.read_text()
    assert readme == results_script.with_readme_block(readme, results_script.readme_block()), "run python benchmarks/results.py"
    assert results_script.main(["--check"]) == 0


def _bench_document(label: str | None, scale: float) -> dict:
    rows = []
    for length in (8192, 131072):
        for passes in ("fwd", "fwd+bwd"):
            base = length / 1000.0 * (3.0 if passes == "fwd+bwd" else 1.0)
            rows.append({"length": length, "inputs": "any", "passes": passes, "kind": "baseline", "name": "cudnn",
                         "median_ms": base, "ratios": {}, "error": None})
            rows.append({"length": length, "inputs": "video", "passes": passes, "kind": "backend", "name": "triton",
                         "median_ms": base / 4 * scale, "ratios": {"cudnn": 4 / scale}, "error": None})
    document = {"complete": True, "command": "nsaflex bench videonsa --backends triton --baselines cudnn",
                "environment": {"date": "2026-12-07T10:00:00+00:00", "device": "cuda", "gpu": "GPU", "torch": "2", "triton": "3"},
                "config": {"pattern": "videonsa", "batch": 1, "query_heads": 28, "kv_heads": 4, "dim": 128, "dtype": "bfloat16",
                           "backends": ["triton"], "baselines": ["cudnn"]},
                "results": rows, "checks": {}}
    if label is not None:
        document["label"] = label
    return document


@pytest.mark.parametrize("layout", ["documents", "rows"])
def test_results_renders_a_two_label_comparison_side_by_side(results_script, tmp_path, layout):
    old, new = _bench_document("7414dbb", 1.0), _bench_document("new", 0.98)
    if layout == "documents":
        record = [old, new]
    else:  # one document whose rows carry their label
        record = {**old, "results": [{**row, "label": d["label"]} for d in (old, new) for row in d["results"]]}
        del record["label"]
    (tmp_path / "compare.json").write_text(json.dumps(record))
    text = results_script.render_results(tmp_path)
    assert "## Comparisons measured in one run" in text and "## Kernel benchmarks" not in text
    header = next(line for line in text.splitlines() if line.startswith("| L |"))
    assert "7414dbb ms | new ms | new / 7414dbb" in header
    row = next(line for line in text.splitlines() if line.startswith("| 128K | video | fwd | triton"))
    assert row.split("|")[-2].strip() == "0.980"
    baseline = next(line for line in text.splitlines() if line.startswith("| 128K | any | fwd+bwd | cudnn"))
    assert baseline.split("|")[-2].strip() == "1.000"


def test_results_renders_bench_gpu_tests_and_notes(results_script, tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(_bench_document(None, 1.0)))
    (tmp_path / "gpu.json").write_text(json.dumps({"record": "gpu-tests", "command": "pytest -q tests", "device": "GPU",
                                                   "date": "2026-12-07", "passed": 41, "failed": 1, "deselected": 2}))
    (tmp_path / "notes.md").write_text("- a figure kept by hand\n")
    text = results_script.render_results(tmp_path)
    assert "| 128K | 131 | 32.8 (x4.00) | 393 | 98.3 (x4.00) |" in text
    assert "**41 passed, 1 failed, 2 deselected**" in text and "pytest -q tests" in text
    assert text.rstrip().endswith("- a figure kept by hand")
    block = results_script.readme_block(tmp_path)
    assert "| 8K | 8.19 | 2.05 (x4.00) | 24.6 | 6.14 (x4.00) |" in block
    (tmp_path / "stray.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="stray.json"):
        results_script.render_results(tmp_path)


def test_results_renders_a_whole_model_record(results_script, tmp_path):
    def row(passes, length, config, ms, peak):
        return {"pass": passes, "length": length, "config": config, "backend": config.removeprefix("nsaflex-"), "ms": ms,
                "ms_all": [ms], "peak_gib": peak}

    record = {
        "record": "model-bench", "command": "python benchmarks/model_bench.py --backends triton,flex --checkpointing",
        "environment": {"device": "GPU", "gpu_memory_gib": 79.2, "torch": "2", "triton": "3", "transformers": "5",
                        "date": "2026-12-07T10:00:00+00:00"},
        "model": {"shape": "Qwen2.5-VL-7B text", "layers": 28, "hidden": 3584, "query_heads": 28, "kv_heads": 4, "head_dim": 128,
                  "mlp": 18944, "dtype": "bfloat16", "weights": "random"},
        "pattern": "videonsa", "text_tokens": 200, "checkpointing": True, "complete": False,
        "configs": ["sdpa", "nsaflex-triton", "nsaflex-flex"],
        "rows": [row("prefill", 131072, "sdpa", 9370.0, 30.5), row("prefill", 131072, "nsaflex-triton", 4960.0, 31.0),
                 row("prefill", 131072, "nsaflex-flex", 6000.0, 33.25), row("train", 32768, "sdpa", 3000.0, 40.0),
                 row("train", 32768, "nsaflex-triton", 2000.0, 42.0),
                 {"pass": "train", "length": 32768, "config": "nsaflex-flex", "backend": "flex", "error": "OutOfMemoryError: CUDA"}],
        "breakdown": [{"config": "nsaflex-triton", "backend": "triton", "length": 131072, "pass": "prefill",
                       "stages_ms": {"projections": 40.0, "kernels": 38.0, "other": 2.5, "layer": 80.5}}],
        "decode": [{"pass": "decode", "token": "vision", "length": 32768, "config": "sdpa", "backend": "sdpa", "ms": 20.0},
                   {"pass": "decode", "token": "vision", "length": 32768, "config": "nsaflex-triton", "backend": "triton",
                    "ms": 25.0},
                   {"pass": "decode", "token": "text", "length": 32768, "config": "nsaflex-triton", "backend": "triton",
                    "error": "skipped: deadline"}],
    }
    (tmp_path / "model.json").write_text(json.dumps(record))
    text = results_script.render_results(tmp_path)
    assert "## The whole model (`benchmarks/model_bench.py`)" in text
    assert "| 128K | 9370 | 4960 (x1.89) | 6000 (x1.56) | 30.5 | 31.0 | 33.2 |" in text
    assert "Training step (forward + backward), gradient checkpointing:" in text
    assert "| 32K | 3000 | 2000 (x1.50) | - | 40.0 | 42.0 | - |" in text
    assert "- nsaflex-flex train L=32768: OutOfMemoryError: CUDA" in text
    assert "- the run stopped before its end" in text
    assert "at L = 128K, ms of CUDA device time by stage:" in text
    assert "| kernels | 38.0 |" in text and "| layer | 80.5 |" in text
    assert "| 32K | vision | 20.0 | 25.0 (x0.80) |" in text
    assert "- nsaflex-triton decode text L=32768: skipped: deadline" in text


# --- dtype names, progress -------------------------------------------------------------------------

#: The smallest run: the float64 reference backend on a tiny window pattern, no baseline, no spot check.
TINY = ("window", "--device", "cpu", "--heads", "2/1", "--dim", "8", "--backends", "reference", "--baselines", "none",
        "--check-length", "0", "--rep", "1")


@pytest.mark.parametrize(("name", "recorded"), [
    ("float32", "float32"), ("fp32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16"),
    ("float16", "float16"), ("fp16", "float16"), ("torch.float32", "float32"), ("BF16", "bfloat16"),
])
def test_bench_takes_dtype_names_as_torch_spells_them_and_short(runner, name, recorded):
    result = runner(*TINY, "--lengths", "64", "--dtype", name, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["dtype"] == recorded


@pytest.mark.parametrize("name", ["float64", "int8", "bf"])
def test_bench_refuses_other_dtype_names_listing_the_accepted_ones(runner, name):
    result = runner(*TINY, "--lengths", "64", "--dtype", name)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--dtype" in result.output and "bfloat16 (bf16)" in result.output and repr(name) in result.output


def test_bench_reports_each_configuration_on_stderr_and_quiet_silences_it(runner):
    args = (*TINY, "--lengths", "64,128", "--pass", "fwd,fwd+bwd", "--dtype", "float32")
    result = runner(*args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == [f"[{i}/4" for i in range(1, 5)]
    assert "reference L=64 fwd random: " in lines[0] and lines[0].endswith(" s)") and " ms (" in lines[0]
    assert "reference L=128 fwd+bwd random" in lines[3]
    assert "nsaflex bench window" in result.stdout and "[1/4]" not in result.stdout
    quiet = runner(*args, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_bench_notes_before_each_first_call_that_may_compile(runner, monkeypatch):
    """The note comes before the first call of each configuration of a
    compiling backend (here the reference, counted as one) and of a compiled
    baseline, and never for the reference or SDPA."""
    events: list[str] = []
    say = bench.BenchProgress.say
    monkeypatch.setattr(bench.BenchProgress, "say", lambda self, line: (events.append(line), say(self, line)))
    runner_of = bench._runner

    def recorded_runner(call, grads):
        fn = runner_of(call, grads)

        def logged():
            events.append("call")
            return fn()
        return logged

    monkeypatch.setattr(bench, "_runner", recorded_runner)
    args = (*TINY[:-6], "--baselines", "sdpa", "--check-length", "0", "--rep", "1", "--lengths", "64,128", "--dtype", "fp32")
    result = runner(*args)
    assert result.exit_code == 0, result.output
    assert not any("compiling" in line for line in events)  # reference and SDPA compile nothing

    events.clear()
    monkeypatch.setattr(bench, "UNCOMPILED_BACKENDS", frozenset())
    result = runner(*args)
    assert result.exit_code == 0, result.output
    notes = [i for i, event in enumerate(events) if "compiling the kernels for this shape (first call;" in event]
    assert [events[i].split(":")[0] for i in notes] == ["reference L=64 fwd random", "reference L=128 fwd random"]
    assert all(events[i + 1] == "call" for i in notes)
    assert sum("compiling" in line for line in result.stderr.splitlines()) == 2
