"""FastV as the authors run it (pkunlp-icler/FastV fastv_kvcache.py / modeling_llama.py):
eager attention of layer K-1 with output_attentions, head mean of the last row, top-k over
the image span, sorted; one sample at a time (the authors index sample 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._llm_stage import eager_probs, llm_inputs


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
    from .. import ops
    from ..methods import Context, build
    _, sc = ops.attention_with_scores(q, k, v, causal=True, score_rows=[-1])
    ctx = Context(x=hidden[:, start:start + n_img], query_attn={K - 1: sc[:, start:start + n_img]}, layer=K - 1)
    return build("fastv", keep=keep, layer=K)(ctx)


def bench_case(B: int, quick: bool):
    n, D, H, Dh = (64, 128, 4, 32) if quick else (576, 4096, 32, 128)
    d = llm_inputs(B, n, D, H, Dh, seed=0)
    keep = n // 2
    args = (d["hidden"], d["q"], d["k"], d["v"], d["start"], n, keep)
    ours = lambda h, q, k, v, s, n_, kp: fastv_ours(h, q, k, v, s, n_, kp)
    authors = lambda h, q, k, v, s, n_, kp: fastv_authors(h, q, k, s, n_, kp)
    return ours, authors, args
