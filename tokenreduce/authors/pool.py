"""Pooling to a grid (LLaVolta / Matryoshka style) as their code does it: reshape the
patch tokens to ``[B, D, h, w]`` and average-pool with a fixed stride."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_tokens(image_features: Tensor, h: int, w: int, stride: int) -> Tensor:
    """``[B, h*w, D]`` -> ``[B, (h/stride)*(w/stride), D]``."""
    B, n, D = image_features.shape
    img = image_features.transpose(1, 2).reshape(B, D, h, w)
    return F.avg_pool2d(img, stride, stride).flatten(2).transpose(1, 2)


def bench_cases(quick: bool):
    from ..methods import Context, build
    from . import MethodBenchCase
    from .synthetic import clip_like
    shapes = [(1, 64, 64)] if quick else [(1, 576, 1024), (16, 576, 1024)]
    cases = []
    for B, n, D in shapes:
        s = int(n ** 0.5)
        m = build("pool", keep=(s // 3) ** 2)
        cases.append(MethodBenchCase(
            "pool", f"B={B} N={n} D={D} keep={(s // 3) ** 2}",
            lambda B=B, n=n, D=D: clip_like(B, n, D, seed=9, layers=()).x[:, 1:].contiguous(),
            lambda x, m=m: m(Context(x=x)).tokens,
            lambda x, s=s: pool_tokens(x, s, s, 3)))
    return cases
