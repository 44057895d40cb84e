"""FasterVLM: keep the image tokens the [CLS] token attends to most."""
from __future__ import annotations

from typing import List

from . import register
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, image_part, keep_positions, need, top_positions


@register
class FasterVLM(Method):
    """[CLS]-attention top-k after the vision encoder (FasterVLM).

    score = [CLS] row of the attention of ViT layer ``layer`` (default -2, the layer
    whose output LLaVA-1.5 feeds the projector), head mean, image columns ``[B, n]``;
    keep the ``keep`` highest (ties to the lower position), in spatial order; [CLS]
    first when present. x ``[B, 1 + n, D]`` -> tokens ``[B, 1 + keep, D]``.
    """
    name = "fastervlm"
    paper = "Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning (FasterVLM), arXiv 2412.01818"
    code = "github.com/Theia-4869/FasterVLM"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {"layer": "ViT layer whose [CLS] attention scores the tokens (default -2)"}
    budgets = "keep=K or ratio=r of the image tokens; LLaVA-1.5 presets keep=192/128/64 of 576"
    faithful_to = ("Theia-4869/FasterVLM@29ed074 llava/model/llava_arch.py encode_images "
                   "(attention mean over heads, topk, boolean index mask) with the vision tower's "
                   "[CLS] row of the select layer (-2)")
    deviations = ("index mask in the authors = spatial order, as here; ties go to the lower "
                  "position (torch.topk leaves them unspecified)")

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.opts.get("layer", -2)]

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        scores = image_part(ctx, need(ctx, self.where, "cls_attn", self.opts.get("layer", -2)))
        return keep_positions(ctx, top_positions(scores.float(), self.keep_tokens(ctx.n_image)), sort=False)
