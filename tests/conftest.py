"""Shared fixtures for tests/ (hypothesis profiles live in the root conftest.py)."""
import pytest


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
