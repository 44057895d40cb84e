"""VisionDrop's LLM stage as the authors run it (Ruixxxx/VisionDrop modeling_llama_visiondrop.py
visiondrop_rank_drop): image-token queries x all keys of layer l (RoPE, causal mask), float32
softmax, head mean, image keys, mean over image rows; top-k dominant; the rest in order,
strided contextual targets on normalised head-mean keys, argmax assignment, target + mean of
members; output [dominant (spatial order, boolean-mask gather), contextual]; per-sample loop."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import llm_inputs
from .eager_attention import eager_probs


def visiondrop_stage_authors(hidden: Tensor, q: Tensor, k: Tensor, start: int, n: int, d: int, c: int):
    """-> (tokens [B, d + c, D], index [B, d + c]: dominant then contextual targets)."""
    toks, idxs = [], []
    for i in range(hidden.shape[0]):
        attn = eager_probs(q[i], k[i], causal=True, rows=torch.arange(start, start + n))  # [H, n, T]
        score = attn.mean(dim=0)[:, start:start + n].mean(dim=0)             # [n]
        metric = k[i].float().mean(0)[start:start + n]                         # [n, Dh]
        vis = hidden[i, start:start + n]
        top = score.topk(d).indices
        mask = torch.ones(n, dtype=torch.bool)
        mask[top] = False
        rest = torch.arange(n)[mask]
        mf = metric[mask]
        vf = vis[mask]
        mn = mf / mf.norm(dim=-1, keepdim=True)
        step = max(1, mn.shape[0] // c)
        tgt = torch.arange(0, mn.shape[0], step)[:c]
        others = ~torch.isin(torch.arange(mn.shape[0]), tgt)
        sim = mn[others] @ mn[tgt].T
        onehot = torch.zeros(int(others.sum()), c, dtype=torch.float32)
        onehot.scatter_(1, sim.argmax(dim=1, keepdim=True), 1)
        counts = onehot.sum(0).clamp(min=1).unsqueeze(-1)
        agg = (onehot.T @ vf[others].float()) / counts
        ctx_tok = vf[tgt].float() + agg
        toks.append(torch.cat([vis[~mask].float(), ctx_tok], dim=0))
        idxs.append(torch.cat([torch.arange(n)[~mask], rest[tgt]]))
    return torch.stack(toks), torch.stack(idxs)


def visiondrop_ours(stage: Dict[str, object], layer: int, method, state: dict):
    st, n = stage["start"], stage["n_img"]
    q, k, v = stage["q"], stage["k"], stage["v"]
    _, sc = ops.attention_with_scores(q, k, v, causal=True, score_rows=torch.arange(st, st + n))
    ctx = Context(x=stage["hidden"][:, st:st + n], visual_attn={layer: sc[:, st:st + n]},
                  keys=k[:, :, st:st + n].float().mean(1), layer=layer - 1, state=state)
    return method(ctx)


def bench_cases(quick: bool):
    n, D, H, Dh = (64, 128, 4, 32) if quick else (576, 4096, 32, 128)
    dominant, contextual = (20, 5) if quick else (160, 32)

    def case(B):
        def ours(d):
            m = build("visiondrop", layers=(8,), schedule=((dominant, contextual),))
            return visiondrop_ours(d, 8, m, {})

        return MethodBenchCase(
            "visiondrop", f"B={B} n={n} D={D} keep={dominant + contextual}",
            make=lambda: llm_inputs(B, n, D, H, Dh, seed=0), ours=ours,
            authors=lambda d: visiondrop_stage_authors(d["hidden"], d["q"], d["k"], d["start"], n,
                                                       dominant, contextual))
    return [case(B) for B in (1, 16)]
