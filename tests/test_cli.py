"""The ``nsaflex`` command line, through click's CliRunner (and a subprocess
where the real process matters: exit status, stderr, colours)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import nsaflex
from nsaflex.budget import attended_fraction
from nsaflex.cli.common import parse_length, parse_lengths
from nsaflex.cli.main import main, register_commands
from nsaflex.codegen import module_name
from nsaflex.errors import BackendUnavailable
from nsaflex.loader import bundled_patterns

BUNDLED = sorted(bundled_patterns())


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def assert_clean_failure(result: click.testing.Result, *fragments: str) -> None:
    """Exit 2, every fragment in the output, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    unwrapped = result.output.replace("\n", "")  # the console wraps long lines (paths)
    for fragment in fragments:
        assert fragment in unwrapped, (fragment, result.output)


# --- good input ------------------------------------------------------------------------------------


def test_bundled_patterns_are_known() -> None:
    assert {"videonsa", "nsa", "window", "qblock-small", "videonsa-qblock", "videonsa-q8", "videonsa-w512",
            "videonsa-release"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_pattern_compiles(name: str) -> None:
    result = run("compile", name, "--at", "8k,131072")
    assert result.exit_code == 0, result.output
    out = result.output
    assert name in out
    assert "plan: backend" in out and "attended fraction" in out
    assert "L = 8k" in out and "L = 128k" in out
    fraction = attended_fraction(nsaflex.load_pattern(name), 131072)
    assert f"{100 * fraction:.3g}%" in out


def test_compile_by_path_and_default_lengths() -> None:
    path = bundled_patterns()["videonsa"]
    result = run("compile", str(path))
    assert result.exit_code == 0, result.output
    for column in ("L = 8k", "L = 32k", "L = 128k"):
        assert column in result.output
    assert "2,304" in result.output and "all-vision input" in result.output


def test_compile_release_mode_and_the_decode_plan() -> None:
    """--mode lowers the release numerics (the plan says so, and that decode steps
    take the batched release entry); faithful plans name the batched decode."""
    release = json.loads(run("compile", "videonsa-release", "--mode", "videonsa_release", "--device", "cuda",
                             "--json", "-").stdout)
    assert release["plan"]["mode"] == "videonsa_release" and release["plan"]["backend"] == "flex"
    assert "release" in release["plan"] and release["decode"]["kernel"].startswith("batched torch release decode")
    faithful = json.loads(run("compile", "videonsa", "--device", "cuda", "--json", "-").stdout)
    assert faithful["plan"]["mode"] == "faithful" and "nsaflex.decoding" in faithful["decode"]["kernel"]
    shown = run("compile", "videonsa-release", "--mode", "videonsa_release", "--device", "cuda")
    assert shown.exit_code == 0 and "mode videonsa_release" in shown.output and "decode" in shown.output


def test_compile_release_mode_refuses_what_the_release_cannot_run(tmp_path: Path) -> None:
    assert_clean_failure(run("compile", "videonsa", "--mode", "videonsa_release"),
                         "videonsa.yaml", "hybrid.vision_keys", "videonsa-release")
    assert_clean_failure(run("compile", "videonsa-release", "--mode", "videonsa_release", "--emit", str(tmp_path)),
                         "--emit", "faithful mode")
    assert not any(tmp_path.iterdir())
    assert_clean_failure(run("compile", "videonsa", "--mode", "release"), "--mode", "videonsa_release")


@pytest.mark.parametrize("name", BUNDLED)
def test_json_output(name: str) -> None:
    result = run("compile", name, "--json", "--at", "65536,128k", "--backend", "reference")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    pattern = nsaflex.load_pattern(name)
    assert data["pattern"] == name and data["lengths"] == [65536, 131072]
    assert data["plan"]["pattern"] == name and data["plan"]["backend"] == "reference"
    assert {b["branch"] for b in data["plan"]["branches"]} >= set(pattern.branches)
    at = data["budget"]["at"]["131072"]
    assert at["attended_fraction"] == pytest.approx(attended_fraction(pattern, 131072), rel=1e-12)
    assert at["keys_per_query"] == pattern.keys_per_query
    closed = data["budget"]["closed_forms"]
    assert closed["pattern_name"] == name and set(closed["pairs"]) == set(pattern.branches)
    assert data["emitted"] is None


def test_json_includes_budget_at_length(tmp_path: Path) -> None:
    path = tmp_path / "bounded.yaml"
    path.write_text("extends: videonsa\nname: bounded\nbudget:\n  max_attended_fraction: 0.5\n  at_length: 12345\n")
    data = json.loads(run("compile", str(path), "--json").stdout)
    assert data["lengths"] == [8192, 12345, 32768, 131072]


def test_length_forms() -> None:
    assert parse_length("8k") == 8192
    assert parse_length("128K") == 131072
    assert parse_length("131072") == 131072
    assert parse_length("1m") == 1 << 20
    assert parse_length("1.5k") == 1536
    assert parse_lengths("128k, 8k,8192") == (8192, 131072)
    for bad in ("", "8q", "k", "-5", "0", "1.3k", "8k,", "1e5"):
        with pytest.raises(ValueError):
            parse_lengths(bad)


def test_layer_option(tmp_path: Path) -> None:
    path = tmp_path / "layered.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            extends: videonsa
            name: layered
            layers:
              - at: [0, 1]
                dense: true
              - at: [5]
                window: {size: 512}
            """
        )
    )
    dense = json.loads(run("compile", str(path), "--json", "--layer", "0", "--at", "4k").stdout)
    assert dense["layer"] == 0 and dense["plan"]["layer"] == 0
    assert dense["budget"]["at"]["4096"]["attended_fraction"] == 1.0
    wide = json.loads(run("compile", str(path), "--json", "--layer", "5", "--at", "4k").stdout)
    assert wide["budget"]["at"]["4096"]["keys_per_query"] == 64 * 32 + 512
    base = run("compile", str(path), "--at", "4k")
    assert base.exit_code == 0 and "per-layer overrides" in base.output
    assert_clean_failure(run("compile", str(path), "--layer", "28"), "--layer", "model.num_layers = 28")


def test_help_version_and_bench_hook() -> None:
    assert run("--help").exit_code == 0 and "compile" in run("--help").output
    assert run("compile", "--help").exit_code == 0
    assert nsaflex.__version__ in run("--version").output
    group = click.Group("g")
    register_commands(group, ("compile", "surely_not_a_module"))
    assert list(group.commands) == ["compile"]
    fake = type(sys)("nsaflex.cli.fakebench")
    fake.command = click.Command("fakebench", callback=lambda: click.echo("benched"))
    sys.modules["nsaflex.cli.fakebench"] = fake
    try:
        register_commands(group, ("fakebench",))
        assert CliRunner().invoke(group, ["fakebench"]).output == "benched\n"
    finally:
        del sys.modules["nsaflex.cli.fakebench"]


# --- --emit ---------------------------------------------------------------------------------------------


def _inputs_code() -> str:
    return textwrap.dedent(
        """
        import torch
        from nsaflex.reference import reference_attention

        def run_module(mod):
            p = mod.PATTERN
            m = p.model
            hq, hkv, d = m.query_heads or 4, m.kv_heads or 2, m.head_dim or 8
            g = torch.Generator().manual_seed(0)
            L = 11
            q = torch.randn(2, hq, L, d, generator=g, dtype=torch.float64)
            k = torch.randn(2, hkv, L, d, generator=g, dtype=torch.float64)
            v = torch.randn(2, hkv, L, d, generator=g, dtype=torch.float64)
            gates = None if p.gate.kind == "constant" else torch.rand(2, hq, L, len(p.branches), generator=g, dtype=torch.float64)
            types = None if p.hybrid is None else (torch.rand(2, L, generator=g) < 0.7).long()
            assert mod.compiled.cache_info().currsize == 0  # nothing built at import
            out = mod.attention(q, k, v, gates=gates, token_types=types)
            pooler = mod.compiled("cpu", d).pooler
            expected = reference_attention(q, k, v, p, gates, types, pooler)
            assert out.shape == q.shape and bool(torch.isfinite(out).all())
            torch.testing.assert_close(out, expected)
            return out
        """
    )


def test_emit_modules_import_and_run(tmp_path: Path) -> None:
    """Every bundled pattern emits a module that imports on its own (in a fresh
    process, away from the repository) and whose attention runs."""
    out_dir = tmp_path / "generated"
    modules = {}
    for name in BUNDLED:
        result = run("compile", name, "--emit", str(out_dir), "--backend", "reference", "--at", "64k")
        assert result.exit_code == 0, result.output
        assert "wrote" in result.output
        modules[name] = module_name(nsaflex.load_pattern(name))
        assert (out_dir / f"{modules[name]}.py").is_file()
    script = _inputs_code() + textwrap.dedent(
        f"""
        import importlib, sys
        import nsaflex
        from nsaflex.budget import attended_fraction
        sys.path.insert(0, {str(out_dir)!r})
        for name, module in {modules!r}.items():
            mod = importlib.import_module(module)
            assert mod.PATTERN == nsaflex.load_pattern(name), name
            assert mod.PLAN["backend"] == "reference" and mod.BACKEND == "reference"
            assert mod.ATTENDED_FRACTION[65536] == attended_fraction(mod.PATTERN, 65536)
            assert mod.KEYS_PER_QUERY == mod.PATTERN.keys_per_query
            assert mod.BUDGET[65536]["length"] == 65536
            run_module(mod)
            print("ran", name)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ran ") == len(BUNDLED)


def test_emit_with_json_reports_path(tmp_path: Path) -> None:
    result = run("compile", "window", "--json", "--emit", str(tmp_path / "a" / "b"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert Path(data["emitted"]) == tmp_path / "a" / "b" / "window.py"
    assert Path(data["emitted"]).is_file()


def test_emit_into_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    assert_clean_failure(run("compile", "window", "--emit", str(target)), "--emit")


# --- bad input: exit 2, located message, no traceback ---------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert_clean_failure(run("compile", missing), missing, "expected an existing pattern file or a bundled pattern name")


def test_misspelt_bundled_name() -> None:
    assert_clean_failure(run("compile", "videonsaa"), "videonsaa", "did you mean 'videonsa'?")


def test_bad_yaml_syntax(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: bad\nwindow: {size: 4\ngate: [\n")
    assert_clean_failure(run("compile", path), f"{path}:", "expected valid YAML")


def test_unknown_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: bad\nwindw:\n  size: 4\n")
    assert_clean_failure(run("compile", path), f"{path}:2:1: windw:", "did you mean 'window'?")


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: bad\nwindow:\n  sise: 4\n")
    assert_clean_failure(run("compile", path), f"{path}:3:3: window.sise:", "did you mean 'size'?")


def test_bad_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: bad\nwindow:\n  size: 0\n")
    assert_clean_failure(run("compile", path), f"{path}:3:3: window.size: expected an integer >= 1, found 0")


def test_semantic_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: bad
        compression: {block: 64, stride: 32}
        selection:
          block: 48
          count: 4
        """,
    )
    assert_clean_failure(run("compile", path), f"{path}:4:3: selection.block:", "multiple of compression.stride = 32")


def test_budget_violation(tmp_path: Path) -> None:
    path = _write(tmp_path, "extends: videonsa\nbudget:\n  max_attended_fraction: 0.01\n  at_length: 131072\n")
    assert_clean_failure(run("compile", path), f"{path}:3:3: budget.max_attended_fraction:")


@pytest.mark.parametrize("value", ["8q", "0", "8k,,16k", "-4", "1.3k"])
def test_bad_at_value(value: str) -> None:
    assert_clean_failure(run("compile", "videonsa", "--at", value), "Invalid value for '--at'", repr(value.strip()) if "," not in value else "")


def test_unknown_backend() -> None:
    assert_clean_failure(run("compile", "videonsa", "--backend", "flax"), "Invalid value for '--backend'", "'flax'")


def test_backend_unavailable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise BackendUnavailable("backend 'flex' cannot serve pattern 'videonsa' on cpu: testing")

    monkeypatch.setattr("nsaflex.plan.make_plan", refuse)
    assert_clean_failure(run("compile", "videonsa"), "error:", "cannot serve pattern 'videonsa' on cpu: testing")


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only NsaflexError is turned into a message: anything else is a bug."""

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("nsaflex.plan.make_plan", broken)
    result = run("compile", "videonsa")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_lone_surrogate_in_name(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name: "a\\ud800b"\nwindow: {size: 4}\n')
    assert_clean_failure(run("compile", path), f"{path}:1:7: name: expected text without lone surrogates")
    assert_clean_failure(run("compile", path, "--emit", str(tmp_path / "out")), f"{path}:1:7: name:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("a" * 300, "name: expected a name giving a module name of at most 100 characters (for --emit)"),
     ("nsaflex", "name: expected a name whose module nsaflex.py does not shadow the module 'nsaflex'")],
)
def test_emit_refuses_unusable_names(tmp_path: Path, name: str, fragment: str) -> None:
    """The error blames the pattern's name (in its file), not the folder."""
    path = _write(tmp_path, f"name: {name}\nwindow: {{size: 4}}\n")
    assert_clean_failure(run("compile", path, "--emit", str(tmp_path / "out")), f"{path}: {fragment}")
    assert not (tmp_path / "out").exists()


def test_emit_write_failure_names_the_path(tmp_path: Path) -> None:
    """A folder that cannot be made (here: under a regular file) is a bad
    --emit value: exit 2, naming the path that failed."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "sub"
    assert_clean_failure(run("compile", "window", "--emit", str(target)), "Invalid value for '--emit'", "cannot write")


@pytest.mark.parametrize(("value", "fragment"), [("a\x00b", "which holds a NUL byte"), ("", "found an empty string")])
def test_emit_folder_values_click_lets_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
                                               fragment: str) -> None:
    """A NUL byte (a ValueError in os.stat) and the empty string (the current
    folder) are usage errors of --emit."""
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(run("compile", "window", "--emit", value), "Invalid value for '--emit'", fragment)
    assert not list(tmp_path.iterdir())


def test_non_utf8_file_is_located(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\n# caf\xe9\nwindow: {size: 4}\n")
    assert_clean_failure(run("compile", str(path)), f"{path}:2:6: <document>: expected UTF-8 text, found byte 0xE9")


def test_long_extends_chain(tmp_path: Path) -> None:
    for i in range(999):
        (tmp_path / f"p{i}.yaml").write_text(f"extends: p{i + 1}.yaml\n")
    (tmp_path / "p999.yaml").write_text("name: base\nwindow: {size: 4}\n")
    assert_clean_failure(run("compile", str(tmp_path / "p0.yaml")), "extends: expected a chain of at most 32 files")


def test_undecodable_path_argument_prints(tmp_path: Path) -> None:
    """A path in bytes that are not UTF-8 (decoded with surrogates, as Python
    does for argv) is shown with escapes, on success and on failure."""
    raw = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.yaml")
    Path(raw).write_text("name: x\nwindow: {size: 4}\ngate: {kind: constant, values: [1.0]}\n")
    result = run("compile", raw)
    assert result.exit_code == 0, repr(result.exception)
    # The console wraps long paths (pytest-xdist's tmp paths are long): compare unwrapped.
    assert "\\udcff.yaml" in result.output.replace("\n", "")
    assert_clean_failure(run("compile", raw + "x"), "\\udcff.yamlx")
    result = run("compile", "window", "--emit", raw + "dir")
    assert result.exit_code == 0, repr(result.exception)
    assert "\\udcff.yamldir" in result.output.replace("\n", "")


def test_escape_sequences_from_a_pattern_do_not_reach_the_terminal(tmp_path: Path) -> None:
    """Name, description and keys may hold control characters (YAML's "\\e"):
    printed as escapes, on success and in errors."""
    path = _write(tmp_path, 'name: "x\\e[31mRED"\ndescription: "d\\e]0;title\\a\\r"\nwindow: {size: 4}\n')
    result = run("compile", path)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "\r" not in result.output
    assert "x\\x1b[31mRED" in result.output and "d\\x1b]0;title\\x07\\x0d" in result.output
    path = _write(tmp_path, 'name: x\nwindow: {"s\\e[2Jize": 4}\n', "key.yaml")
    result = run("compile", path)
    assert_clean_failure(result, "found s\\x1b[2Jize")
    assert "\x1b" not in result.output


def test_real_process_exit_status_and_red_message(tmp_path: Path) -> None:
    """The console entry point: status 2, red (under FORCE_COLOR), no traceback."""
    path = _write(tmp_path, "name: bad\nwindow:\n  size: -1\n")
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}
    env.pop("NO_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "nsaflex.cli.main", "compile", path],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert "\x1b[" in done.stderr and "31m" in done.stderr  # red
    assert f"{path}:3:3: window.size: expected an integer >= 1, found -1" in done.stderr.replace("\x1b[0m", "").replace(
        "\x1b[31m", ""
    )


# --- conventions shared by every subcommand --------------------------------------------------------

#: The smallest run of each subcommand (bench: the float64 reference, no baseline, one tiny length).
SMALLEST_RUN = {
    "compile": ("compile", "window", "--at", "4k"),
    "bench": ("bench", "window", "--device", "cpu", "--lengths", "64", "--heads", "2/1", "--dim", "8", "--dtype", "fp32",
              "--backends", "reference", "--baselines", "none", "--check-length", "0", "--rep", "1", "--quiet"),
    "show": ("show", "window", "--length", "16"),
    "patterns": ("patterns",),
    "inspect": ("inspect", str(Path(__file__).parent / "data" / "tiny-recording.json")),
}


def test_every_subcommand_has_a_smallest_run() -> None:
    assert set(SMALLEST_RUN) == set(main.commands)


@pytest.mark.parametrize("name", sorted(SMALLEST_RUN))
def test_json_option_is_the_same_in_every_subcommand(name: str, tmp_path: Path) -> None:
    """``--json FILE`` writes FILE and says so; ``--json -`` and ``--json`` alone
    put the document, and nothing else, on standard output; a FILE that cannot
    be written is refused (exit 2) before any work prints anything."""
    args = SMALLEST_RUN[name]
    assert "--json [FILE|-]" in run(name, "--help").output
    for flag in (("--json", "-"), ("--json",)):
        result = run(*args, *flag)
        assert result.exit_code == 0, result.output
        assert isinstance(json.loads(result.stdout), (dict, list))
    path = tmp_path / f"{name}.json"
    result = run(*args, "--json", str(path))
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(path.read_text()), (dict, list))
    assert f"wrote {path}" in result.output
    for bad in (tmp_path / "missing" / "x.json", tmp_path):
        result = run(*args, "--json", str(bad))
        assert_clean_failure(result, "--json")
        assert result.stdout == ""
    assert_clean_failure(run(*args, "--json", ""), "--json", "a file path or '-'")


def test_compile_json_file_keeps_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    result = run("compile", "window", "--json", str(path), "--backend", "reference")
    assert result.exit_code == 0, result.output
    assert "plan: backend reference" in result.stdout and "attended fraction" in result.stdout
    assert json.loads(path.read_text())["plan"]["backend"] == "reference"


PLAN_CASES = [(name, backend, device) for name in BUNDLED for backend, device in (("auto", "cpu"), ("reference", "cpu"),
                                                                                   ("triton", "cuda"))]


@pytest.mark.parametrize(("name", "backend", "device"), PLAN_CASES)
def test_plan_table_reads_at_80_columns(name: str, backend: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 80 columns no line is wider and every word of every branch's kernel,
    mask, constants and notes is printed whole: wrapped between words, never
    cut with an ellipsis nor split across lines."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # plan the compiled Triton kernels, as on a GPU host
    try:
        plan = nsaflex.make_plan(nsaflex.load_pattern(name), backend, device)
    except BackendUnavailable:
        pytest.skip(f"{backend} does not serve {name} on {device}")
    result = CliRunner().invoke(main, ["compile", name, "--backend", backend, "--device", device], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    printed = set(result.stdout.split())
    for branch in plan.branches:
        for word in " ".join((branch.kernel, branch.mask, *branch.notes)).split():
            if len(word) <= 56:  # the value column's width at 80 columns
                assert word in printed, (branch.branch, word)
        for key in branch.constants:
            assert any(token.startswith(f"{key}=") for token in printed), (branch.branch, key)
