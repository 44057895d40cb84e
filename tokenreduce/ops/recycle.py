"""`recycle`: aggregate pruned tokens into recycled tokens (VisionZip's contextual tokens,
VFlowOpt's grid recycling, PruMerge+'s absorption). The wrapper, the fake kernel
registration and the autograd (gradient through the weighted means)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from .checks import same_device
from .fake import recycle_fake

__all__ = ["recycle"]


def recycle(
    x: Tensor,
    target: Tensor,
    source: Tensor,
    *,
    weight: Optional[Tensor] = None,
    assign: Optional[Tensor] = None,
    features: Optional[Tensor] = None,
    metric: str = "cosine",
    include_target: bool = True,
    return_slot: bool = False,
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Aggregate pruned tokens into recycled tokens.

    Each source token joins its most cosine-similar target (ties to the smaller target
    slot), or the slot that ``assign`` gives it; every slot becomes the weighted mean of
    its target (when ``include_target``) and its sources.

    Args:
        x: tokens ``[B, N, D]``; differentiable.
        target: int64 ``[B, T]``: positions in x of the slots' tokens.
        source: int64 ``[B, S]``: positions in x of the tokens to recycle.
        weight: optional ``[B, N]`` per-token weight (e.g. attention); default 1. Treated
            as a constant by autograd.
        assign: optional int64 ``[B, S]``: the slot of each source, -1 drops it
            (spatial grouping, as VFlowOpt); skips the similarity search.
        features: optional ``[B, N, Df]`` rows compared for the assignment (VisionZip
            compares keys); default x.
        metric: ``"cosine"``.
        include_target: whether the target itself is part of its slot's mean.
        return_slot: also return the slot each source joined (a Python bool: the
            number of outputs is static under ``torch.compile``).

    Returns:
        out ``[B, T, D]`` (dtype of x): the weighted means; a slot with no member or zero
        total weight is 0. count int64 ``[B, T]``: members per slot. With
        ``return_slot=True`` also slot int64 ``[B, S]``: the slot (index into target) of
        each source, -1 where it was dropped.

    Expresses VisionZip's contextual tokens (``include_target=False`` plus the target),
    VFlowOpt's grid recycling (``assign`` + attention ``weight``) and PruMerge+'s
    absorption (``weight`` = attention, ``include_target=True``).
    """
    same_device("recycle", x, target=target, source=source, weight=weight, assign=assign,
                features=features)
    out, count, slot, _ = torch.ops.tokenreduce.recycle(x, target, source, weight, assign, features, metric,
                                                        bool(include_target))
    if return_slot:
        return out, count, slot
    return out, count


torch.library.register_fake("tokenreduce::recycle")(recycle_fake)


def _recycle_setup(ctx, inputs, output):
    x, target, source, weight, assign, features, metric, include_target = inputs
    _, _, slot, weight_sum = output
    ctx.x_shape, ctx.x_dtype, ctx.include_target = x.shape, x.dtype, include_target
    ctx.save_for_backward(target, source, weight, slot, weight_sum)


def _recycle_backward(ctx, g_out, g_count, g_slot, g_wsum):
    # out[t] = sum_{i in t} w_i x_i / W_t  =>  dx_i += g[t] w_i / W_t for every membership
    target, source, weight, slot, wsum = ctx.saved_tensors
    B, N, D = ctx.x_shape
    acc = wsum.dtype
    inv = torch.where(wsum != 0, 1.0 / wsum, torch.zeros_like(wsum))
    w = torch.ones(B, N, dtype=acc, device=wsum.device) if weight is None else weight.to(acc)
    g = g_out.to(acc)
    grad = torch.zeros(B, N, D, dtype=acc, device=wsum.device)
    if ctx.include_target:
        ct = w.gather(1, target) * inv
        grad.scatter_add_(1, target[..., None].expand(-1, -1, D), g * ct[..., None])
    keep = slot >= 0
    slot_or_zero = slot.clamp_min(0)
    cs = w.gather(1, source) * inv.gather(1, slot_or_zero) * keep
    gs = g.gather(1, slot_or_zero[..., None].expand(-1, -1, D)) * cs[..., None]
    grad.scatter_add_(1, source[..., None].expand(-1, -1, D), gs)
    return grad.to(ctx.x_dtype), None, None, None, None, None, None, None


torch.library.register_autograd("tokenreduce::recycle", _recycle_backward, setup_context=_recycle_setup)
