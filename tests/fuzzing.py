"""Hypothesis settings shared by the property tests (test_properties.py) and the hostile-input
fuzzing (test_hostile.py): derandomized, so `make test` runs the same examples every time, with
FUSED_WLOSS_HYPOTHESIS_EXAMPLES to run more on demand.

FUSED_WLOSS_HYPOTHESIS_FRESH=1 draws fresh examples instead, from the seed given to pytest as
``--hypothesis-seed=N`` (or a random one, which hypothesis prints with a failure): the deep lane
(``make check-deep``, tests/sanitizers/run.py) runs so with a new seed on every run and prints it,
so each landing explores new inputs and any failure can be replayed."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_ENV_EXAMPLES = os.environ.get("FUSED_WLOSS_HYPOTHESIS_EXAMPLES")
_FRESH = os.environ.get("FUSED_WLOSS_HYPOTHESIS_FRESH") == "1"


def fuzz_settings(default_examples: int, *also_suppress: HealthCheck):
    return settings(
        max_examples=int(_ENV_EXAMPLES) if _ENV_EXAMPLES else default_examples,
        deadline=None,
        derandomize=not _FRESH,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *also_suppress],
    )
