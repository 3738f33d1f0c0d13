"""Every example of README.md runs verbatim on a CPU install.

The fenced ``sh`` and ``python`` blocks run in a subprocess, in a scratch
folder that links every top-level entry of the checkout (so ``patterns/...``
resolves as in the checkout, and what an example writes lands in the scratch
folder), with this interpreter's environment first on PATH (``nsaflex`` and
``python`` are the installed ones). ``yaml`` blocks load as patterns.

A marker comment on the line before a block says how it is run:
``<!-- setup -->`` and ``<!-- test -->`` are the set-up-and-go lines that
``.ci/run`` runs in a fresh environment (not again here); ``<!-- gpu-only -->``
needs CUDA and must say so in its own text too (readers do not see the
marker). GPU-only blocks are not run here either: they are the GPU benchmark
and the GPU test suite, whose records are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nsaflex.loader import loads_pattern

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Markers a block may carry, and whether this test runs such a block.
MARKERS = {"setup": False, "test": False, "gpu-only": False}
#: Longest a block may take on the CPU; the slowest compiles FlexAttention's CPU kernels.
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"^<!-- ([\w-]+) -->$")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int
    marker: str | None

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language}" + (f"-{self.marker}" if self.marker else "")


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of ``text``, each with the marker comment on
    the line just before its opening fence (None when that line is not one)."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match.group(1), match.group(2), line, marker.group(1) if marker else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUN = [block for block in BLOCKS if block.language in ("sh", "python") and MARKERS.get(block.marker or "", True)]


def test_blocks_are_found_and_markers_known() -> None:
    assert {block.language for block in BLOCKS} >= {"sh", "python", "yaml"}
    assert [block.marker for block in BLOCKS if block.marker in ("setup", "test")] == ["setup", "test"]
    for block in BLOCKS:
        assert block.marker is None or block.marker in MARKERS, (block.id, f"unknown marker; known: {sorted(MARKERS)}")


def test_gpu_only_blocks_say_so() -> None:
    gpu_only = [block for block in BLOCKS if block.marker == "gpu-only"]
    assert gpu_only
    for block in gpu_only:
        assert block.text.startswith("# GPU only"), block.id


def test_reader_finds_markers_and_languages() -> None:
    text = "intro\n<!-- gpu-only -->\n```sh\nnvidia-smi\n```\n\n```python\nprint(1)\n```\n<!-- setup -->\n```sh\nls\n```\n"
    assert [(b.language, b.text, b.line, b.marker) for b in readme_blocks(text)] == [
        ("sh", "nvidia-smi\n", 3, "gpu-only"), ("python", "print(1)\n", 7, None), ("sh", "ls\n", 11, "setup")]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "yaml"], ids=lambda b: b.id)
def test_yaml_example_is_a_valid_pattern(block: Block) -> None:
    loads_pattern(block.text, f"README.md:{block.line}")


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """A scratch folder linking the checkout's top-level entries."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_example_runs_verbatim(block: Block, checkout_copy: Path) -> None:
    # A block that runs the suite would run this test again, inside itself.
    assert "pytest" not in block.text, f"README.md line {block.line}: a test-suite command needs a marker"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ["bash", "-euo", "pipefail", "-c", block.text] if block.language == "sh" else [sys.executable, "-c", block.text]
    done = subprocess.run(command, cwd=checkout_copy, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"README.md line {block.line}:\n{block.text}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
