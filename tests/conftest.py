"""Hypothesis settings profiles.

``ci`` (the default): no deadline, so a slow shared CPU does not fail a test.
``gpu``: fewer examples, no deadline, for suites that launch kernels.
Pick one with ``HYPOTHESIS_PROFILE=gpu pytest ...``.

The device (``NSAFLEX_TEST_DEVICE``, and with it Triton's interpreter) is fixed
by :mod:`tests.device`, loaded here before any test module imports triton.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.device import DEVICE, DEVICES, INTERPRETED


def pytest_configure(config):
    if DEVICE not in DEVICES:
        raise pytest.UsageError(f"NSAFLEX_TEST_DEVICE must be one of {', '.join(DEVICES)}, found {DEVICE!r}")
    if DEVICE == "cuda" and INTERPRETED:
        raise pytest.UsageError("NSAFLEX_TEST_DEVICE=cuda runs the compiled Triton kernels: unset TRITON_INTERPRET")


settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "gpu", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
