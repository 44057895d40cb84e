"""ToDRE has no released code: plain per-sample loops of the paper's two stages, as the
oracle and timing baseline of ``todre`` / ``todre-llm``. Stage 1 is a greedy k-center
loop over the 1 - cosine matrix (the same loop as DivPrune's, so it reuses it); stage 2
keeps the image tokens the last text token attends to most, one sample at a time."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase
from .divprune import divprune as todre_stage1  # noqa: F401  (greedy k-center, isolated start)


def todre_stage2(image_states: Tensor, query_attn: Tensor, keep: int) -> Tensor:
    """image_states ``[B, n, D]``, query_attn ``[B, n]`` -> kept states ``[B, keep, D]``
    in their order."""
    out = []
    for x, a in zip(image_states, query_attn):
        order = sorted(range(a.shape[0]), key=lambda i: (-float(a[i]), i))[:keep]
        out.append(x[sorted(order)])
    return torch.stack(out)


def bench_cases(quick: bool):
    n, D = (64, 64) if quick else (576, 4096)
    keep = n // 2

    def case(B):
        def make():
            g = torch.Generator().manual_seed(10)
            return torch.randn(B, n, D, generator=g), torch.softmax(torch.randn(B, n, generator=g), 1)

        m = build("todre-llm", keep=keep, layer=2)
        return MethodBenchCase(
            "todre-llm", f"B={B} n={n} D={D} keep={keep}", make,
            ours=lambda t: m(Context(x=t[0], query_attn={1: t[1]})).tokens,
            authors=lambda t: todre_stage2(t[0], t[1], keep))
    return [case(B) for B in ((1, 2) if quick else (1, 16))]
