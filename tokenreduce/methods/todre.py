"""ToDRE: diversity after the vision encoder, task relevance inside the LLM (paper only)."""
from __future__ import annotations

from typing import List

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, image_part, int_option, keep_indices, need, topk_indices

_PAPER = ("ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient "
          "Large Vision-Language Models, 2025 (title as in the project seeds)")


@register
class ToDRE(Method):
    """ToDRE stage 1: greedy k-center diversity selection after the vision encoder.

    d = 1 - cosine between image tokens; greedy max-min (`ops.kcenter`) from the first
    centre ``first`` ("isolated": the token farthest from its nearest neighbour, or
    "cls": the token with the highest [CLS] attention of ViT layer -2); ``keep`` picks in
    spatial order, [CLS] first. Stage 2 is the registered method ``todre-llm``.
    x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``.
    """
    name = "todre"
    paper = _PAPER
    code = "no released code (paper only)"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES})
    options = {"first": '"isolated" (default) or "cls": how the first centre is chosen',
               "layer": "ViT layer of the [CLS] attention for first='cls' (default -2)"}
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192/128/64 of 576 (paper: 90% pruned, keep=58)"
    faithful_to = "paper (abstract and method section): greedy k-center after the vision encoder"
    deviations = ("no code to follow: the first centre rule and the cosine metric are our choice "
                  "(default = DivPrune's isolated start); stage 2 is a separate method (todre-llm)")

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.opts.get("layer", -2)] if self.opts.get("first", "isolated") == "cls" else []

    def reduce(self, ctx: Context) -> Reduction:
        first = self.opts.get("first", "isolated")
        check_x(ctx, self.where, cls=first == "cls")
        if first == "isolated":
            start = "isolated"
        elif first == "cls":
            s = image_part(ctx, need(ctx, self.where, "cls_attn", self.opts.get("layer", -2)))
            start = topk_indices(s.float(), 1)[:, 0]
        else:
            fail(self.where, f'first must be "isolated" or "cls", got {first!r}')
        idx, _ = ops.kcenter(image_part(ctx, ctx.x), self.keep_tokens(ctx.n_image),
                             metric="cosine", first=start)
        return keep_indices(ctx, idx)


@register
class ToDRELLM(Method):
    """ToDRE stage 2: drop task-irrelevant image tokens inside the LLM.

    relevance = attention of the last text token to the image tokens at decoder layer
    ``layer - 1`` (``ctx.query_attn``) ``[B, n]``; keep the ``keep`` most relevant image
    hidden states in their order, after decoder layer ``layer - 1``.
    x ``[B, n, D]`` (image slice) -> ``[B, keep, D]``.
    """
    name = "todre-llm"
    paper = _PAPER
    code = "no released code (paper only)"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.QUERY_ATTN})
    options = {"layer": "first decoder layer that sees the reduced sequence (default 2)"}
    budgets = "keep=K or ratio=r of the image tokens that reach the LLM (e.g. ratio=0.5)"
    faithful_to = "paper: task relevance of visual tokens measured by text-to-image attention in the decoder"
    deviations = ("the paper drops *all* visual tokens adaptively once their information has "
                  "migrated into the text: a data-dependent decision (host sync, dynamic shape); "
                  "here a static budget by relevance, and dropping every image token at a "
                  "layer is left to the model integration")

    def _layer(self) -> int:
        return int_option(self, "layer", 2)

    def reduce_layers(self, num_layers: int) -> List[int]:
        return [self._layer() - 1]

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self._layer() - 1]

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        rel = need(ctx, self.where, "query_attn", self._layer() - 1).float()
        return keep_indices(ctx, topk_indices(image_part(ctx, rel), self.keep_tokens(ctx.n_image)))
