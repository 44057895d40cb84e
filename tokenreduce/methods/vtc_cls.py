"""VTC-CLS: [CLS] attention summed over several ViT layers, top-k."""
from __future__ import annotations

from typing import List

import torch

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import abs_layer, check_x, image_part, keep_indices, need, num_layers, topk_indices


@register
class VTCCLS(Method):
    """Ensemble of [CLS] attention over layers, top-k (VTC-CLS).

    score = sum over ViT layers ``start_layer .. L-2`` (the authors' slice
    ``attentions[start_layer:-1]``) of the head-mean [CLS] row, image columns ``[B, n]``;
    keep the ``keep`` highest, re-sorted to spatial order (as the authors do with
    position ids); [CLS] first. x ``[B, 1 + n, D]`` -> ``[B, 1 + keep, D]``.
    """
    name = "vtc-cls"
    paper = "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS), arXiv, Dec 2024"
    code = "github.com/THU-MIG/VTC-CLS"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {"start_layer": "first ViT layer of the ensemble, 0-based or negative (default 12); "
                              "the ensemble runs to layer L-2"}
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192/128/64 of 576"
    faithful_to = ("THU-MIG/VTC-CLS@f4d83a1 llava/model/multimodal_encoder/clip_encoder.py "
                   "cls_token_only + llava/model/llava_arch.py encode_images (topk, then argsort "
                   "of the position ids)")
    deviations = ("the authors' scripts take start_layer on the command line with no default; "
                  "12 is our choice; ties go to the lower position")

    def _layers(self, L: int) -> List[int]:
        start = abs_layer(self.opts.get("start_layer", 12), L)
        if not 0 <= start <= L - 2:
            fail(self.where, f"start_layer={self.opts.get('start_layer', 12)} must lie in [0, L-2] "
                            f"for L={L} layers (the ensemble ends at layer L-2)")
        return list(range(start, L - 1))

    def attention_layers(self, num_layers: int) -> List[int]:
        return self._layers(num_layers)

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        layers = self._layers(num_layers(ctx, self.where))
        score = torch.stack([need(ctx, self.where, "cls_attn", l).float()
                             for l in layers]).sum(0)
        return keep_indices(ctx, topk_indices(image_part(ctx, score), self.keep_tokens(ctx.n_image)))
