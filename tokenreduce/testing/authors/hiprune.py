"""HiPrune as the authors run it (Danielement321/HiPrune LLaVA/llava/model/llava_arch.py
encode_images): eager ViT attentions [B, H, 1+N, 1+N] of the object layer and of layer -2,
"global" attention = head mean then query mean, [CLS] dropped; anchors top-k, buffer +-1 /
+-w clamped, unique, deep top-k over the rest after subtracting the mask; per-sample loop."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import vit_layer_qkv
from .eager_attention import eager_vit_attention


def hiprune_entry(features: Tensor, shallow_probs: Tensor, deep_probs: Tensor, retention: int,
                  alpha: float = 0.1) -> Tensor:
    """The authors' entry (llava_arch.py encode_images): ``HIPRUNE_RETENTION=R`` is the budget of
    the whole concatenated batch, ``visual_token_num = int(R / B)`` per image row (LLaVA-NeXT: the
    crops of one image are the B rows; LLaVA-1.5: B = 1, keep = R). Returns [B, int(R / B)]."""
    return hiprune_authors(features, shallow_probs, deep_probs, int(int(retention) / features.shape[0]), alpha)


def hiprune_authors(features: Tensor, shallow_probs: Tensor, deep_probs: Tensor, keep: int,
                    alpha: float = 0.1) -> Tensor:
    """features [B, N, C] (patch tokens), *_probs [B, H, 1+N, 1+N] -> kept positions [B, keep] sorted."""
    B, N = features.shape[:2]
    w = int(math.isqrt(N))
    deep = deep_probs.float().mean(dim=1).mean(dim=1)[:, 1:].clone()
    shallow = shallow_probs.float().mean(dim=1).mean(dim=1)[:, 1:]
    n_anchor = round(keep * alpha / 5)
    out = []
    for i in range(B):
        a = torch.topk(shallow[i].unsqueeze(0), k=n_anchor, dim=1)[1]
        a = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=1).clamp(0, N - 1)
        a = torch.unique(a, sorted=False).unsqueeze(0)
        deep_num = keep - a.shape[1]
        m = torch.zeros(1, N, dtype=torch.bool).scatter_(1, a, 1)
        deep[i] -= m.int().squeeze()
        d = torch.topk(deep[i].unsqueeze(0), k=deep_num, dim=1)[1]
        out.append(torch.sort(torch.cat([a, d], dim=1), dim=1)[0][0])
    return torch.stack(out)


def hiprune_ours(features: Tensor, qkv_shallow, qkv_deep, keep: int, alpha: float = 0.1):
    """The engine's path: fused attention-received scores of both layers, then the method."""
    _, sh = ops.attention_with_scores(*qkv_shallow)
    _, dp = ops.attention_with_scores(*qkv_deep)
    ctx = Context(x=features, has_cls=True, attn_received={8: sh, -2: dp})
    return build("hiprune", keep=keep, alpha=alpha)(ctx)


def bench_cases(quick: bool):
    N, D, H, Dh = (65, 64, 4, 16) if quick else (577, 1024, 16, 64)
    keep = (N - 1) // 3

    def case(B):
        def make():
            feats = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1))
            return feats, vit_layer_qkv(B, N, H, Dh, 2), vit_layer_qkv(B, N, H, Dh, 3)

        return MethodBenchCase(
            "hiprune", f"B={B} N={N} D={D} keep={keep}", make,
            ours=lambda t: hiprune_ours(t[0], t[1], t[2], keep),
            # both sides run the two layers' whole attention (output included), as in a model
            authors=lambda t: hiprune_authors(t[0][:, 1:], eager_vit_attention(*t[1])[1],
                                              eager_vit_attention(*t[2])[1], keep))
    return [case(B) for B in (1, 16)]
