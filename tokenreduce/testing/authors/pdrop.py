"""PyramidDrop as the authors run it (Cooperx521/PyramidDrop modeling_llama_pdrop.py
pdrop_rank_drop): at each stage, layer l's q/k (with RoPE) on the current sequence, the last
instruction token's row with the causal mask, float32 softmax, head mean, image span,
top int(N0 * ratio[s+1]), sorted; per-sample loop. With ``gather=True`` each sample's kept image
hidden states are gathered too (``features[i][top_rank_index]``, as the released code builds the
next layer's input). The bench times selection only on both sides: the scores and the kept
positions. Building the next layer's input is the model code's job on both sides. The released
code does it with that gather; ours does it with one gather of the next sequence in
`tokenreduce.models.llm`, and never gathers the Reduction's tokens (`Reduction.kept_rows`).
Our scores come from the fused op with zero-width values (scores only), as
`tokenreduce.models.llm_scores` calls it."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build
from tokenreduce.models.llm_scores import unused_values

from . import MethodBenchCase
from ..synthetic import drop_image_tokens, llm_inputs
from .eager_attention import eager_probs


def pdrop_stage_authors(q: Tensor, k: Tensor, start: int, n_cur: int, keep_len: int,
                        hidden: Optional[Tensor] = None) -> Tensor:
    """One rank-and-drop: q/k [B, H, T, Dh] of layer l -> kept image positions [B, keep_len] sorted
    (and, given ``hidden`` [B, T, D], each sample's kept image hidden states, then discarded)."""
    out = []
    for i in range(q.shape[0]):
        last = q.shape[2] - 1                                       # prompt_total_len - 1 (prefill)
        attn = eager_probs(q[i], k[i], causal=True, rows=[last])         # [H, 1, T]
        avg = attn.mean(dim=0)[:, start:start + n_cur].mean(dim=0)
        top = avg.topk(keep_len).indices.sort().values
        if hidden is not None:
            hidden[i][top + start, :]                               # features[i][top_rank_index, :]
        out.append(top)
    return torch.stack(out)


def pdrop_authors(stages: List[Dict[str, object]], ratios: Sequence[float], gather: bool = False) -> List[Tensor]:
    """Stage by stage; stages[s] holds the q/k of layer l_s on the stage's sequence."""
    n0 = stages[0]["n_img"]
    return [pdrop_stage_authors(d["q"], d["k"], d["start"], d["n_img"], int(n0 * ratios[s + 1]),
                                d["hidden"] if gather else None)
            for s, d in enumerate(stages)]


def pdrop_ours(stages: List[Dict[str, object]], layers=(8, 16, 24), **budget) -> List[Tensor]:
    m = build("pdrop", layers=tuple(layers), **budget)
    state: dict = {}
    out = []
    for s, d in enumerate(stages):
        st, n = d["start"], d["n_img"]
        # last row only, scores only (`unused_values`, as tokenreduce.models.llm_scores calls it)
        _, sc = ops.attention_with_scores(d["q"][:, :, -1:], d["k"], unused_values(d["k"]), causal=True)
        ctx = Context(x=d["hidden"][:, st:st + n], query_attn={layers[s]: sc[:, st:st + n]},
                      layer=layers[s] - 1, state=state, lazy_tokens=True)   # as models.llm builds it
        out.append(m(ctx).index)
    return out


def make_stages(B: int, n0: int, D: int, H: int, Dh: int, lam: float = 0.5, S: int = 3, seed: int = 0):
    """Consistent stage inputs: each stage keeps what the authors' previous stage kept."""
    d = llm_inputs(B, n0, D, H, Dh, seed=seed)
    stages = [d]
    for s in range(S - 1):
        kept = pdrop_stage_authors(d["q"], d["k"], d["start"], d["n_img"], int(n0 * lam ** (s + 1)))
        d = drop_image_tokens(d, kept, seed=seed + s + 1)
        stages.append(d)
    return stages


def bench_cases(quick: bool):
    n, D, H, Dh = (64, 128, 4, 32) if quick else (576, 4096, 32, 128)

    def case(B):
        return MethodBenchCase(
            "pdrop", f"B={B} n={n} D={D} 3 stages",
            make=lambda: make_stages(B, n, D, H, Dh),
            ours=lambda stages: pdrop_ours(stages),
            authors=lambda stages: pdrop_authors(stages, [1.0, 0.5, 0.25, 0.125]))
    return [case(B) for B in (1, 16)]
