"""Project-wide test configuration: hypothesis profiles and framework set-up.

JAX's float64 must be switched on before any JAX array exists, and only by tests (the adapter
never changes global JAX configuration): this is the one place that does it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):  # noqa: D103 - pytest hook
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)
