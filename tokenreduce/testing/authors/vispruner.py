"""VisPruner as Theia-4869/VisPruner (@aefa01a) does it, from its entry point: the eval
scripts' ``--visual_token_num T --important_ratio r`` reach ``LlavaMetaForCausalLM.encode_images``
(llava/model/llava_arch.py), which gets the 'patch' features and the [CLS] rows of
``attentions[select_layer]`` from ``CLIPVisionTower.feature_select`` ([CLS] dropped), keeps
``int(T * r)`` important tokens by head-mean [CLS] attention, removes duplicates from the rest
8 at a time, and builds a boolean index mask (spatial order)."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def encode_images(image_features: Tensor, image_attentions: Tensor, visual_token_num: int,
                  important_ratio: float = 0.5, stable: bool = False) -> Tensor:
    """image_features ``[B, N, C]`` (no [CLS]), image_attentions ``[B, H, N]`` (the [CLS] row
    of each head, image columns) -> the kept features ``[B, T, C]`` in spatial order.
    ``stable=True``: the argsorts break exact ties to the earlier place (the authors' argsort
    leaves them to the backend; float32 scores of a round do tie exactly now and then)."""
    B, N, C = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True, stable=stable)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True, stable=stable)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, selected_indices, True)
    return torch.stack([f[m] for f, m in zip(image_features, index_masks)], dim=0)


def bench_cases(quick: bool):
    n, D, keep = (64, 64, 16) if quick else (576, 1024, 64)

    def case(B):
        m = build("vispruner", keep=keep)
        return MethodBenchCase(
            "vispruner", f"B={B} N={n + 1} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=5, layers=(22,)),
            ours=lambda t: m(Context(x=t.x, has_cls=True, cls_attn=t.cls_attn, num_layers=24)).tokens,
            authors=lambda t: encode_images(t.x[:, 1:], t.cls_heads[22][:, :, 1:], keep))
    return [case(B) for B in ((1, 4) if quick else (1, 16))]
