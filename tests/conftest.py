"""Shared pytest setup: hypothesis profiles and the kernel line of the header (nothing model-specific lives here;
the shared oracles are in tests/oracles.py).

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


def pytest_report_header(config):
    """Which BLAS / PyTorch kernels this run computes with (tests/oracles.kernel): a numerical result is only
    comparable across machines together with this line."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from oracles import kernel

    return "kernels: " + ", ".join(f"{k}={v}" for k, v in kernel().items())
