"""HoloV as the authors run it (obananas/HoloV utils.py HoloV(), called from llava_arch.py with
num_patches=16 and the [CLS] attention of layer -2, head mean): per sample and per crop,
similarity variance and scaled attention give crop scores, the budget is split by them and
each crop keeps its top-attention tokens; zero padding to the budget; positions -1."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase


def holov_authors(tokens: Tensor, attention: Tensor, crops: int, budget: int, eps: float = 1e-6,
                  alpha: float = 1.0, beta: float = 0.09, power: float = 1.0):
    """tokens [B, N, D], attention [B, N] -> (tokens [B, budget, D], positions [B, budget], -1 padding)."""
    B, N, D = tokens.shape
    outs, poss = [], []
    for b in range(B):
        x, att = tokens[b].float(), attention[b].float()
        size, rem = divmod(N, crops)
        chunks, start = [], 0
        for p in range(crops):
            sz = size + (1 if p < rem else 0)
            if sz > 0:
                chunks.append((start, sz))
            start += sz
        scores = []
        for st, sz in chunks:
            pa = att[st:st + sz]
            if sz <= 1:
                scores.append(pa.mean())
                continue
            f = x[st:st + sz] / (x[st:st + sz].norm(dim=1, keepdim=True) + eps)
            s = (f @ f.T) * (1 - torch.eye(sz))
            mean = s.sum(dim=1) / (sz - 1)
            var = ((s - mean.unsqueeze(1)) ** 2).sum(dim=1) / (sz - 1)
            a_s = pa * 1e3
            scale = a_s.abs().mean() / (var.abs().mean() + eps)
            scores.append((alpha * a_s + beta * var * scale).mean())
        ps = torch.stack(scores)
        wts = ps ** power / ((ps ** power).sum() + eps)
        alloc = (wts * budget).floor().long()
        remaining = budget - alloc.sum()
        if remaining > 0:
            _, top = torch.topk(wts, k=min(int(remaining), len(wts)))
            for j in top[:remaining]:
                alloc[j] += 1
        sel_tok, sel_pos = [], []
        for (st, sz), a in zip(chunks, alloc):
            idx = torch.arange(st, st + sz)
            if a <= 0:
                continue
            if a >= sz:
                sel_tok.append(tokens[b, st:st + sz]); sel_pos.append(idx)
            else:
                _, t = torch.topk(att[st:st + sz], k=int(a))
                sel_tok.append(tokens[b, st:st + sz][t]); sel_pos.append(idx[t])
        t_, p_ = torch.cat(sel_tok), torch.cat(sel_pos)
        if t_.shape[0] < budget:
            pad = budget - t_.shape[0]
            t_ = torch.cat([t_, torch.zeros(pad, D, dtype=t_.dtype)])
            p_ = torch.cat([p_, torch.full((pad,), -1, dtype=torch.long)])
        outs.append(t_[:budget]); poss.append(p_[:budget])
    return torch.stack(outs), torch.stack(poss)


def holov_ours(tokens: Tensor, attention: Tensor, crops: int, budget: int):
    return build("holov", keep=budget, crops=crops)(Context(x=tokens, cls_attn={-2: attention}))


def bench_cases(quick: bool):
    N, D, keep = (64, 64, 16) if quick else (576, 4096, 64)

    def case(B):
        def make():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, N, D, generator=g)
            return x, torch.softmax(torch.randn(B, N, generator=g) * 2, dim=-1)

        return MethodBenchCase(
            "holov", f"B={B} N={N} D={D} keep={keep}", make,
            ours=lambda t: holov_ours(t[0], t[1], 16, keep),
            authors=lambda t: holov_authors(t[0], t[1], 16, keep))
    return [case(B) for B in (1, 16)]
