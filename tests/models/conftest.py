"""Fixtures shared by the model tests."""
import pytest

from tokenreduce.models import presets


@pytest.fixture(scope="module")
def models():
    """``models(name)``: the tiny preset ``name``, built once per test module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = presets.build(name)
        return cache[name]
    return get
