"""Where the suite runs, chosen once for the whole session by ``NSAFLEX_TEST_DEVICE``.

``cpu`` (the default, the README's test command and CI): Triton runs under its
interpreter, ``TRITON_INTERPRET=1``, which must be set before triton decorates
any kernel, so ``tests/conftest.py`` sets it when it loads this module.
``cuda`` (the README's GPU suite): the compiled kernels on the GPU; the
interpreter must be off, and the tests that exist to run interpreted Triton on
the CPU skip (:data:`INTERPRETED` says which case holds).
"""

from __future__ import annotations

import os

DEVICES = ("cpu", "cuda")
DEVICE = os.environ.get("NSAFLEX_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# Triton decorates kernels interpreted or compiled once, at import: the whole session is one or the other.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NOT_INTERPRETED = "Triton on the CPU runs only interpreted: the CPU suite (NSAFLEX_TEST_DEVICE=cpu, the default) runs this"


def skip_module_without_device() -> None:
    """Skip the calling test module when ``NSAFLEX_TEST_DEVICE=cuda`` finds no CUDA device."""
    import pytest
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("NSAFLEX_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
