"""Hypothesis profiles for every test directory (tests/ and the plugins' own tests).

The fixed-seed "ci" profile is the default; set COPYENGINE_HYPOTHESIS_PROFILE=dev or soak
for longer runs (see README). deadline=None: a JIT compile can land inside an example."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", deadline=None, max_examples=20000,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("COPYENGINE_HYPOTHESIS_PROFILE", "ci"))
