"""Shared fixtures for the sedac-core suite.

* ``backend``: every behaviour test runs once per backend ("rust", "python").
  A missing Rust extension is a failure, not a skip: CI must build it.
* Hypothesis profiles: ``fast`` (default, CI) and ``deep``, chosen with
  ``SEDAC_HYPOTHESIS_PROFILE=deep``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

import sedac_core

settings.register_profile("fast", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("SEDAC_HYPOTHESIS_PROFILE", "fast"))

BACKENDS = ("rust", "python")


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = sedac_core.backend()
    name = sedac_core.set_backend(request.param)
    assert name == request.param
    yield name
    sedac_core.set_backend(previous)


def on_both(fn):
    """Run ``fn`` under each backend; return {name: ("ok", value) | ("error", type, message)}."""
    previous = sedac_core.backend()
    results = {}
    try:
        for name in BACKENDS:
            sedac_core.set_backend(name)
            try:
                results[name] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - comparing the exceptions themselves
                results[name] = ("error", type(exc), str(exc))
    finally:
        sedac_core.set_backend(previous)
    return results
