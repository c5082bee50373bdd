"""Shared pytest setup: hypothesis profiles only (nothing model-specific lives here).

Profiles (choose with HYPOTHESIS_PROFILE=<name>):
  mdref     (default) 30 examples per property, no per-example deadline (NumPy timings vary on shared CPUs)
  thorough  500 examples per property, for an occasional deeper run
A test that needs other settings states them with its own @settings decorator.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("mdref", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mdref"))
