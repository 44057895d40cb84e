"""Tiny methods registered for the profiler tests: the model-integration tests' own
(tests/models/_methods.py) plus one LLM-stage method whose kept count follows the budget."""
import torch

from models._methods import TopClsVit, TopNormProjector  # tests/ is on sys.path (its conftest)
from tokenreduce import methods
from tokenreduce.methods import Method, Need, Stage, keep_indices


class FirstLLM(Method):
    """Keeps the first k image tokens after LLM layer 1."""
    name = "test-first-llm"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES})

    def reduce_layers(self, L):
        return [1]

    def reduce(self, ctx):
        B, N, _ = ctx.x.shape
        return keep_indices(ctx, torch.arange(self.keep_tokens(N), device=ctx.x.device).expand(B, -1))


def register():
    for cls in (TopClsVit, TopNormProjector, FirstLLM):
        if cls.name not in methods._REGISTRY:
            methods.register(cls)
