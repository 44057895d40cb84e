"""DivPrune as vbdi/divprune does it: the full 1 - cosine matrix, a greedy loop whose
first pick maximises the distance to the nearest neighbour (second-smallest of the
column) and later picks maximise the min distance to the picked rows. Per sample."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def pairwise_cosine_similarity(x: Tensor) -> Tensor:
    xn = x / x.norm(dim=-1, keepdim=True)
    return xn @ xn.t()


def divprune_select(features: Tensor, k: int) -> Tensor:
    """features ``[n, D]`` -> the k picks ``[k]`` in pick order."""
    cosine_matrix = 1.0 - pairwise_cosine_similarity(features.float())
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            m2 = torch.index_select(cosine_matrix, 0, s[:i])
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def divprune(image_features: Tensor, k: int) -> Tensor:
    """``[B, n, D]`` -> picks ``[B, k]`` (pick order), one sample at a time."""
    return torch.stack([divprune_select(f, k) for f in image_features])


def divprune_entry(image_features: Tensor, subset_ratio: float) -> Tensor:
    """The entry point: ``SUBSET_RATIO=r`` (LLaVA/llava/model/llava_arch.py
    prepare_inputs_labels_for_multimodal, LAYER_INDEX=0) keeps ``threshold_terms =
    int(round(r * n))`` of the projected image features (``[B, n, D]``, no [CLS]: LLaVA's
    "default" select), then ``keep_indexs.sort()``: ``[B, k, D]`` in spatial order."""
    k = int(round(subset_ratio * image_features.shape[1]))
    picks = divprune(image_features, k).sort(dim=1).values
    return image_features.gather(1, picks[..., None].expand(-1, -1, image_features.shape[-1]))


def min_dist_objective(image_features: Tensor, picks: Tensor) -> Tensor:
    """k-center objective: the largest distance of a token to its nearest pick ``[B]``."""
    out = []
    for f, p in zip(image_features, picks):
        d = 1.0 - pairwise_cosine_similarity(f.float())
        out.append(d[p].min(dim=0).values.max())
    return torch.stack(out)


def bench_cases(quick: bool):
    n, D, keep = (64, 64, 16) if quick else (576, 1024, 64)

    def case(B):
        m = build("divprune", keep=keep)
        return MethodBenchCase(
            "divprune", f"B={B} N={n} D={D} keep={keep}",
            make=lambda: clip_like(B, n, D, seed=5, layers=()).x[:, 1:].contiguous(),
            ours=lambda x: m(Context(x=x)).tokens,
            authors=lambda x: divprune(x, keep))
    return [case(B) for B in ((1, 2) if quick else (1, 16))]
