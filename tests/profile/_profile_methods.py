"""Tiny methods registered for the profiler tests (the real methods plug in the same way)."""
import torch

from tokenreduce import methods as M
from tokenreduce.methods.base import Method, Need, Stage, keep_indices, topk_indices


class PTopClsVit(Method):
    """Top-k image tokens by [CLS] attention after ViT layer 1."""
    name = "ptest-topcls-vit"
    stage = Stage.VIT
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {"at": "layer"}

    def reduce_layers(self, L):
        return [self.opts.get("at", 1)]

    def attention_layers(self, L):
        return self.reduce_layers(L)

    def reduce(self, ctx):
        s = ctx.cls_attn[ctx.layer][:, 1:]
        return keep_indices(ctx, topk_indices(s, self.keep_tokens(ctx.n_image)))


class PTopNormProj(Method):
    """Top-k by feature norm on the encoder output (any model)."""
    name = "ptest-topnorm-proj"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES})

    def reduce(self, ctx):
        x = ctx.x[:, 1:] if ctx.has_cls else ctx.x
        return keep_indices(ctx, topk_indices(x.norm(dim=-1), self.keep_tokens(ctx.n_image)))


class PEveryOtherLLM(Method):
    """Keeps the first k image tokens after LLM layer 1."""
    name = "ptest-first-llm"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES})

    def reduce_layers(self, L):
        return [1]

    def reduce(self, ctx):
        B, N, _ = ctx.x.shape
        return keep_indices(ctx, torch.arange(self.keep_tokens(N), device=ctx.x.device).expand(B, -1))


def register():
    for cls in (PTopClsVit, PTopNormProj, PEveryOtherLLM):
        if cls.name not in M._REGISTRY:
            M.register(cls)
