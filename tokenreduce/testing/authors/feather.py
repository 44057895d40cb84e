"""FEATHER as the authors run it (markendo/FEATHER llama2_models.py FastVLlamaModel with
fastv_predefined_mask='no_rope_s=3', fastv_k=[8, 16], fastv_ratio=0.7): the last token's
query against the image keys only, no RoPE, float32 softmax over the image keys, head mean;
stage 1 = unique(top int(N r) + the [::s, ::s] grid), stage 2 = top int(n1 r^2); sorted;
per-sample loop (the authors run batch 1). The authors' code returns the kept positions; ours is
timed the way `tokenreduce.models.llm` runs it: the fused op with the keys standing in for the
values (`tokenreduce.models.llm_scores`) and a pruning Reduction whose tokens are never gathered
(`Context.lazy_tokens`: the model gathers the next sequence from the hidden states itself)."""
from __future__ import annotations

import math
from typing import Dict

import numpy
import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build
from tokenreduce.models.llm_scores import unused_values

from . import MethodBenchCase
from ..synthetic import llm_inputs


def feather_entry_counts(n: int, fastv_ratio: float = 0.7, stride: int = 3, overlap: int = 0):
    """FastVLlamaModel (fastv_predefined_mask='no_rope_s=S', fastv_k=[8, 16]): kept share
    ``1 - fastv_ratio``; stage 1 = unique(top int(n r) + the [::S, ::S] grid) (``overlap`` =
    top tokens that fall on the grid), stage 2 = top int(n1 r * r) of the n1 left
    (image_indices is re-set to the kept tokens after stage 1)."""
    r = 1 - fastv_ratio
    g = int(math.sqrt(n))
    n1 = int(n * r) + len(range(0, g, stride)) ** 2 - overlap
    return n1, int(n1 * (r * r))


def feather_attention(q: Tensor, k: Tensor, image_idx: Tensor) -> Tensor:
    """calculate_attention_weight without RoPE, one sample: q/k [H, T, Dh] -> [n]."""
    qt = q[:, -1:, :].float()
    ki = k[:, image_idx, :].float()
    w = qt @ ki.transpose(1, 2) / math.sqrt(q.shape[-1])
    return torch.softmax(w, dim=-1).mean(dim=0)[0]


def feather_stage1_authors(q: Tensor, k: Tensor, start: int, n: int, r: float = 0.3, stride: int = 3):
    out = []
    for i in range(q.shape[0]):
        idx = torch.arange(start, start + n)
        score = feather_attention(q[i], k[i], idx)
        top = score.topk(int(n * r)).indices
        g = int(math.sqrt(n))
        strided = torch.from_numpy(numpy.arange(n).reshape(g, g)[::stride, ::stride].flatten())
        out.append(torch.unique(torch.cat([top, strided]), sorted=True))
    return out                                                      # list: counts may differ per sample


def feather_stage2_authors(q: Tensor, k: Tensor, start: int, n1: int, r: float = 0.3):
    out = []
    for i in range(q.shape[0]):
        score = feather_attention(q[i], k[i], torch.arange(start, start + n1))
        out.append(score.topk(int(n1 * r * r)).indices.sort().values)
    return torch.stack(out)


def feather_ours(stage: Dict[str, object], layer: int, method, state: dict):
    st, n = stage["start"], stage["n_img"]
    q, k = stage["q"], stage["k"]
    kk = k[:, :, st:st + n]
    _, sc = ops.attention_with_scores(q[:, :, -1:], kk, unused_values(kk))   # scores only, as llm_scores
    ctx = Context(x=stage["hidden"][:, st:st + n], query_attn_norope={layer: sc}, layer=layer - 1, state=state,
                  lazy_tokens=True)
    return method(ctx)


def bench_cases(quick: bool):
    n, D, H, Dh = (81, 128, 4, 32) if quick else (576, 4096, 32, 128)

    def case(B):
        return MethodBenchCase(
            "feather", f"B={B} n={n} D={D} stage 1",
            make=lambda: llm_inputs(B, n, D, H, Dh, seed=0),
            ours=lambda d: feather_ours(d, 8, build("feather"), {}),
            authors=lambda d: feather_stage1_authors(d["q"], d["k"], d["start"], n))
    return [case(B) for B in (1, 16)]
