"""Packaging: what ``pip install`` really produces.

The install tests build fresh virtual environments, so they run only with
``NSAFLEX_PACKAGING_TESTS=1``. To avoid reinstalling torch and friends, each
environment sees the current environment's third-party packages through a
path file (nsaflex's own install is left out of it), and nsaflex is installed
from a copy of this tree with ``--no-deps --no-build-isolation --no-index``.

The README/CI consistency checks at the bottom are cheap and always run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
packaging = pytest.mark.skipif(
    os.environ.get("NSAFLEX_PACKAGING_TESTS") != "1",
    reason="builds virtual environments: set NSAFLEX_PACKAGING_TESTS=1",
)


def _sh(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 600)
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


def _copy_tree(dest: Path) -> Path:
    """The files git would ship (tracked and untracked, not ignored)."""
    listed = _sh(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _dependencies_dir(dest: Path) -> Path:
    """Links to this environment's site-packages entries, nsaflex's own left out."""
    dest.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        low = entry.name.lower()
        if low.startswith(("nsaflex", "__editable__")) or low in ("cli", "codegen", "patterns") or low.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


class Env:
    def __init__(self, path: Path, source: Path, deps: Path, elsewhere: Path) -> None:
        self.path = path
        self.source = source
        self.elsewhere = elsewhere
        _sh([sys.executable, "-m", "venv", "--without-pip", str(path)])
        self.python = path / "bin" / "python"
        purelib = _sh([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        self.site = Path(purelib)
        # A plain path line: the directory joins sys.path, its own .pth files are not run.
        (self.site / "zz_nsaflex_test_deps.pth").write_text(str(deps) + "\n")
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env["PATH"] = f"{path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

    def pip_install(self, *args: str) -> None:
        _sh(
            [sys.executable, "-m", "pip", "--python", str(self.python), "install", "-q",
             "--no-deps", "--no-build-isolation", "--no-index", *args],
            cwd=self.elsewhere, env=self.env,
        )

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return _sh(list(args), cwd=cwd or self.elsewhere, env=self.env)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packaging")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return {
        "base": base,
        "source": _copy_tree(base / "source"),
        "deps": _dependencies_dir(base / "deps"),
        "elsewhere": elsewhere,
    }


CHECK_IMPORTS = """
import importlib.util, json, sys
import nsaflex, nsaflex.cli, nsaflex.cli.main, nsaflex.codegen, nsaflex.patterns
from nsaflex.loader import bundled_patterns
assert importlib.util.find_spec("cli") is None, importlib.util.find_spec("cli")
assert importlib.util.find_spec("codegen") is None, importlib.util.find_spec("codegen")
assert "videonsa" in bundled_patterns()
nsaflex.codegen.template()
print(json.dumps({m: sys.modules[m].__file__ for m in ("nsaflex", "nsaflex.cli", "nsaflex.codegen", "nsaflex.patterns")}))
"""


def _check_env(env: Env, expected_root: Path) -> None:
    import json

    files = json.loads(env.run(str(env.python), "-c", CHECK_IMPORTS).stdout)
    for module, file in files.items():
        assert Path(file).resolve().is_relative_to(expected_root.resolve()), (module, file, expected_root)
    # The console script is on PATH and works from an unrelated directory.
    assert shutil.which("nsaflex", path=env.env["PATH"]) == str(env.path / "bin" / "nsaflex")
    compiled = env.run("nsaflex", "compile", "videonsa", "--at", "8k", "--backend", "reference")
    assert "videonsa" in compiled.stdout and "attended fraction" in compiled.stdout
    emit_dir = env.elsewhere / f"emitted-{env.path.name}"
    env.run("nsaflex", "compile", "window", "--emit", str(emit_dir), "--backend", "reference")
    imported = env.run(str(env.python), "-c", "import window; print(window.PATTERN.name, window.KEYS_PER_QUERY)", cwd=emit_dir)
    assert imported.stdout.split() == ["window", "512"]
    bad = subprocess.run(["nsaflex", "compile", "no-such-pattern"], capture_output=True, text=True, env=env.env, cwd=env.elsewhere)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no-such-pattern" in bad.stderr


@packaging
def test_regular_install(workspace: dict[str, Path]) -> None:
    env = Env(workspace["base"] / "venv-regular", workspace["source"], workspace["deps"], workspace["elsewhere"])
    env.pip_install(str(workspace["source"]))
    _check_env(env, env.site)
    # Installed under nsaflex/, nothing at the top level of site-packages.
    assert not (env.site / "cli").exists() and not (env.site / "codegen").exists()
    assert not (env.site / "patterns").exists()
    for name in ("cli/main.py", "cli/compile.py", "codegen/__init__.py", "codegen/templates/module.py.tmpl", "patterns/videonsa.yaml"):
        assert (env.site / "nsaflex" / name).is_file(), name


@packaging
def test_editable_install(workspace: dict[str, Path]) -> None:
    env = Env(workspace["base"] / "venv-editable", workspace["source"], workspace["deps"], workspace["elsewhere"])
    env.pip_install("-e", str(workspace["source"]))
    _check_env(env, workspace["source"])
    assert not (env.site / "cli").exists() and not (env.site / "codegen").exists()
    # Editable: a change in the tree is seen without reinstalling.
    (workspace["source"] / "patterns" / "extra.yaml").write_text("name: extra\nwindow: {size: 8}\ngate: {kind: constant, values: [1.0]}\n")
    out = env.run("nsaflex", "compile", "extra", "--at", "1k", "--backend", "reference")
    assert "extra" in out.stdout


# --- README and CI: always run (cheap) --------------------------------------------------------------------


def _readme_commands() -> list[str]:
    done = _sh(["bash", str(ROOT / ".ci" / "run"), "--print"], timeout=60)
    return done.stdout.splitlines()


def test_ci_runs_the_readme_commands() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    setup, test = _readme_commands()
    readme = (ROOT / "README.md").read_text()
    assert setup in readme and test in readme
    assert "python3 -m venv" in setup and "command -v nvidia-smi" in setup and "pip install torch==2.13.0" in setup
    assert "pip install -e '.[test]'" in setup and setup.endswith("nsaflex compile patterns/videonsa.yaml")
    assert "python -m pytest -q" in test and "TRITON_INTERPRET=1" in test
    # The CPU torch goes in before the project, so pip never reaches for CUDA wheels.
    assert setup.index("torch==2.13.0") < setup.index("pip install -e")


def test_ci_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text("# nothing here\n<!-- setup -->\n```sh\necho a\necho b\n```\n<!-- /setup -->\n")
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run"), "--print"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "exactly one command" in done.stderr


def test_the_test_extra_installs_what_the_suite_imports() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {requirement.split(">")[0].split("=")[0].split("[")[0].strip() for requirement in extras["test"]}
    # matplotlib: tests/test_bench.py writes a plot; pytest-xdist: the README's `-n 2`.
    assert {"pytest", "hypothesis", "pytest-xdist", "matplotlib"} <= names
    # `pip install 'nsaflex[plot]'`, as the --plot error says, keeps working for users.
    assert any(requirement.startswith("matplotlib") for requirement in extras["plot"])
