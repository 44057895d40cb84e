"""VFlowOpt (Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information
Flow-Guided Optimization", ICCV 2025) - the vision-side pruning with recycling.

Importance of each image token = attention it receives in ViT layer -2 (head and row mean)
``+ alpha_v * softmax(patch pixel entropy)``. The ``L`` least important tokens are pruned and
recycled: grouped by an ``a x a`` cell of the patch grid, each group becomes its importance-
weighted average placed at the group's most important token (ops.recycle with assign= and
weight=); the others are kept. Output in spatial order: kept + one token per non-empty cell;
an empty cell's slot is padding (index -1, size 0, zero token) so the count stays static.
    ctx.x [B, (1+)N, D], ctx.attn_received[-2] [B, (1+)N] -> [B, (1+)(N - L + C), D]
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import image_part, need, patch_grid


def patch_entropy(pixels: Tensor, patch: int) -> Tensor:
    """Shannon entropy (bits) of the grey-level histogram of each patch: [B, C, H, W] -> [B, n].
    As the authors: each channel * 255 cast to 8 bits (wrapping like torch's CPU cast), equal
    channel weights 0.3333, rounded, 256 bins."""
    B, C, H, W = pixels.shape
    pt = pixels.float().unfold(2, patch, patch).unfold(3, patch, patch)        # [B, C, h, w, p, p]
    v = ((pt * 255).to(torch.int32) & 255).float()
    grey = (v * 0.3333).sum(dim=1)                                            # [B, h, w, p, p]
    g = torch.round(grey).long().clamp(0, 255).flatten(3).flatten(1, 2)       # [B, n, p*p]
    hist = torch.zeros(*g.shape[:2], 256, device=pixels.device).scatter_add_(2, g, torch.ones_like(g, dtype=torch.float32))
    prob = hist / hist.sum(-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(-1)


@register
class VFlowOpt(Method):
    """VFlowOpt: attention + pixel-entropy importance, prune the least and recycle them per grid cell."""
    name = "vflowopt"
    paper = ("Yang et al., VFlowOpt: A Token Pruning Framework for LMMs with Visual Information "
             "Flow-Guided Optimization, ICCV 2025")
    code = "sihany077/VFlowOpt"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.ATTN_RECEIVED, Need.GRID, Need.PIXELS})
    options = {
        "a": "recycling cell size in patches (float, authors' tuned illava_vit_m=17.387)",
        "alpha_v": "weight of the softmaxed patch entropy (authors' tuned value 0; needs ctx.pixels when > 0)",
        "patch": "pixel patch size for the entropy (default 14)",
        "layer": "ViT layer of the attention, negative from the end (default -2; authors' k=25 of 27)",
    }
    budgets = ("ratio=r: the authors' illava_vit_r (kept share before recycling: L = round(N(1-r)) + int(N/a^2) "
               "tokens recycled); keep=K: K output slots (K - cells kept + one per cell); LLaVA-1.5 presets "
               "keep=192 / 128 / 64 of 576")
    faithful_to = ("sihany077/VFlowOpt src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py "
                   "(importance, entropy) and language_model/llava_qwen_training_free.py (token merging by "
                   "a x a grid, attention-weighted average at the max-weight token) @129eeef")
    deviations = ("the 'global' query rows (received > t * mean, tuned t~39) are all rows here (t = 0, the "
                  "authors' default), i.e. plain attention received: a per-sample row subset is not "
                  "expressible by the fused op; empty cells give padding slots (the authors' count varies); "
                  "negative pixels wrap when cast to 8 bits as torch's CPU cast does; only the ViT-side "
                  "stage (the LLM-side stage of iLLaVA/VFlowOpt is not here); ties to the smaller index; on "
                  "LLaVA-OneVision's anyres input the authors count L over base + crops together (N = every "
                  "image token of the image) with cells on each grid; here L and the cells are per batch row")

    def configure(self) -> None:
        self.a = float(self.opts.get("a", 17.386981849158786))
        if not (self.a >= 1.0):
            fail(self.where, f"a must be >= 1, got {self.a!r}")
        self.alpha_v = float(self.opts.get("alpha_v", 0.0))
        self.patch = int(self.opts.get("patch", 14))
        self.layer = self.opts.get("layer", -2)

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.layer]

    def cells(self, h: int, w: int):
        ch, cw = int((h - 1) // self.a) + 1, int((w - 1) // self.a) + 1
        return ch, cw

    def counts(self, n: int, h: int, w: int):
        """(kept top tokens, recycled L, cells C)."""
        ch, cw = self.cells(h, w)
        C = ch * cw
        if self.budget.ratio is not None:
            L = int(round(n * (1 - self.budget.ratio))) + int(n / (self.a * self.a))
        else:
            L = n - (self.budget.resolve(n) - C)
        L = min(max(L, 0), n)
        if n - L < 0 or (self.budget.keep is not None and self.budget.resolve(n) <= C):
            fail(self.where, f"keep must exceed the {C} recycling cells")
        return n - L, L, C

    def keep_tokens(self, n: int) -> int:
        h, w = patch_grid(self.where, n)
        kept, L, C = self.counts(n, h, w)
        return kept + C

    def reduce(self, ctx: Context) -> Reduction:
        x = ctx.x
        B, _, D = x.shape
        n = ctx.n_image
        h, w = patch_grid(self.where, n, ctx.grid)
        imp = image_part(ctx, need(ctx, self.where, "attn_received", self.layer)).float()
        if self.alpha_v != 0.0:
            ent = patch_entropy(need(ctx, self.where, "pixels", dims=None), self.patch)
            if ent.shape != (B, n):
                fail(self.where, f"ctx.pixels give {ent.shape[1]} patches of {self.patch} px, expected {n}")
            imp = imp + self.alpha_v * torch.softmax(ent, dim=-1)
        xi = image_part(ctx, x)
        kept, L, C = self.counts(n, h, w)
        order = torch.sort(imp, dim=1, stable=True).indices                     # ascending importance
        low, top = order[:, :L], order[:, L:]
        dev = x.device
        pos = torch.arange(n, device=dev)
        ch, cw = self.cells(h, w)
        cell_of = (torch.floor((pos // w).double() / self.a).long() * cw
                   + torch.floor((pos % w).double() / self.a).long())           # [n]
        assign = cell_of[low]                                                   # [B, L]
        # representative of each cell: its most important pruned token (ties: smaller position)
        wl = torch.gather(imp, 1, low)
        cmax = torch.full((B, C), -math.inf, device=dev).scatter_reduce(1, assign, wl, "amax")
        is_max = wl == torch.gather(cmax, 1, assign)
        rep = torch.full((B, C), n, dtype=torch.long, device=dev).scatter_reduce(
            1, assign, torch.where(is_max, low, torch.full_like(low, n)), "amin")  # n = empty cell
        nonempty = rep < n
        if L > 0:
            merged, _ = ops.recycle(xi, rep.clamp_max(n - 1), low, weight=imp, assign=assign, include_target=False)
        else:
            merged = xi.new_zeros(B, C, D)
        # spatial order of kept tokens and cell representatives; empty cells last (padding)
        cand_pos = torch.cat([top, rep], dim=1)                                 # [B, kept + C]
        cand_id = torch.cat([top, n + torch.arange(C, device=dev).expand(B, C)], dim=1)
        srt = torch.sort(cand_pos, dim=1, stable=True).indices
        out_pos = torch.gather(cand_pos, 1, srt)
        out_id = torch.gather(cand_id, 1, srt)
        valid = out_pos < n
        allv = torch.cat([xi, merged.to(xi.dtype)], dim=1)
        tokens = torch.gather(allv, 1, out_id.unsqueeze(-1).expand(-1, -1, D)) * valid.unsqueeze(-1).to(xi.dtype)
        base = image_part(ctx, ctx.size.float()) if ctx.size is not None else torch.ones(B, n, device=dev)
        K = kept + C
        slot_of_id = torch.empty(B, n + C, dtype=torch.long, device=dev).scatter(
            1, out_id, torch.arange(K, device=dev).expand(B, K))
        src = torch.full((B, n), -1, dtype=torch.long, device=dev)
        src = src.scatter(1, top, torch.gather(slot_of_id, 1, top))
        src = src.scatter(1, low, torch.gather(slot_of_id, 1, n + assign))
        size = torch.zeros(B, K, device=dev).scatter_add(1, src.clamp_min(0), base * (src >= 0))
        index = torch.where(valid, out_pos, torch.full_like(out_pos, -1))
        c = int(ctx.has_cls)
        if c:
            z = torch.zeros(B, 1, dtype=torch.long, device=dev)
            tokens = torch.cat([x[:, :1], tokens], dim=1)
            index = torch.cat([z, torch.where(valid, index + 1, index)], dim=1)
            src = torch.cat([z, torch.where(src >= 0, src + 1, src)], dim=1)
            s0 = ctx.size[:, :1].float() if ctx.size is not None else torch.ones(B, 1, device=dev)
            size = torch.cat([s0, size], dim=1)
        return Reduction(tokens, index, src, size)
