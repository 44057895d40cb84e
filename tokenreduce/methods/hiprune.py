"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention
in Vision Encoders", 2025).

After the vision encoder: anchors = the round(keep * alpha / 5) tokens receiving the most
attention in a middle "object" layer (9 of 24); buffer = their 4 neighbours (+-1, +-w on the
flattened grid, clamped, as the authors); registers = the rest of the budget filled by the
attention received in the last used layer (-2). Selection via one top-k of
``deep_attn + 2 * [anchor or buffer]``.  ctx.x [B, (1+)N, D] -> [B, (1+)keep, D]
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from . import register
from .base import (Context, Method, Need, Reduction, Stage, image_part, keep_indices, require,
                   square_grid, topk_indices)


@register
class HiPrune(Method):
    """HiPrune: anchors + spatial buffer from a middle ViT layer, registers from the last one."""
    name = "hiprune"
    paper = ("Liu et al., HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in "
             "Vision Encoders, 2025")
    code = "Danielement321/HiPrune"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.ATTN_RECEIVED, Need.GRID})
    options = {
        "alpha": "share of the budget for anchors + buffer (anchors = round(keep * alpha / 5)), default 0.1",
        "object_layer": "1-based ViT layer of the anchors (default 9)",
        "deep_layer": "ViT layer of the registers, negative from the end (default -2, LLaVA's feature layer)",
    }
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192 / 128 / 64 of 576 (authors' HIPRUNE_RETENTION)"
    faithful_to = ("Danielement321/HiPrune LLaVA/llava/model/llava_arch.py encode_images @6e83a12 "
                   "(global attention = head mean, query mean; +-1/+-24 neighbours clamped; unique; "
                   "deep top-k over the rest)")
    deviations = ("batched: one top-k of deep + 2*mask instead of unique + a second top-k (same set); "
                  "neighbours +-1 wrap across grid rows as the authors' flat indexing does; "
                  "ties go to the smaller index")

    def __init__(self, keep: Optional[int] = None, ratio: Optional[float] = None, **opts: Any):
        super().__init__(keep, ratio, **opts)
        self.alpha = float(opts.get("alpha", 0.1))
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"tokenreduce.methods.hiprune: alpha must be in [0, 1], got {self.alpha!r}")
        self.object_layer = opts.get("object_layer", 9)
        if isinstance(self.object_layer, bool) or not isinstance(self.object_layer, int) or self.object_layer < 1:
            raise ValueError(f"tokenreduce.methods.hiprune: object_layer must be an int >= 1 (1-based), "
                             f"got {self.object_layer!r}")
        self.deep_layer = opts.get("deep_layer", -2)

    def attention_layers(self, num_layers: int) -> List[int]:
        if self.object_layer > num_layers:
            raise ValueError(f"tokenreduce.methods.hiprune: object_layer={self.object_layer} beyond {num_layers} layers")
        return [self.object_layer - 1, self.deep_layer]

    def _layer_key(self, ctx: Context, layer: int) -> int:
        d = ctx.attn_received
        if layer in d or ctx.num_layers is None:
            return layer
        return layer % ctx.num_layers if layer < 0 else layer - ctx.num_layers

    def reduce(self, ctx: Context) -> Reduction:
        x = ctx.x
        B, Nt, _ = x.shape
        n = ctx.n_image
        h, w = ctx.grid if ctx.grid is not None else square_grid(n)
        if h * w != n:
            raise ValueError(f"tokenreduce.methods.hiprune: grid {h}x{w} does not match {n} image tokens")
        k = self.keep_tokens(n)
        anchors = round(k * self.alpha / 5)
        if 5 * anchors > k:
            raise ValueError(f"tokenreduce.methods.hiprune: 5 * round(keep * alpha / 5) = {5 * anchors} exceeds "
                             f"keep={k}; lower alpha")
        shallow = image_part(ctx, require(ctx, self.name, "attn_received",
                                          self._layer_key(ctx, self.object_layer - 1), (B, Nt)))
        deep = image_part(ctx, require(ctx, self.name, "attn_received",
                                       self._layer_key(ctx, self.deep_layer), (B, Nt)))
        score = deep.float()
        if anchors > 0:
            a = topk_indices(shallow.float(), anchors)                              # [B, A]
            nb = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=1).clamp(0, n - 1)  # [B, 5A]
            mask = torch.zeros(B, n, dtype=score.dtype, device=x.device).scatter(1, nb, 1.0)
            score = score + 2.0 * mask
        return keep_indices(ctx, topk_indices(score, k))
