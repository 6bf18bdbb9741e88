"""Hypothesis settings shared by the property tests (test_properties.py) and the hostile-input
fuzzing (test_hostile.py): derandomized, so CI runs the same examples every time, with
FUSED_WLOSS_HYPOTHESIS_EXAMPLES to run more on demand."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_ENV_EXAMPLES = os.environ.get("FUSED_WLOSS_HYPOTHESIS_EXAMPLES")


def fuzz_settings(default_examples: int, *also_suppress: HealthCheck):
    return settings(
        max_examples=int(_ENV_EXAMPLES) if _ENV_EXAMPLES else default_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *also_suppress],
    )
