"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention
in Vision Encoders", 2025).

After the vision encoder: anchors = the round(keep * alpha / 5) tokens receiving the most
attention in a middle "object" layer (9 of 24); buffer = their 4 neighbours (+-1, +-w on the
flattened grid, clamped, as the authors); registers = the rest of the budget filled by the
attention received in the last used layer (-2). Selection via one top-k of
``deep_attn + 2 * [anchor or buffer]``.  ctx.x [B, (1+)N, D] -> [B, (1+)keep, D]
"""
from __future__ import annotations

from typing import List

import torch

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import image_part, int_option, keep_positions, need, patch_grid, top_positions


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
                  "ties go to the smaller index; keep=K is per image row, while the authors' HIPRUNE_RETENTION=R "
                  "is the budget of the whole concatenated batch, int(R / B) per row (LLaVA-1.5: B = 1, "
                  "keep = R; LLaVA-NeXT's crops: pass keep = R // crops)")

    def configure(self) -> None:
        self.alpha = float(self.opts.get("alpha", 0.1))
        if not (0.0 <= self.alpha <= 1.0):
            fail(self.where, f"alpha must be in [0, 1], got {self.alpha!r}")
        self.object_layer = int_option(self, "object_layer", 9, rule="an int >= 1 (1-based)")
        self.deep_layer = self.opts.get("deep_layer", -2)

    def attention_layers(self, num_layers: int) -> List[int]:
        if self.object_layer > num_layers:
            fail(self.where, f"object_layer={self.object_layer} beyond {num_layers} layers")
        return [self.object_layer - 1, self.deep_layer]

    def reduce(self, ctx: Context) -> Reduction:
        x = ctx.x
        B = x.shape[0]
        n = ctx.n_image
        h, w = patch_grid(self.where, n, ctx.grid)
        k = self.keep_tokens(n)
        anchors = round(k * self.alpha / 5)
        if 5 * anchors > k:
            fail(self.where, f"5 * round(keep * alpha / 5) = {5 * anchors} exceeds keep={k}; lower alpha")
        shallow = image_part(ctx, need(ctx, self.where, "attn_received", self.object_layer - 1))
        deep = image_part(ctx, need(ctx, self.where, "attn_received", self.deep_layer))
        score = deep.float()
        if anchors > 0:
            a = top_positions(shallow.float(), anchors)                            # [B, A] (a set)
            nb = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=1).clamp(0, n - 1)  # [B, 5A]
            mask = torch.zeros(B, n, dtype=score.dtype, device=x.device).scatter(1, nb, 1.0)
            score = score + 2.0 * mask
        return keep_positions(ctx, top_positions(score, k), sort=False)
