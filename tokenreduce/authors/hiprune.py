"""HiPrune as the authors run it (Danielement321/HiPrune LLaVA/llava/model/llava_arch.py
encode_images): eager ViT attentions [B, H, 1+N, 1+N] of the object layer and of layer -2,
"global" attention = head mean then query mean, [CLS] dropped; anchors top-k, buffer +-1 /
+-w clamped, unique, deep top-k over the rest after subtracting the mask; per-sample loop."""
from __future__ import annotations

import math

import torch
from torch import Tensor


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


def vit_layer_qkv(B: int, N: int, H: int, Dh: int, seed: int, peaked: float = 2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, Dh, generator=g) * peaked
    k = torch.randn(B, H, N, Dh, generator=g)
    v = torch.randn(B, H, N, Dh, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def eager_vit_probs(q: Tensor, k: Tensor) -> Tensor:
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def hiprune_ours(features: Tensor, qkv_shallow, qkv_deep, keep: int, alpha: float = 0.1):
    """The engine's path: fused attention-received scores of both layers, then the method."""
    from .. import ops
    from ..methods import Context, build
    _, sh = ops.attention_with_scores(*qkv_shallow)
    _, dp = ops.attention_with_scores(*qkv_deep)
    ctx = Context(x=features, has_cls=True, attn_received={8: sh, -2: dp})
    return build("hiprune", keep=keep, alpha=alpha)(ctx)


def bench_case(B: int, quick: bool):
    N, D, H, Dh = (65, 64, 4, 16) if quick else (577, 1024, 16, 64)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, N, D, generator=g)
    sh, dp = vit_layer_qkv(B, N, H, Dh, 2), vit_layer_qkv(B, N, H, Dh, 3)
    keep = (N - 1) // 3

    def ours(f, a, b):
        return hiprune_ours(f, a, b, keep)

    def authors(f, a, b):
        return hiprune_authors(f[:, 1:], eager_vit_probs(a[0], a[1]), eager_vit_probs(b[0], b[1]), keep)
    return ours, authors, (feats, sh, dp)
