"""Fixtures of the method tests (helpers are in _inputs.py)."""
import pytest

from tokenreduce.authors.synthetic import clip_like


@pytest.fixture(scope="session")
def clip1():
    return clip_like(1, 576, 1024, seed=11, layers=range(24))


@pytest.fixture(scope="session")
def clip3():
    return clip_like(3, 576, 1024, seed=12, layers=range(24))
