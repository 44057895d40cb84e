"""VisionZip as dvlab-research/VisionZip visionzip/clip_encoder.py does it: head-summed
[CLS] row, boolean masks and masked_select, strided targets, one-hot bmm merge."""
from __future__ import annotations

import torch
from torch import Tensor


def visionzip(hidden_states: Tensor, cls_heads: Tensor, metric: Tensor, dominant_num: int,
              contextual_num: int) -> Tensor:
    """hidden_states ``[B, 1 + n, D]``, cls_heads ``[B, H, 1 + n]`` (the [CLS] row of each
    head), metric ``[B, 1 + n, C]`` (head-mean keys) -> ``[B, 1 + d + c, D]``."""
    B, N, D = hidden_states.shape
    cls_attention_sum = cls_heads[:, :, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(B, 1, dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones(B, N, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, D)
    metric_f = metric[mask].view(B, N - (dominant_num + 1), metric.shape[2])
    hidden_f = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, N - (dominant_num + 1), D)
    metric_n = metric_f / metric_f.norm(dim=-1, keepdim=True)
    R = metric_n.shape[1]
    step = max(1, R // contextual_num)
    target_indices = torch.arange(0, R, step)[:contextual_num]
    targets = metric_n[:, target_indices, :]
    others_mask = ~torch.isin(torch.arange(R), target_indices)
    to_merge = metric_n[:, others_mask, :]
    similarity = torch.bmm(to_merge, targets.transpose(1, 2))
    assign = torch.zeros(B, to_merge.shape[1], contextual_num, dtype=hidden_states.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_f[:, others_mask, :]) / counts
    contextual = hidden_f[:, target_indices, :] + aggregated
    return torch.cat([dominant, contextual], dim=1)


def bench_cases(quick: bool):
    from ..methods import Context, build
    from . import MethodBenchCase
    from .synthetic import clip_like
    shapes = [(1, 64, 64), (4, 64, 64)] if quick else [(1, 576, 1024), (16, 576, 1024)]
    cases = []
    for B, n, D in shapes:
        keep = 16 if quick else 64
        m = build("visionzip", keep=keep)
        d_, c_ = m._split(n)

        def make(B=B, n=n, D=D):
            return clip_like(B, n, D, seed=2, layers=(22,))

        cases.append(MethodBenchCase(
            "visionzip", f"B={B} N={n + 1} D={D} keep={keep}", make,
            lambda t, m=m: m(Context(x=t.x, keys=t.keys, has_cls=True, cls_attn=t.cls_attn,
                                     num_layers=24)).tokens,
            lambda t, d_=d_, c_=c_: visionzip(t.x, t.cls_heads[22], t.keys, d_, c_)))
    return cases
