"""Test configuration: hypothesis profiles and the path to the project's root.

The `ci` profile (chosen when the CI environment variable is set) is derandomised, so every
run draws the same examples, with few examples and no deadline: the whole suite stays within
10 minutes on two cores. `dev` draws new examples each run, a few more of them.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", derandomize=True, max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _isolated_default_dtype():
    """A test that changes torch's default dtype must not change it for the tests after it."""
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)
