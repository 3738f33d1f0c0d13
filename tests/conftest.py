"""Hypothesis settings profiles.

``ci`` (the default): no deadline, so a slow shared CPU does not fail a test.
``gpu``: fewer examples, no deadline, for suites that launch kernels.
Pick one with ``HYPOTHESIS_PROFILE=gpu pytest ...``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "gpu", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
