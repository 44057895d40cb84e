"""Turbo has no released code: a per-sample loop of the paper's rule (ToMe's bipartite
matching, information degree = alpha * semantic value - mutual redundancy, merge the
least informative A tokens into their partners, size-weighted), written independently
of the batched method as its oracle and timing baseline."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import clip_like


def turbo_one(x: Tensor, metric: Tensor, cls_attn: Tensor, r: int, alpha: float = 1.0,
              size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """x ``[N, D]`` with [CLS] at 0, metric ``[N, C]``, cls_attn ``[N]`` -> merged
    ``[N - r, D]`` (ToMe order: [CLS], unmerged A by position, B) and sizes ``[N - r]``."""
    N = x.shape[0]
    size = torch.ones(N) if size is None else size.float()
    m = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    sem = cls_attn.float() / cls_attn.float().max()
    sims = m[0::2] @ m[1::2].t()                      # [len(A), len(B)]
    degree, partner = {}, {}
    for i, a in enumerate(A[1:], start=1):            # A[0] is [CLS]
        j = int(sims[i].argmax())
        partner[a] = Bs[j]
        degree[a] = alpha * float(sem[a]) - float(sims[i, j])
    merged_a = sorted(degree, key=lambda a: (degree[a], a))[:r]
    acc = {b: (x[b].float() * size[b], float(size[b])) for b in Bs}
    for a in merged_a:
        v, s = acc[partner[a]]
        acc[partner[a]] = (v + x[a].float() * size[a], s + float(size[a]))
    keep_a = [a for a in A if a not in set(merged_a)]
    rows = [x[a].float() for a in keep_a] + [acc[b][0] / acc[b][1] for b in Bs]
    sizes = [float(size[a]) for a in keep_a] + [acc[b][1] for b in Bs]
    return torch.stack(rows).to(x.dtype), torch.tensor(sizes)


def bench_cases(quick: bool):
    n, D, r = (64, 64, 8) if quick else (576, 1024, 16)

    def case(B):
        m = build("turbo", r=r)
        return MethodBenchCase(
            "turbo", f"B={B} N={n + 1} D={D} r={r}",
            make=lambda: clip_like(B, n, D, seed=8, layers=(0,)),
            ours=lambda t: m(Context(x=t.x, keys=t.keys, has_cls=True, cls_attn=t.cls_attn,
                                     layer=0, num_layers=24)).tokens,
            authors=lambda t: [turbo_one(x, k, a, r)[0] for x, k, a in zip(t.x, t.keys, t.cls_attn[0])])
    return [case(B) for B in ((1,) if quick else (1, 16))]
