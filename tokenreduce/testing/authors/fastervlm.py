"""FasterVLM as Theia-4869/FasterVLM llava/model/llava_arch.py encode_images does it."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def fastervlm(image_features: Tensor, image_attentions: Tensor, visual_token_num: int) -> Tensor:
    """image_features ``[B, n, C]`` (no [CLS]), image_attentions ``[B, H, n]`` (the [CLS]
    row of each head, image columns) -> ``[B, T, C]`` in spatial order."""
    B, N, C = image_features.shape
    attn = image_attentions.mean(dim=1)
    token_indices = torch.topk(attn, k=visual_token_num, dim=1)[1]
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    return torch.stack([f[m] for f, m in zip(image_features, index_masks)], dim=0)


def bench_cases(quick: bool):
    n, D, keep = (64, 64, 16) if quick else (576, 1024, 64)

    def case(B):
        m = build("fastervlm", keep=keep)
        return MethodBenchCase(
            "fastervlm", f"B={B} N={n + 1} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=3, layers=(22,)),
            ours=lambda t: m(Context(x=t.x, has_cls=True, cls_attn=t.cls_attn, num_layers=24)).tokens,
            authors=lambda t: fastervlm(t.x[:, 1:], t.cls_heads[22][:, :, 1:], keep))
    return [case(B) for B in ((1, 4) if quick else (1, 16))]
