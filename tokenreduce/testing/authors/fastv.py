"""FastV as the authors run it (pkunlp-icler/FastV fastv_kvcache.py / modeling_llama.py):
eager attention of layer K-1 with output_attentions, head mean of the last row, top-k over
the image span, sorted; one sample at a time (the authors index sample 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import llm_inputs
from .eager_attention import eager_probs


def fastv_authors(hidden: Tensor, q: Tensor, k: Tensor, start: int, n_img: int, keep: int):
    """-> (kept image positions [B, keep] sorted, image hidden states kept [B, keep, D])."""
    idx, toks = [], []
    for b in range(hidden.shape[0]):
        attn = eager_probs(q[b], k[b], causal=True)                  # [H, T, T] (output_attentions)
        score = attn.mean(dim=0)[-1][start:start + n_img]
        top = score.topk(keep).indices.sort().values
        idx.append(top)
        toks.append(hidden[b, start + top])
    return torch.stack(idx), torch.stack(toks)


def fastv_ours(hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, start: int, n_img: int, keep: int, K: int = 2):
    """The engine's path: fused attention scores of the last row, then the fastv method."""
    _, sc = ops.attention_with_scores(q, k, v, causal=True, score_rows=[-1])
    ctx = Context(x=hidden[:, start:start + n_img], query_attn={K - 1: sc[:, start:start + n_img]}, layer=K - 1)
    return build("fastv", keep=keep, layer=K)(ctx)


def bench_cases(quick: bool):
    n, D, H, Dh = (64, 128, 4, 32) if quick else (576, 4096, 32, 128)
    keep = n // 2

    def case(B):
        return MethodBenchCase(
            "fastv", f"B={B} n={n} D={D} keep={keep}",
            make=lambda: llm_inputs(B, n, D, H, Dh, seed=0),
            ours=lambda d: fastv_ours(d["hidden"], d["q"], d["k"], d["v"], d["start"], n, keep),
            authors=lambda d: fastv_authors(d["hidden"], d["q"], d["k"], d["start"], n, keep))
    return [case(B) for B in (1, 16)]
