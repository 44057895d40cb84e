"""`kcenter`: greedy max-min (Gonzalez) k-center selection, as DivPrune. The wrapper and
the fake kernel registration (not differentiable: integer picks)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from ..errors import fail
from .checks import need_int, same_device
from .fake import kcenter_fake

__all__ = ["kcenter"]


def kcenter(
    x: Tensor,
    k: int,
    *,
    metric: str = "cosine",
    first: Union[int, Tensor, str] = 0,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Greedy max-min (Gonzalez) k-center selection, as DivPrune.

    Args:
        x: token features ``[B, N, D]``.
        k: how many tokens to pick (a Python int, at most the eligible count).
        metric: ``"cosine"`` (distance ``1 - cos``; a zero row has distance 1 to all)
            or ``"l2"`` (Euclidean).
        first: the first pick: an int position (negative counts from the end), an int64
            tensor ``[B]`` (one per batch row), or ``"isolated"``: DivPrune's start, the
            eligible token farthest from its nearest neighbour.
        mask: optional bool ``[B, N]``, True = may be picked (e.g. False for padding).

    Returns:
        index: int64 ``[B, k]``, the picks in order: each is the eligible token farthest
            from those already picked (ties to the smallest index).
        mindist: float32 ``[B, N]``, each token's distance to the final picked set
            (0 for picked tokens).

    Raises ValueError when k exceeds the eligible tokens, when ``first`` is masked out,
    or when x holds NaN/Inf (a pick among NaN distances is meaningless).
    """
    op = "kcenter"
    need_int(op, "k", k)
    first_index, isolated, first_int = None, False, 0
    if isinstance(first, str):
        if first != "isolated":
            fail(op, f'first must be an int, an int64 tensor [B] or "isolated", got "{first}"')
        isolated = True
    elif isinstance(first, Tensor):
        first_index = first
    else:
        need_int(op, "first", first)
        first_int = first
    same_device(op, x, first=first_index, mask=mask)
    return torch.ops.tokenreduce.kcenter(x, k, metric, first_int, first_index, isolated, mask)


torch.library.register_fake("tokenreduce::kcenter")(kcenter_fake)
