"""Shared fixtures. Hypothesis runs a fixed-seed CI profile by default; set
COPYENGINE_HYPOTHESIS_PROFILE=soak for long runs (see README)."""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", deadline=None, max_examples=20000,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("COPYENGINE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def machine():
    import copyengine as ce
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        yield m


@pytest.fixture
def machine64k():
    import copyengine as ce
    with ce.Machine(nodes=2, node_size="64MiB", page_size="64KiB") as m:
        yield m
