"""VLA-Pruner as the authors run it (MINT-SJTU/VLA-Pruner @fa5bfed, src/openvla): one episode per
sample (a Python loop over the batch), ``av_hist`` a ``deque(maxlen=window)`` of numpy vectors,
the guide ``sum_i gamma ** (n - 1 - i) * av_hist[-1 - i]`` normalised (modeling_prismatic.py
predict_action), and in modeling_llama.py fastv_forward: the guide's and the current prefill
attention's top-k, ``torch.unique`` of both, and when more than k remain
``_redundancy_minization`` (greedy max-min on 1 - cosine; the first pick the member farthest
from its nearest other member). Differences kept on purpose: the guide stays float32 (theirs is
cast to bf16), warm-up frames keep the semantic top-k unless ``full_warmup``, and a picked
member is never picked twice (theirs relies on its distance 0)."""
from __future__ import annotations

from collections import deque
from typing import List

import numpy as np
import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase


def redundancy_minimization(feats: Tensor, num_keep: int) -> Tensor:
    if len(feats) <= num_keep:
        return torch.arange(len(feats))
    n = feats / feats.norm(dim=1, keepdim=True)
    dist = 1.0 - n @ n.t()
    s = torch.empty(num_keep, dtype=torch.long)
    picked = torch.zeros(len(feats), dtype=torch.bool)
    for i in range(num_keep):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(dist[s[:i]], dim=0).values
        scores = scores.masked_fill(picked, float("-inf"))
        s[i] = torch.argmax(scores)
        picked[s[i]] = True
    return s


class VLAPrunerAuthors:
    def __init__(self, keep: int, window: int = 3, gamma: float = 0.8, full_warmup: bool = False):
        self.keep, self.window, self.gamma, self.full_warmup = keep, window, gamma, full_warmup
        self.av_hist: List[deque] = []

    def select(self, x: Tensor, semantic: Tensor) -> List[Tensor]:
        """x [B, N, D], semantic [B, N] -> per sample the kept positions, sorted."""
        B, N, _ = x.shape
        if not self.av_hist:
            self.av_hist = [deque(maxlen=self.window) for _ in range(B)]
        out = []
        for b in range(B):
            hist = self.av_hist[b]
            sem = semantic[b].float()
            if len(hist) == hist.maxlen:
                w = np.array([self.gamma ** i for i in range(len(hist) - 1, -1, -1)], dtype=np.float32)
                guided = np.zeros(N, dtype=np.float32)
                for i in range(len(w)):
                    guided += w[i] * hist[-1 - i]
                guide = torch.tensor(guided / np.sum(guided))
                unique = torch.unique(torch.cat([guide.topk(self.keep).indices, sem.topk(self.keep).indices]))
                if len(unique) > self.keep:
                    keep = unique[redundancy_minimization(x[b][unique].float(), self.keep)]
                else:
                    keep = unique
            elif self.full_warmup:
                keep = torch.arange(N)
            else:
                keep = sem.topk(self.keep).indices
            out.append(keep.sort().values)
        return out

    def observe(self, action_attn: Tensor) -> None:
        """The frame's action attention [B, N] (mean over its action tokens)."""
        for b, h in enumerate(self.av_hist):
            h.append(action_attn[b].float().numpy())


def stream(B: int, N: int, D: int, frames: int, seed: int = 0):
    """Synthetic frames: (x, semantic attention, action attention) per frame."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(frames):
        out.append((torch.randn(B, N, D, generator=g), torch.softmax(torch.randn(B, N, generator=g) * 2, -1),
                    torch.softmax(torch.randn(B, N, generator=g) * 2, -1)))
    return out


def run_ours(frames, keep: int, **opts) -> List[Tensor]:
    m = build("vla-pruner", keep=keep, **opts)
    kept = []
    for x, sem, act in frames:
        red = m(Context(x=x, attn_received={m.K - 1: sem}, layer=m.K - 1, num_layers=32))
        kept.append(red.index)
        m.observe_decode(m.action_layer, act)
        m.end_frame()
    return kept


def run_authors(frames, keep: int, **opts) -> List[List[Tensor]]:
    a = VLAPrunerAuthors(keep, **opts)
    kept = []
    for x, sem, act in frames:
        kept.append(a.select(x, sem))
        a.observe(act)
    return kept


def bench_cases(quick: bool = False):
    B, N, D, keep = (2, 256, 64, 64) if quick else (8, 256, 4096, 64)

    def make():
        return stream(B, N, D, 4)

    return [MethodBenchCase("vla-pruner", f"B={B} N={N} D={D} keep={keep} frames=4", make,
                            lambda f: run_ours(f, keep), lambda f: run_authors(f, keep))]
