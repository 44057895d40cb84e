"""HoloV (Zou et al., "HoloV: Holistic Visual Token Pruning for Efficient MLLMs", NeurIPS 2025).

After the vision encoder: the image tokens (flattened order) are split into ``crops``
contiguous chunks (16 x 36 for 576). Each chunk scores ``mean(1e3 * a + beta * var_sim *
scale)`` (a = [CLS] attention of layer -2, var_sim = variance of a token's cosine similarities
inside the chunk, scale matching its magnitude to the attention's); the budget is split over
chunks in proportion to their scores (floor, remainder to the highest weights) and each chunk
keeps its top-attention tokens (all of them, in order, when its share reaches its size).
Output: chunk order, top-k order inside a chunk; slots the authors pad are padding (size 0).
    ctx.x [B, (1+)N, D], ctx.cls_attn[-2] [B, (1+)N] -> [B, (1+)keep, D]
"""
from __future__ import annotations

from typing import List

import torch

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import image_part, int_option, need, padded_selection


def chunk_layout(n: int, crops: int, device=None):
    """The authors' uneven chunking: sizes n // P (+1 for the first n % P), built on ``device``
    by arithmetic (no host data copied in). Returns pos [P, S] int64 padded with 0,
    valid [P, S] bool and sizes [P] int64."""
    base, rem = divmod(n, crops)
    p = torch.arange(crops, device=device)
    sizes = base + (p < rem).long()
    start = p * base + p.clamp(max=rem)
    s = torch.arange(base + (rem > 0), device=device)
    valid = s[None, :] < sizes[:, None]
    pos = torch.where(valid, start[:, None] + s[None, :], torch.zeros_like(s)[None, :])
    return pos, valid, sizes


@register
class HoloV(Method):
    """HoloV: budget split over crops by attention + similarity variance, top-k per crop."""
    name = "holov"
    paper = "Zou et al., HoloV: Holistic Visual Token Pruning for Efficient MLLMs, NeurIPS 2025"
    code = "obananas/HoloV"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {
        "crops": "number of contiguous crops the tokens are split into (default 16)",
        "alpha": "weight of the scaled attention in the crop score (default 1)",
        "beta": "weight of the similarity variance in the crop score (default 0.09)",
        "layer": "ViT layer of the [CLS] attention, negative from the end (default -2)",
    }
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192 / 128 / 64 of 576 (authors' default 64)"
    faithful_to = ("obananas/HoloV utils.py HoloV() @ddcc937 with llava/model/llava_arch.py @07c159b "
                   "(num_patches=16, [CLS] attention of layer -2, head mean)")
    deviations = ("batched over crops (the authors loop per sample and per crop); when a crop's share "
                  "exceeds its size the lost slots are padding (index -1, size 0, zero token) exactly where "
                  "the authors zero-pad; similarities are computed on ctx.x (the authors use the projector "
                  "output); the 'context refetch' of the paper is not in the released code and not here; "
                  "ties go to the smaller index")

    def configure(self) -> None:
        self.crops = int_option(self, "crops", 16, rule="a positive int")
        self.alpha = float(self.opts.get("alpha", 1.0))
        self.beta = float(self.opts.get("beta", 0.09))
        self.layer = self.opts.get("layer", -2)

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.layer]

    def reduce(self, ctx: Context) -> Reduction:
        eps = 1e-6
        x = image_part(ctx, ctx.x)
        B, n, D = x.shape
        attn = image_part(ctx, need(ctx, self.where, "cls_attn", self.layer)).float()
        k = self.keep_tokens(n)
        if self.crops > n:
            fail(self.where, f"crops={self.crops} exceeds the {n} image tokens")
        pos, valid, size_t = chunk_layout(n, self.crops, x.device)
        P, S = pos.shape
        vf = valid.float()                                                    # [P, S]
        ac = attn[:, pos.reshape(-1)].reshape(B, P, S) * vf                   # [B, P, S]
        if n % P == 0:   # even crops: a view of x (float32 input: no [B, N, D] copy at all)
            xc = x.float().reshape(B, P, S, D)
        else:            # uneven: one gathered copy
            xc = x.float()[:, pos.reshape(-1)].reshape(B, P, S, D)
        # cosine similarities f_i . f_j with f = x / (|x| + eps), from the Gram matrix of x:
        # (x_i . x_j) / ((|x_i| + eps)(|x_j| + eps)), |x_i|^2 its diagonal. The normalised copy f
        # ([B, N, D], 151 MB at B=16 D=4096, freshly mapped on every call) is never written.
        gram = xc @ xc.transpose(-1, -2)                                     # [B, P, S, S]
        inv = 1.0 / (gram.diagonal(dim1=-2, dim2=-1).sqrt() + eps)           # [B, P, S]
        sim = gram * inv[..., :, None] * inv[..., None, :]
        eye = torch.eye(S, device=x.device)
        pair = vf[:, :, None] * vf[:, None, :]
        sim = sim * (1 - eye) * pair
        denom = (size_t - 1).clamp_min(1).float()[None, :, None]             # n_p - 1
        mean_sim = sim.sum(-1) / denom
        var_sim = (((sim - mean_sim[..., None]) ** 2) * vf[None, :, None, :]).sum(-1) / denom
        var_sim = var_sim * vf
        a_s = ac * 1e3
        cnt = size_t.float()[None, :]
        scaling = (a_s.abs().sum(-1) / cnt) / (var_sim.abs().sum(-1) / cnt + eps)
        tok = self.alpha * a_s + self.beta * var_sim * scaling[..., None]
        pscore = (tok * vf).sum(-1) / cnt                                     # [B, P]
        single = (size_t <= 1)[None, :]
        pscore = torch.where(single, ac.sum(-1) / cnt, pscore)
        w = pscore / (pscore.sum(-1, keepdim=True) + eps)
        alloc = torch.floor(w * k).long()
        remaining = k - alloc.sum(-1, keepdim=True)                          # [B, 1]
        wrank = torch.sort(w, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
        alloc = alloc + (wrank < remaining).long()
        full = alloc >= size_t[None, :]                                      # keep the whole crop
        # rank of each token inside its crop by attention (ties to the smaller position)
        arank = torch.sort(ac.masked_fill(~valid, -1.0), dim=-1, descending=True, stable=True).indices
        rank = arank.argsort(dim=-1)                                         # [B, P, S]
        sel = (rank < alloc[..., None]) & valid
        inner = torch.where(full[..., None], torch.arange(S, device=x.device).expand(B, P, S), rank)
        key = torch.arange(P, device=x.device)[None, :, None] * S + inner
        big = P * S
        key = torch.where(sel, key, torch.full_like(key, big)).reshape(B, P * S)
        order = torch.sort(key, dim=-1, stable=True).indices[:, :k]          # [B, k]
        ok = torch.gather(key, 1, order) < big
        index = torch.gather(pos.reshape(-1).expand(B, P * S), 1, order)
        return padded_selection(ctx, index, ok)
