"""Synthetic but consistent inputs for the method tests and benchmarks (test-only).

`clip_like` builds, for a ViT with a [CLS] token, features x ``[B, 1 + n, D]``, head-mean
keys ``[B, 1 + n, Dk]`` and, for each requested layer, the per-head [CLS] attention row
``[B, H, 1 + n]`` (a softmax, so each row sums to 1, with a few peaked "outlier" tokens
as in real CLIP attention) and its head mean. `vit_layer_qkv` / `vit_layers_qkv` make one
or several ViT layers' q/k/v; `llm_inputs` one decoder layer's hidden states and q/k/v over
a sequence [system prefix | image tokens | text], `drop_image_tokens` the next stage's.
All values are tie-free with probability 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class ClipLike:
    x: Tensor                          # [B, 1 + n, D]
    keys: Tensor                       # [B, 1 + n, Dk] head-mean keys
    cls_heads: Dict[int, Tensor]       # layer -> [B, H, 1 + n] per-head [CLS] attention
    cls_attn: Dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, 1 + n] head mean
    grid: tuple = (24, 24)

    def to(self, dtype: torch.dtype) -> "ClipLike":
        return ClipLike(self.x.to(dtype), self.keys.to(dtype), self.cls_heads, self.cls_attn, self.grid)


def clip_like(B: int = 1, n: int = 576, D: int = 1024, *, Dk: int = 64, heads: int = 16,
              layers: Iterable[int] = (22, 23), seed: int = 0, outliers: int = 24,
              grid: Optional[tuple] = None) -> ClipLike:
    g = torch.Generator().manual_seed(seed)
    N = n + 1
    x = torch.randn(B, N, D, generator=g)
    keys = torch.randn(B, N, Dk, generator=g) + 0.3 * torch.randn(B, 1, Dk, generator=g)
    cls_heads, cls_attn = {}, {}
    for l in layers:
        logits = torch.randn(B, heads, N, generator=g)
        hot = torch.randint(1, N, (B, outliers), generator=g)
        boost = torch.zeros(B, N).scatter(1, hot, 4.0 + torch.rand(B, outliers, generator=g))
        p = torch.softmax(logits + boost[:, None, :], dim=-1)
        cls_heads[l] = p
        cls_attn[l] = p.mean(dim=1)
    if grid is None:
        s = int(n ** 0.5)
        grid = (s, n // s)
    return ClipLike(x, keys, cls_heads, cls_attn, grid)


def random_qkv(g: torch.Generator, shape: Tuple[int, ...], peaked: float = 2.0,
               dtype=torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v of ``shape`` (drawn in that order from ``g``); ``peaked`` scales q so the
    attention is far from uniform (tie-free rankings)."""
    q = torch.randn(*shape, generator=g) * peaked
    k = torch.randn(*shape, generator=g)
    v = torch.randn(*shape, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def vit_layer_qkv(B: int, N: int, H: int, Dh: int, seed: int, peaked: float = 2.0, dtype=torch.float32):
    """One ViT layer's q/k/v ``[B, H, N, Dh]``."""
    return random_qkv(torch.Generator().manual_seed(seed), (B, H, N, Dh), peaked, dtype)


def vit_layers_qkv(B: int, N0: int, H: int, Dh: int, L: int, seed: int = 0,
                   dtype=torch.float32) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """``L`` ViT layers' q/k/v ``[B, H, N0, Dh]`` of the same (original) tokens."""
    g = torch.Generator().manual_seed(seed)
    return [random_qkv(g, (B, H, N0, Dh), 2.0, dtype) for _ in range(L)]


def llm_inputs(B: int, n_img: int, D: int = 256, H: int = 8, Dh: int = 32, pre: int = 35, post: int = 20,
               seed: int = 0, dtype=torch.float32, peaked: float = 2.0) -> Dict[str, object]:
    """Random hidden states [B, T, D] and q/k/v [B, H, T, Dh] (post-RoPE, as the layer uses
    them) of one decoder layer; image tokens at ``start = pre`` .. ``pre + n_img``."""
    g = torch.Generator().manual_seed(seed)
    T = pre + n_img + post
    hidden = torch.randn(B, T, D, generator=g)
    q, k, v = random_qkv(g, (B, H, T, Dh), peaked, dtype)
    return dict(hidden=hidden.to(dtype), q=q, k=k, v=v, start=pre, n_img=n_img)


def drop_image_tokens(d: Dict[str, object], kept: Tensor, seed: int) -> Dict[str, object]:
    """The next stage's inputs: image tokens reduced to ``kept`` [B, k] (positions among the
    image tokens), fresh q/k/v for the shorter sequence (the next layer's projections)."""
    hidden = d["hidden"]
    B, T, D = hidden.shape
    s, n = d["start"], d["n_img"]
    img = torch.gather(hidden[:, s:s + n], 1, kept.unsqueeze(-1).expand(-1, -1, D))
    new_hidden = torch.cat([hidden[:, :s], img, hidden[:, s + n:]], dim=1)
    H, Dh = d["q"].shape[1], d["q"].shape[3]
    out = llm_inputs(B, kept.shape[1], D, H, Dh, pre=s, post=T - s - n, seed=seed, dtype=hidden.dtype)
    out["hidden"] = new_hidden
    return out
