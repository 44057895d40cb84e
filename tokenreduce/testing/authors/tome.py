"""ToMe as facebookresearch/ToMe tome/merge.py does it (bipartite_soft_matching,
merge_wavg) for one block, plus the method's benchmark case."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False) -> Callable:
    """ToMe's matching: A = even, B = odd tokens; the r best A->B edges merge."""
    protected = int(class_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_merge(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None,
               class_token: bool = True) -> Tuple[Tensor, Tensor]:
    """One ToMeBlock merge: x ``[B, N, D]``, metric ``[B, N, C]``, size ``[B, N, 1]``."""
    merge = bipartite_soft_matching(metric, r, class_token)
    return merge_wavg(merge, x, size)


def bench_cases(quick: bool):
    n, D = (64, 64) if quick else (576, 1024)
    r = n // 36 if quick else 16

    def case(B):
        def make():
            d = clip_like(B, n, D, seed=1, layers=())
            return d.x, d.keys

        m = build("tome", r=r)
        return MethodBenchCase(
            "tome", f"B={B} N={n + 1} D={D} r={r}", make,
            ours=lambda t: m(Context(x=t[0], keys=t[1], has_cls=True)).tokens,
            authors=lambda t: tome_merge(t[0], t[1], r)[0])
    return [case(B) for B in ((1, 4) if quick else (1, 16))]
