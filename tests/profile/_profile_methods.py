"""Tiny methods registered for the profiler tests: the model-integration tests' own
(tests/models/_methods.py), including an LLM-stage method whose kept count follows the budget."""
from models._methods import FirstLLM, TopClsVit, TopNormProjector  # tests/ is on sys.path (its conftest)
from tokenreduce import methods


def register():
    for cls in (TopClsVit, TopNormProjector, FirstLLM):
        if cls.name not in methods._REGISTRY:
            methods.register(cls)
