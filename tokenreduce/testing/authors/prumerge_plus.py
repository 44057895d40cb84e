"""PruMerge+ as 42Shawn/LLaVA-PruMerge clip_encoder.py token_prune_merge_advanced_plus
does it (adaptive branch), from the [CLS] attention row, keys and features. The
authors' code is batch 1 (the outlier ratio and the sample filter flatten the batch);
looped per sample here."""
from __future__ import annotations

from typing import List

import numpy
import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def outlier_ratio(attn: Tensor) -> float:
    a = attn.to(torch.float32).cpu().numpy().flatten()
    q1, q3 = numpy.percentile(a, 25), numpy.percentile(a, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return len(numpy.where(a > upper)[0]) / len(a)


def complement_idx(idx: Tensor, dim: int) -> Tensor:
    keep = torch.ones(dim, dtype=torch.bool)
    keep[idx] = False
    return torch.arange(dim)[keep]


def prumerge_plus_one(features: Tensor, keys: Tensor, cls_attn: Tensor, neighbours: int = 32):
    """features ``[n, C]``, keys ``[n, Ck]``, cls_attn ``[n]`` -> (tokens ``[K, C]``,
    kept positions ``[K - 1]`` in order)."""
    N, C = features.shape
    ratio = outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * ratio), largest=True)
    step_length = int(1 / ratio)
    seq = torch.arange(0, N - 1, int(step_length / 3))
    kept_set = set(idx.tolist())
    filtered = torch.tensor([int(v) for v in seq if int(v) not in kept_set], dtype=torch.long)
    idx = torch.cat([idx, filtered])
    x_others = features[idx]
    x_others_attn = cls_attn[idx]
    key_others = torch.nn.functional.normalize(keys[idx].float(), p=2, dim=-1)
    compl = complement_idx(idx, N)
    non_topk = features[compl]
    non_topk_key = torch.nn.functional.normalize(keys[compl].float(), p=2, dim=-1)
    non_topk_attn = cls_attn[compl]
    updated = torch.zeros_like(x_others)
    for i in range(len(idx)):
        rest_x = torch.cat([x_others[:i], x_others[i + 1:], non_topk])
        rest_attn = torch.cat([x_others_attn[:i], x_others_attn[i + 1:], non_topk_attn])
        rest_keys = torch.cat([key_others[:i], key_others[i + 1:], non_topk_key])
        cos = rest_keys @ key_others[i]
        _, cluster = torch.topk(cos, k=neighbours, largest=True)
        updated[i] = x_others[i] + torch.sum(rest_x[cluster] * rest_attn[cluster, None], dim=0)
    extra = torch.sum(non_topk * non_topk_attn[:, None], dim=0, keepdim=True)
    return torch.cat([updated, extra]), idx


def prumerge_plus(features: Tensor, keys: Tensor, cls_attn: Tensor) -> List[Tensor]:
    """Per sample (the adaptive count differs): a list of ``[K_b, C]``."""
    return [prumerge_plus_one(f, k, a)[0] for f, k, a in zip(features, keys, cls_attn)]


def bench_cases(quick: bool):
    n, D, keep = (64, 64, 16) if quick else (576, 1024, 64)

    def case(B):
        m = build("prumerge+", keep=keep)
        return MethodBenchCase(
            "prumerge+", f"B={B} N={n + 1} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=6, layers=(23,)),
            ours=lambda t: m(Context(x=t.x, keys=t.keys, has_cls=True, cls_attn=t.cls_attn,
                                     num_layers=24)).tokens,
            authors=lambda t: prumerge_plus(t.x[:, 1:], t.keys[:, 1:], t.cls_attn[23][:, 1:]),
            extra={"note": "authors' count is adaptive (about 4x the outliers + 1); ours is keep"})
    return [case(B) for B in ((1, 2) if quick else (1, 16))]
