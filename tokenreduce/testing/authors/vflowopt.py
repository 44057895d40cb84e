"""VFlowOpt's vision-side pruning as the authors run it (sihany077/VFlowOpt siglip_encoder.py
importance + llava_qwen_training_free.py token merging): eager attention of the scoring
layer, head mean, rows of the "global" tokens (received > t * mean) averaged, plus
alpha_v * softmax(patch entropy); the reduce + int(N/a^2) least important tokens are grouped
by floor(row / a), floor(col / a) cells, each group's attention-weighted average replaces its
most important member; output = tokens left in the mask, spatial order; per-sample loop."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import vit_layer_qkv
from .eager_attention import eager_vit_attention


def vflowopt_entry_counts(image_token_length: int, illava_vit_r: float, illava_vit_m: float):
    """llava_qwen_training_free.py: ``reduce_tokens = round(N (1 - illava_vit_r))``,
    ``num_merged_tokens = int(N / (m * m))``; the lowest reduce + merged tokens go to recycling.
    Returns (reduce_tokens, num_merged_tokens)."""
    return round(image_token_length * (1 - illava_vit_r)), int(image_token_length / (illava_vit_m * illava_vit_m))


def vflowopt_importance_authors(probs: Tensor, t: float = 0.0, entropy: Optional[Tensor] = None,
                                alpha_v: float = 0.0) -> Tensor:
    """probs [B, H, N, N] (eager) -> [B, N] combined attention map (+ entropy term)."""
    out = []
    A = probs.float().mean(1)
    for i in range(A.shape[0]):
        received = A[i].mean(0)
        rows = torch.nonzero(received > t * received.mean(), as_tuple=True)[0]
        comb = A[i][rows, :].mean(0)
        if entropy is not None:
            comb = comb + alpha_v * torch.softmax(entropy[i].reshape(-1), dim=0)
        out.append(comb)
    return torch.stack(out)


def vflowopt_merge_authors(features: Tensor, attn_map: Tensor, h: int, w: int, a: float, n_low: int):
    """features [B, N, D], attn_map [B, N] -> list of (tokens [M_b, D], positions [M_b]) per sample."""
    res = []
    for i in range(features.shape[0]):
        feat = features[i].float().clone()
        amap = attn_map[i]
        low = torch.sort(amap, dim=-1, stable=True).indices[:n_low]
        keep = torch.ones(amap.shape[0], dtype=torch.bool)
        keep[low] = False
        pts = torch.stack([low // w, low % w], dim=1)
        cells = (pts.float() / a).floor().long()
        _, inv = torch.unique(cells, dim=0, return_inverse=True)
        for g in range(int(inv.max()) + 1 if inv.numel() else 0):
            grp = low[inv == g]
            wt = amap[grp].float()
            wt = wt / wt.sum()
            merged = (wt[:, None] * feat[grp]).sum(0)
            rep = grp[amap[grp].argmax()]
            feat[rep] = merged
            keep[rep] = True
        res.append((feat[keep], torch.arange(amap.shape[0])[keep]))
    return res


def vflowopt_ours(features: Tensor, qkv, keep: int, a: float):
    _, rec = ops.attention_with_scores(*qkv)
    return build("vflowopt", keep=keep, a=a)(Context(x=features, attn_received={-2: rec}))


def bench_cases(quick: bool):
    N, D, H, Dh = (64, 64, 4, 16) if quick else (576, 1024, 16, 64)
    a = 4.0 if quick else 17.386981849158786
    keep = 24 if quick else 64
    h = w = int(math.isqrt(N))
    _, n_low, _ = build("vflowopt", keep=keep, a=a).counts(N, h, w)   # recycled tokens (the authors' n_low)

    def case(B):
        def make():
            return torch.randn(B, N, D, generator=torch.Generator().manual_seed(0)), vit_layer_qkv(B, N, H, Dh, 5)

        return MethodBenchCase(
            "vflowopt", f"B={B} N={N} D={D} keep={keep}", make,
            ours=lambda t: vflowopt_ours(t[0], t[1], keep, a),
            # both sides run the layer's whole attention (output included), as in a model
            authors=lambda t: vflowopt_merge_authors(t[0], vflowopt_importance_authors(eager_vit_attention(*t[1])[1]),
                                                     h, w, a, n_low))
    return [case(B) for B in (1, 16)]


def patch_entropy_authors(pixel_values: Tensor, patch_size: int = 14) -> Tensor:
    """SigLipVisionEmbeddings.forward's entropy as the authors compute it: unfold patches, x255 to
    uint8, grey = 0.3333-weighted channel sum, rounded, 256-bin histogram, -sum p log2(p + 1e-10)."""
    B, C, H, W = pixel_values.shape
    p = pixel_values.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    p = p.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, C, patch_size, patch_size)
    p = (p * 255).to(dtype=torch.uint8).to(torch.float32)
    grey = (p * torch.tensor([0.3333, 0.3333, 0.3333]).view(1, 3, 1, 1)).sum(dim=1)
    flat = torch.round(grey.view(grey.size(0), -1)).to(torch.long)
    hist = torch.zeros(flat.shape[0], 256).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    prob = hist / hist.sum(dim=1, keepdim=True)
    return (-torch.sum(prob * torch.log2(prob + 1e-10), dim=1)).view(B, -1)
