"""Every Triton kernel compiles for a Hopper GPU (sm_90) on a machine without one.

The interpreter (how CI runs the kernels) accepts programs the GPU compiler
refuses, e.g. matrix products with fewer than 16 columns; this test records the
launches of a small pattern's forward and backward under the interpreter and
compiles each one with ``triton.compile`` for ``GPUTarget('cuda', 90, 32)``
(``tests/triton_compile_check.py --small``).

No kernel takes more than 40 parameters: strides travel as tuples
(``SeqLayout.strides``), not as positional lists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent / "triton_compile_check.py"


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ, NSAFLEX_COMPILE_CHECK_JSON=str(tmp_path / "launches.json"))
    env.pop("TRITON_INTERPRET", None)  # the script sets it for recording and clears it for compiling
    result = subprocess.run([sys.executable, str(SCRIPT), "--small"], env=env, capture_output=True, text=True,
                            timeout=600, cwd=SCRIPT.parents[1])
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "FAIL" not in report, report[-4000:]
    compiled = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    assert {"slc_win_kernel", "bwd_dq_kernel", "bwd_slc_dkv_kernel", "cmp_lse_kernel"} <= compiled, compiled


MOST_PARAMETERS = 40


def test_no_kernel_takes_more_than_40_parameters():
    from nsaflex.kernels import backward, forward

    kernels = {name: obj for module in (forward, backward) for name, obj in vars(module).items()
               if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert {"slc_win_kernel", "bwd_dq_kernel", "bwd_slc_dkv_kernel", "reduce_slc_kernel"} <= set(kernels)
    counts = {name: len(kernel.arg_names) for name, kernel in kernels.items()}
    assert max(counts.values()) <= MOST_PARAMETERS, counts
