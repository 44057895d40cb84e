"""Pooling to a grid (LLaVolta / Matryoshka style) as their code does it: reshape the
patch tokens to ``[B, D, h, w]`` and average-pool with a fixed stride."""
from __future__ import annotations

from torch import Tensor
from torch.nn.functional import avg_pool2d

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def pool_tokens(image_features: Tensor, h: int, w: int, stride: int) -> Tensor:
    """``[B, h*w, D]`` -> ``[B, (h/stride)*(w/stride), D]``."""
    B, n, D = image_features.shape
    img = image_features.transpose(1, 2).reshape(B, D, h, w)
    return avg_pool2d(img, stride, stride).flatten(2).transpose(1, 2)


def bench_cases(quick: bool):
    n, D = (64, 64) if quick else (576, 1024)
    side = int(n ** 0.5)
    keep = (side // 3) ** 2

    def case(B):
        m = build("pool", keep=keep)
        return MethodBenchCase(
            "pool", f"B={B} N={n} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=9, layers=()).x[:, 1:].contiguous(),
            ours=lambda x: m(Context(x=x)).tokens,
            authors=lambda x: pool_tokens(x, side, side, 3))
    return [case(B) for B in ((1,) if quick else (1, 16))]
