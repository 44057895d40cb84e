"""Tiny reduction methods for the model-integration tests (the real methods plug into the
same interface)."""
import torch

from tokenreduce.methods import Method, Need, Reduction, Stage, keep_indices, topk_indices


class AtLayer(Method):
    """Reduces after layer ``at`` (option, default 1) and reads that layer's statistics."""
    options = {"at": "layer"}

    def reduce_layers(self, L):
        return [self.opts.get("at", 1)]

    def attention_layers(self, L):
        return [self.opts.get("at", 1)]


class TopClsVit(AtLayer):
    """Keep the top-k image tokens by [CLS] attention after layer `at`, inside the ViT."""
    name = "test-topcls-vit"
    stage = Stage.VIT
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})

    def reduce(self, ctx):
        s = ctx.cls_attn[ctx.layer][:, 1:]
        return keep_indices(ctx, topk_indices(s, self.keep_tokens(ctx.n_image)))


class TopClsProjector(Method):
    """VisionZip/FasterVLM-like: top-k by [CLS] attention of layer -2, on the encoder output."""
    name = "test-topcls-proj"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})

    def attention_layers(self, L):
        return [-2]

    def reduce(self, ctx):
        s = ctx.cls_attn[-2][:, 1:] if ctx.has_cls else ctx.cls_attn[-2]
        return keep_indices(ctx, topk_indices(s, self.keep_tokens(ctx.n_image)))


class TopNormProjector(Method):
    """Features only (works on any model): top-k by feature norm."""
    name = "test-topnorm-proj"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES})

    def reduce(self, ctx):
        x = ctx.x[:, 1:] if ctx.has_cls else ctx.x
        return keep_indices(ctx, topk_indices(x.norm(dim=-1), self.keep_tokens(ctx.n_image)))


class PairMergeVit(Method):
    """Merges neighbouring image-token pairs (mean, size 2) after layer 0: exercises sizes
    and the proportional-attention key bias."""
    name = "test-pairmerge-vit"
    stage = Stage.VIT
    needs = frozenset({Need.FEATURES})

    def reduce_layers(self, L):
        return [0]

    def reduce(self, ctx):
        x = ctx.x
        B, N, D = x.shape
        n = N - 1
        cls, img = x[:, :1], x[:, 1:]
        merged = img.view(B, n // 2, 2, D).mean(2)
        tokens = torch.cat([cls, merged], 1)
        index = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + 2 * torch.arange(n // 2).expand(B, -1)], 1)
        source = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + torch.arange(n).div(2, rounding_mode="floor").expand(B, -1)], 1)
        size = torch.cat([torch.ones(B, 1), torch.full((B, n // 2), 2.0)], 1)
        return Reduction(tokens, index, source, size)


class TopQueryLLM(AtLayer):
    """FastV-like: after LLM layer `at`, keep the image tokens the last text token attends to most."""
    name = "test-topquery-llm"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.QUERY_ATTN})

    def reduce(self, ctx):
        s = ctx.query_attn[ctx.layer]
        return keep_indices(ctx, topk_indices(s, self.keep_tokens(ctx.n_image)))


class AfterLLMLayer1(Method):
    """Base of the two LLM-stage doubles: they reduce after LLM layer 1."""
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES})

    def reduce_layers(self, L):
        return [1]


class EveryOtherLLM(AfterLLMLayer1):
    """Keeps image tokens 0, 2, 4, ... after LLM layer 1 (a selection that does not depend on
    the query, so a recompute with one more token selects the same tokens)."""
    name = "test-everyother-llm"

    def reduce(self, ctx):
        B, N, _ = ctx.x.shape
        return keep_indices(ctx, torch.arange(0, N, 2).expand(B, -1))


class FirstLLM(AfterLLMLayer1):
    """Keeps the first k image tokens after LLM layer 1 (the kept count follows the budget)."""
    name = "test-first-llm"

    def reduce(self, ctx):
        B, N, _ = ctx.x.shape
        return keep_indices(ctx, torch.arange(self.keep_tokens(N), device=ctx.x.device).expand(B, -1))
