"""How hard the property-based tests (hypothesis) try: the suite's budget, or more on demand.

Each fuzz test runs ``examples(n)`` cases: ``n`` in the normal suite (kept small: the fast
lane runs them), that times ``RELAY_FUZZ_SCALE`` when set, e.g.
``RELAY_FUZZ_SCALE=50 pytest tests/config/test_fuzz_loader.py`` for a long search.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def examples(n: int) -> settings:
    scale = float(os.environ.get("RELAY_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(n * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])
