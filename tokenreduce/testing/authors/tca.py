"""TCA as the authors run it (Jo-wang/TCA @0f846d6): clip/model.py ResidualAttentionBlock_Ours
(the condensation of one drop layer, tokens first ``[N, B, C]`` as theirs), clip/utils.py
coreset_averaging / k_center_greedy (per-sample loops; the first center is the first cluster
token instead of ``torch.randint``, the one deliberate change), and runner.py's reservoir
(``update_reservoir_sim``, ``CLIP.update_cls_token``, ``compute_reservoir_logits``) as a dict of
Python lists, one test sample at a time."""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase


def k_center_greedy(token: Tensor, num_cluster: int) -> Tensor:
    center = [0]                     # theirs: torch.randint(n, (1,)).item()
    min_distances = torch.norm(token - token[center[0]], dim=1)
    for _ in range(num_cluster - 1):
        nxt = int(torch.argmax(min_distances))
        center.append(nxt)
        min_distances = torch.minimum(min_distances, torch.norm(token - token[nxt], dim=1))
    return torch.stack([token[i] for i in center])


def coreset_averaging(token: Tensor, num_centers: int) -> Tensor:
    """token [s, B, C] -> [num_centers, B, C]."""
    batch_size = token.shape[1]
    out = torch.zeros(num_centers, batch_size, token.shape[2])
    for b in range(batch_size):
        tb = token[:, b, :].float()
        centers = k_center_greedy(tb, num_centers)
        assign = torch.argmin(torch.cdist(tb, centers), dim=1)
        for i in range(num_centers):
            ct = tb[assign == i]
            if ct.shape[0] == 0:
                continue
            d = torch.norm(ct - centers[i], dim=1)
            eps = 1e-8
            d[d == 0] = eps
            w = 1 / d
            w[d == eps] = 1.0
            w = w / w.sum()
            out[i, b] = torch.sum(ct * w.unsqueeze(-1), dim=0)
    return out


def complement_idx(idx: Tensor, dim: int) -> Tensor:
    a = torch.arange(dim).expand(*idx.shape[:-1], dim)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1)
    return compl[..., idx.shape[-1]:]


def condense_authors(x: Tensor, cls_attn: Tensor, rate: float, centers: int = 4) -> Tensor:
    """x [B, N, C] ([CLS] first, the block's post-attention tokens), cls_attn [B, N] (the
    [CLS] row, head mean) -> [B, N', C] in their order: [CLS], kept (attention order), the coreset
    centers, the fused token. The drop-rate branch of ResidualAttentionBlock_Ours.forward."""
    x = x.float().permute(1, 0, 2)
    N, B, C = x.shape
    left_tokens = math.ceil((1 - rate) * (N - 1))
    merged = N - left_tokens
    attn = cls_attn[:, 1:].float()
    _, idx = torch.topk(attn, left_tokens - 2 * merged, dim=1, largest=True, sorted=True)
    _, idx1 = torch.topk(attn, left_tokens, dim=1, largest=True, sorted=True)
    cluster_idx = idx1[:, idx.shape[1]:]
    non_cls = x[1:]
    x_others = torch.gather(non_cls, 0, idx.unsqueeze(-1).expand(-1, -1, C).permute(1, 0, 2))
    x_cluster = torch.gather(non_cls, 0, cluster_idx.unsqueeze(-1).expand(-1, -1, C).permute(1, 0, 2))
    merged_tokens = coreset_averaging(x_cluster, centers)
    compl = complement_idx(idx1, N - 1)
    non_topk = torch.gather(non_cls, 0, compl.unsqueeze(-1).expand(-1, -1, C).permute(1, 0, 2))
    non_topk_attn = torch.gather(attn, 1, compl).permute(1, 0)
    extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=0, keepdim=True)
    return torch.cat([x[:1], x_others, merged_tokens, extra], 0).permute(1, 0, 2)


def condense_ours(x: Tensor, cls_attn: Tensor, rate: float, centers: int = 4, layer: int = 3) -> Tensor:
    m = build("tca", rate=rate, centers=centers)
    return m(Context(x=x, has_cls=True, cls_attn={layer: cls_attn}, layer=layer, num_layers=12)).tokens


class ReservoirAuthors:
    """runner.py's reservoir for one test sample at a time (their defaults: div, token_sim, flag)."""

    def __init__(self, num_classes: int, layers: int, size: int = 3, scale: float = 0.1, lambd: float = 3.0,
                 beta: float = 5.0):
        self.reservoir: Dict[int, List[list]] = {i: [] for i in range(num_classes)}
        self.C, self.L, self.size, self.scale, self.lambd, self.beta = num_classes, layers, size, scale, lambd, beta
        self.cls_token_cache: Optional[Tensor] = None

    @staticmethod
    def _sim(cache: List[list]) -> List[float]:
        feats = torch.stack([torch.mean(f[2], dim=0) for f in cache])
        n = F.normalize(feats, p=2, dim=1)
        s = n @ n.t()
        k = feats.shape[0]
        return [float((s[i].sum() - s[i, i]) / (k - 1)) for i in range(k)]

    def update(self, pred: int, loss: float, cls_token_list: Tensor) -> None:
        r = self.reservoir
        r[pred].append([None, torch.tensor(loss), cls_token_list.float()])
        if len(r[pred]) > self.size:
            sim = self._sim(r[pred])
            loss_list = [it[1].item() for it in r[pred]]
            score = np.add(loss_list, sim).tolist()
            r[pred].pop(int(torch.argmax(torch.tensor(score))))
        r[pred] = sorted(r[pred], key=operator.itemgetter(1))
        if all(len(r[k]) > 1 for k in r):
            self.cls_token_cache = torch.stack([torch.mean(torch.stack([i[2] for i in r[k]]), dim=0)
                                                for k in r if r[k]])

    def logits(self, cls_token_list: Tensor) -> Tensor:
        w = np.exp(np.linspace(0, 1, self.L) / self.scale)
        w = torch.tensor(w / sum(w)).float()
        keys, values = [], []
        for c in sorted(self.reservoir):
            for it in self.reservoir[c]:
                keys.append(it[2].unsqueeze(0))
                values.append(c)
        keys = torch.cat(keys, 0)
        onehot = F.one_hot(torch.tensor(values), self.C).float()
        aff = (F.cosine_similarity(cls_token_list.float().unsqueeze(0), keys, dim=-1) * w).sum(1, keepdim=True)
        return self.lambd * (torch.exp(-(self.beta - self.beta * aff.t())) @ onehot)


def bench_cases(quick: bool = False):
    B, N, D = (2, 197, 64) if quick else (8, 197, 768)

    def make():
        g = torch.Generator().manual_seed(0)
        return torch.randn(B, N, D, generator=g), torch.softmax(torch.randn(B, N, generator=g) * 2, -1)

    return [MethodBenchCase("tca", f"B={B} N={N} D={D} rate=0.1", make,
                            lambda a: condense_ours(a[0], a[1], 0.1),
                            lambda a: condense_authors(a[0], a[1], 0.1))]
