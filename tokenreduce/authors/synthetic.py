"""Synthetic but consistent CLIP-like inputs for the method tests and benchmarks.

`clip_like` builds, for a ViT with a [CLS] token, features x ``[B, 1 + n, D]``, head-mean
keys ``[B, 1 + n, Dk]`` and, for each requested layer, the per-head [CLS] attention row
``[B, H, 1 + n]`` (a softmax, so each row sums to 1, with a few peaked "outlier" tokens
as in real CLIP attention) and its head mean. All values are tie-free with probability 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

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
