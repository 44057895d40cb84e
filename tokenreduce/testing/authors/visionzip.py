"""VisionZip as dvlab-research/VisionZip (@3151f6d) does it, from its entry point:
``visionzip/main.py`` ``visionzip(model, dominant, contextual)`` hands ``dominant - 1`` to the
encoder; ``visionzip/clip_encoder.py`` keeps [CLS] + the top ``dominant - 1`` (head-summed
[CLS] row, boolean masks and masked_select) + ``contextual`` merged tokens (strided targets,
one-hot bmm merge); ``visionzip/llava_arch.py`` ``encode_images_visionzip`` puts all of them,
[CLS] included, through the projector: ``dominant + contextual`` tokens into the LLM."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def visionzip(hidden_states: Tensor, cls_heads: Tensor, metric: Tensor, dominant: int,
              contextual: int) -> Tensor:
    """The entry point ``visionzip(model, dominant=54, contextual=10)``: the tokens the
    projector receives, ``[B, dominant + contextual, D]`` ([CLS] first)."""
    return clip_encoder_forward(hidden_states, cls_heads, metric, dominant - 1, contextual)


def clip_encoder_forward(hidden_states: Tensor, cls_heads: Tensor, metric: Tensor, dominant_num: int,
                         contextual_num: int) -> Tensor:
    """``CLIPVisionTower_VisionZip.forward`` after the tower: hidden_states ``[B, 1 + n, D]``,
    cls_heads ``[B, H, 1 + n]`` (the [CLS] row of each head), metric ``[B, 1 + n, C]``
    (head-mean keys) -> ``[B, 1 + dominant_num + contextual_num, D]``."""
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
    # (dominant, contextual) of visionzip(): the authors' LLaVA-1.5 split of 64 tokens; 14 + 2 (quick)
    n, D, (dom, ctx) = (64, 64, (14, 2)) if quick else (576, 1024, (54, 10))

    def case(B):
        m = build("visionzip", dominant=dom, contextual=ctx)
        return MethodBenchCase(
            "visionzip", f"B={B} N={n + 1} D={D} keep={dom + ctx}",
            make=lambda: clip_like(B, n, D, seed=2, layers=(22,)),
            ours=lambda t: m(Context(x=t.x, keys=t.keys, has_cls=True, cls_attn=t.cls_attn,
                                     num_layers=24)).tokens,
            authors=lambda t: visionzip(t.x, t.cls_heads[22], t.keys, dom, ctx))
    return [case(B) for B in ((1, 4) if quick else (1, 16))]
