"""How much of the full model's output survives a reduction (per sample, batched).

Encoders: cosine of the [CLS] / pooled embedding; cosine of the patch features after
un-merging the reduced tokens to the full grid (`Tracker.unmerge`), over every patch
(a dropped patch counts as 0 with ``fill="zeros"``) and over the surviving patches only;
Pearson correlation of DINOv2-S's saliency maps (the full model's map against the map the
saliency head draws from the un-merged features).

VLMs: KL(full || reduced) of the next-token distribution and whether the first generated
(greedy) token is the same.

With random weights these numbers say nothing about quality (only real weights do):
`tokenreduce profile` says so next to them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine", "patch_cosine", "pearson", "next_token_kl", "first_token_agreement",
           "encoder_fidelity"]


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row cosine ``[B, D] x [B, D] -> [B]`` (float32)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def patch_cosine(ref: Tensor, unmerged: Tensor, kept: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-sample mean cosine of patch features ``[B, N, C]``: ``all`` patches and,
    with ``kept`` (bool ``[B, N]``), ``kept`` patches only."""
    cs = F.cosine_similarity(ref.float(), unmerged.float(), dim=-1, eps=1e-12)   # [B, N]
    out = {"all": cs.mean(dim=1)}
    if kept is not None:
        k = kept.float()
        out["kept"] = (cs * k).sum(1) / k.sum(1).clamp_min(1.0)
    return out


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per sample of two maps ``[B, ...]`` -> ``[B]``."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).float()


def next_token_kl(ref_logits: Tensor, red_logits: Tensor) -> Tensor:
    """KL(p_full || p_reduced) of next-token logits ``[B, V]`` -> ``[B]`` (nats)."""
    lp = F.log_softmax(ref_logits.float(), dim=-1)
    lq = F.log_softmax(red_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def first_token_agreement(ref_logits: Tensor, red_logits: Tensor) -> Tensor:
    """bool ``[B]``: the greedy next token is the same."""
    return ref_logits.argmax(-1) == red_logits.argmax(-1)


@torch.no_grad()
def encoder_fidelity(full, reduced, decoder=None, fill: str = "zeros") -> Dict[str, Tensor]:
    """Fidelity of a reduced encoder run against the full run (both `VisionOutput` of
    `run_vision` with ``feature_layer=None``); ``decoder``: DINOv2-S's saliency head."""
    has_cls = full.last_hidden_state.shape[1] == full.grid[0] * full.grid[1] + 1
    c = int(has_cls)
    ref_patches = full.last_hidden_state[:, c:]
    red_patches = reduced.last_hidden_state[:, c:] if has_cls else reduced.last_hidden_state
    un = reduced.tracker.unmerge(red_patches, fill=fill)
    pc = patch_cosine(ref_patches, un, reduced.tracker.kept)
    out = {"pooled_cos": cosine(full.pooled, reduced.pooled if reduced.pooled is not None else full.pooled),
           "patch_cos": pc["all"], "patch_cos_kept": pc["kept"],
           "kept_fraction": reduced.tracker.kept.float().mean(1)}
    if decoder is not None:
        s_full = decoder(ref_patches, full.grid)
        s_red = decoder(reduced.tracker.unmerge(red_patches, fill="mean"), full.grid)
        out["saliency_corr"] = pearson(s_full, s_red)
    return out
