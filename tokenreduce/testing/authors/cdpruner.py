"""CDPruner as Theia-4869/CDPruner does it (llava/model/llava_arch.py ``encode_images``,
commit 9541616): cosine similarity of the image features, the instruction relevance
``-mean cos(image embeds, text embeds)`` min-max normalised over the whole batch, the
kernel ``r_i S_ij r_j`` [B, N, N], and the fast greedy MAP loop (Chen et al., NeurIPS 2018)
for ``visual_token_num`` picks, sorted into an index mask. The authors run a batch of one
image; `cdpruner` runs one sample at a time the same way.

`openvino_style_greedy` is the peer of the op benchmark: OpenVINO GenAI's documented
CDPruner pipeline (pairwise similarity and per-token relevance combined into a conditional
kernel, then a greedy DPP MAP), written in plain torch with preallocated buffers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def cdpruner_relevance(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """``[B, N, C]`` image embeds, ``[M, C]`` text embeds -> relevance ``[B, N]`` (the
    authors' lines, min / max over the whole tensor)."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def fast_map_dpp(image_features: Tensor, relevance: Optional[Tensor], visual_token_num: int) -> Tensor:
    """The authors' kernel and greedy loop: ``[B, N, D]`` features (the projector output),
    relevance ``[B, N]`` (None: 1) -> the picks ``[B, T]`` in pick order."""
    B, N, _ = image_features.shape
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    if relevance is None:
        relevance = torch.ones(B, N, device=device)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N), device=device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return select_idx.t()


def cdpruner(image_features: Tensor, image_embeds: Tensor, text_embeds: Tensor, visual_token_num: int) -> Tensor:
    """``encode_images`` per sample: features ``[B, N, D]``, image embeds ``[B, N, C]``, text
    embeds ``[B, M, C]`` -> the kept positions ``[B, T]`` sorted (the index mask's Trues)."""
    out = []
    for f, e, t in zip(image_features, image_embeds, text_embeds):
        rel = cdpruner_relevance(e[None], t)
        out.append(torch.sort(fast_map_dpp(f[None], rel, visual_token_num)).values[0])
    return torch.stack(out)


def openvino_style_greedy(features: Tensor, relevance: Optional[Tensor], k: int) -> Tensor:
    """The peer: conditional kernel ``[B, N, N]`` by one bmm, then the greedy MAP on
    preallocated buffers (in-place row updates, gathered Cholesky columns) -> picks ``[B, k]``."""
    B, N, _ = features.shape
    u = torch.nn.functional.normalize(features.float(), dim=-1)
    kernel = torch.bmm(u, u.transpose(1, 2))
    if relevance is not None:
        r = relevance.float()
        kernel.mul_(r.unsqueeze(2)).mul_(r.unsqueeze(1))
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()
    chol = features.new_zeros((B, k, N), dtype=torch.float32)
    picks = torch.empty(B, k, dtype=torch.long, device=features.device)
    rows = torch.arange(B, device=features.device)
    for t in range(k):
        j = d2.argmax(1)
        picks[:, t] = j
        cj = chol[rows, :t, j]                                        # [B, t]
        e = kernel[rows, j] - torch.bmm(cj.unsqueeze(1), chol[:, :t]).squeeze(1)
        e.div_(d2[rows, j].clamp_min(1e-12).sqrt().unsqueeze(1))
        chol[:, t] = e
        d2.sub_(e * e)
        d2[rows, j] = -float("inf")
    return picks


def bench_cases(quick: bool):
    n, D, T, keep = (64, 64, 8, 16) if quick else (576, 1024, 32, 64)

    def make(B):
        d = clip_like(B, n, D, seed=7, layers=())
        g = torch.Generator().manual_seed(8)
        return d.x[:, 1:].contiguous(), torch.randn(B, T, D, generator=g)

    def case(B):
        m = build("cdpruner", keep=keep)
        return MethodBenchCase(
            "cdpruner", f"B={B} N={n} D={D} T={T} keep={keep}",
            make=lambda: make(B),
            ours=lambda xt: m(Context(x=xt[0], text=xt[1])).tokens,
            authors=lambda xt: cdpruner(xt[0], xt[0], xt[1], keep))
    return [case(B) for B in ((1, 2) if quick else (1, 8))]
