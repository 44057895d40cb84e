"""`dpp_select`: greedy MAP inference of a conditional DPP, as CDPruner. The wrapper and the
fake kernel registration (no autograd: the outputs are integer picks and their gains, which
are not differentiated by any method)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from .checks import need_int, same_device
from .fake import dpp_select_fake

__all__ = ["dpp_select"]


def dpp_select(
    features: Tensor,
    k: int,
    *,
    relevance: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Pick ``k`` tokens by greedy MAP inference of the DPP with kernel
    ``L = diag(r) S diag(r)`` (CDPruner's conditional DPP).

    ``S_ij = <u_i, u_j>``, ``u_i = x_i / max(||x_i||, 1e-12)`` (cosine similarity; ``S_ii = 1``
    exactly, so equal relevances tie exactly; a zero row has S = 0), accumulated in float32 (float64 for float64 features); ``r`` = relevance (1
    without). The greedy is the incremental Cholesky of Chen et al. (NeurIPS 2018): each
    step picks the eligible, not-yet-picked token with the largest marginal gain
    ``d2_j = det(L_{Y+j}) / det(L_Y)`` (ties to the smallest index).

    Gain 0: once the best gain is not above ``eps * max L_ii`` over the eligible tokens
    (eps = 1e-5, 1e-10 in float64; the kernel on the picks plus any candidate is singular:
    duplicates, rank < k, k above the eligible count), that step and every later one pick the
    not-yet-picked token with the largest ``(eligible, L_ii)`` (ties to the smallest index)
    with gain 0. Masked tokens are never picked while an eligible one remains.

    Args:
        features: ``[B, N, D]`` token features (any float dtype, any strides).
        k: picks, a Python int in ``[0, N]``.
        relevance: optional ``[B, N]`` float per-token relevance ``r`` (only ``r^2`` matters).
        mask: optional bool ``[B, N]``, True = may be picked.

    Returns:
        index: int64 ``[B, k]``, the picks in order.
        gains: ``[B, k]`` float32 (float64 for float64 features): each pick's gain ``d2_j``
            (0 for the fallback picks).

    Raises ValueError for NaN/Inf in features or relevance on the CPU (on CUDA NaN gains
    never win, without a host sync).
    """
    op = "dpp_select"
    need_int(op, "k", k)
    same_device(op, features, relevance=relevance, mask=mask)
    return torch.ops.tokenreduce.dpp_select(features, k, relevance, mask)


torch.library.register_fake("tokenreduce::dpp_select")(dpp_select_fake)
