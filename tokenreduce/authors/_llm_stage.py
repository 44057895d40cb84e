"""Shared synthetic inputs for the LLM-stage oracles: one decoder layer's q/k/v over a
sequence [system prefix | image tokens | text], and the authors' eager attention."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor


def llm_inputs(B: int, n_img: int, D: int = 256, H: int = 8, Dh: int = 32, pre: int = 35, post: int = 20,
               seed: int = 0, dtype=torch.float32, peaked: float = 2.0) -> Dict[str, object]:
    """Random hidden states [B, T, D] and q/k/v [B, H, T, Dh] (post-RoPE, as the layer uses
    them); ``peaked`` scales q so the attention is far from uniform (tie-free rankings)."""
    g = torch.Generator().manual_seed(seed)
    T = pre + n_img + post
    hidden = torch.randn(B, T, D, generator=g)
    q = torch.randn(B, H, T, Dh, generator=g) * peaked
    k = torch.randn(B, H, T, Dh, generator=g)
    v = torch.randn(B, H, T, Dh, generator=g)
    return dict(hidden=hidden.to(dtype), q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), start=pre, n_img=n_img)


def eager_probs(q: Tensor, k: Tensor, causal: bool = True, rows=None) -> Tensor:
    """The authors' eager attention probabilities [H, R, Tk] for one sample: rows ``rows``
    (absolute positions, default all) of the float32 softmax under HF's causal 4-d mask."""
    Tk = k.shape[-2]
    rows = torch.arange(q.shape[-2]) if rows is None else torch.as_tensor(rows)
    logits = q[:, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        logits = logits.masked_fill(torch.arange(Tk)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def drop_image_tokens(d: Dict[str, object], kept: Tensor, seed: int) -> Dict[str, object]:
    """The next stage's inputs: image tokens reduced to ``kept`` [B, k] (positions among the
    image tokens), fresh q/k/v for the shorter sequence (the next layer's projections)."""
    hidden = d["hidden"]
    B, T, D = hidden.shape
    s, n = d["start"], d["n_img"]
    img = torch.gather(hidden[:, s:s + n], 1, kept.unsqueeze(-1).expand(-1, -1, D))
    new_hidden = torch.cat([hidden[:, :s], img, hidden[:, s + n:]], dim=1)
    H, Dh = d["q"].shape[1], d["q"].shape[3]
    out = llm_inputs(B, kept.shape[1], D, H, Dh, pre=s, post=T - s - n, seed=seed, dtype=hidden.dtype)
    out["hidden"] = new_hidden
    return out
