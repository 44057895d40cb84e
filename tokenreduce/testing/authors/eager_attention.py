"""The authors' eager attention (HF ``output_attentions``): the float32 softmax of
``q k^T / sqrt(Dh)``, which the oracles read their scores from, and (`eager_vit_attention`)
the layer output ``probs @ v`` that eager attention computes with them: the benchmarks time
it where our side's fused op also returns the layer output (the attention a model runs
anyway, scores or not), so both sides do a whole attention layer."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def eager_probs(q: Tensor, k: Tensor, causal: bool = True, rows=None) -> Tensor:
    """One decoder sample: q/k ``[H, T, Dh]`` -> probabilities ``[H, R, Tk]`` of rows ``rows``
    (absolute positions, default all) under HF's causal 4-d mask."""
    Tk = k.shape[-2]
    rows = torch.arange(q.shape[-2]) if rows is None else torch.as_tensor(rows)
    logits = q[:, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        logits = logits.masked_fill(torch.arange(Tk)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def eager_vit_probs(q: Tensor, k: Tensor) -> Tensor:
    """A ViT layer (no mask): q/k ``[B, H, N, Dh]`` -> probabilities ``[B, H, N, N]``."""
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def eager_vit_attention(q: Tensor, k: Tensor, v: Tensor):
    """A ViT layer's eager attention (no mask): q/k/v ``[B, H, N, Dh]`` -> (output
    ``[B, H, N, Dv]`` = probs @ v, probabilities ``[B, H, N, N]``), as HF's eager attention
    with ``output_attentions`` computes both."""
    probs = eager_vit_probs(q, k)
    return probs @ v.float(), probs
