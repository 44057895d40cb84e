"""VTC-CLS as THU-MIG/VTC-CLS does it: cls_token_only (clip_encoder.py) sums the
head-mean [CLS] rows of attentions[start_layer:-1]; encode_images (llava_arch.py) takes
the topk and re-sorts by position id. Batch 1 in the authors (``squeeze(0)``): looped."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def vtc_cls(image_features: Tensor, cls_heads: Dict[int, Tensor], num_layers: int,
            start_layer: int, token_num: int) -> Tensor:
    """image_features ``[B, 1 + n, C]``; cls_heads: layer -> ``[B, H, 1 + n]`` for every
    layer (0-based); returns ``[B, token_num, C]`` (image tokens only, as LLaVA)."""
    outs = []
    layers = list(range(num_layers))[start_layer:-1]
    for b in range(image_features.shape[0]):
        multi = [cls_heads[l][b].mean(dim=0)[1:] for l in layers]
        cls_attn_sum = torch.sum(torch.stack(multi), dim=0)
        _, idx = torch.topk(cls_attn_sum, token_num, dim=0, largest=True)
        feats = image_features[b:b + 1, 1:]
        old_position_ids = torch.arange(0, feats.shape[1]).unsqueeze(0)
        feats = feats[:, idx, :]
        new_position_ids = old_position_ids[:, idx]
        sorted_indices = torch.argsort(new_position_ids, dim=1)
        outs.append(feats[:, sorted_indices[0], :])
    return torch.cat(outs, dim=0)


def bench_cases(quick: bool):
    n, D, keep = (64, 64, 16) if quick else (576, 1024, 64)

    def case(B):
        m = build("vtc-cls", keep=keep, start_layer=12)
        return MethodBenchCase(
            "vtc-cls", f"B={B} N={n + 1} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=4, layers=range(12, 23)),
            ours=lambda t: m(Context(x=t.x, has_cls=True, cls_attn=t.cls_attn, num_layers=24)).tokens,
            authors=lambda t: vtc_cls(t.x, t.cls_heads, 24, 12, keep))
    return [case(B) for B in ((1, 4) if quick else (1, 16))]
