"""`bipartite_merge`: ToMe's bipartite soft matching with a size-weighted merge. The
wrapper, the fake kernel registration and the autograd (gradient through the mean)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from ..errors import fail
from .checks import need_int, same_device
from .fake import bipartite_merge_fake

__all__ = ["bipartite_merge"]


def bipartite_merge(
    x: Tensor,
    r: int,
    *,
    metric: Optional[Tensor] = None,
    size: Optional[Tensor] = None,
    protect: int = 0,
    order: str = "tome",
) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching with a size-weighted merge.

    Tokens 0, 2, 4, ... form set A and 1, 3, 5, ... set B. Each A token finds its most
    cosine-similar B token (by ``metric`` rows; ties to the smaller B index); the r A
    tokens with the highest best-scores (ties to the smaller A index) merge into their
    partners; a merged token is the size-weighted mean of its members.

    Args:
        x: tokens ``[B, N, D]``; differentiable.
        r: how many tokens to remove, ``0 <= r <= (N - protect) // 2`` (a Python int).
        metric: rows compared for matching ``[B, N, Dm]`` (ToMe: the head-mean keys);
            default x.
        size: how many original tokens each token stands for ``[B, N]`` (or ToMe's
            ``[B, N, 1]``); default ones.
        protect: the first ``protect`` tokens never merge and never absorb
            (1 = ToMe's class token, 2 = class + distillation token).
        order: ``"tome"``: ToMe's output order (protected tokens, unmerged A tokens -
            sorted by position when protect > 0, else by descending score - then the B
            tokens); ``"spatial"``: survivors keep their original relative order.

    Returns:
        merged ``[B, N - r, D]`` (dtype of x), size ``[B, N - r]`` (float32),
        source int64 ``[B, N]``: the output slot each input token went to (for unmerging
        and provenance: ``merged = segment_mean(x, source)``).

    ``r == 0`` returns the tokens unchanged (as ToMe) without reading ``metric``. Otherwise
    raises ValueError on NaN/Inf in the metric (in x when no metric is given). A ``size``
    that is not positive and finite raises on the CPU; on CUDA it is not checked (that would
    sync the host) and the merged tokens it reaches are NaN or Inf.
    """
    op = "bipartite_merge"
    need_int(op, "r", r)
    need_int(op, "protect", protect)
    if size is not None and size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    same_device(op, x, metric=metric, size=size)
    if _host_data(size) and size.is_floating_point() and not bool(((size > 0) & size.isfinite()).all()):
        fail(op, "size must be positive and finite (each token stands for size > 0 tokens)")
    return torch.ops.tokenreduce.bipartite_merge(x, r, metric, size, protect, order)


def _host_data(t) -> bool:
    """A real CPU tensor with elements: its values can be checked without a host sync."""
    return (isinstance(t, Tensor) and t.device.type == "cpu" and t.numel() > 0
            and not torch.compiler.is_compiling() and not is_fake(t))


torch.library.register_fake("tokenreduce::bipartite_merge")(bipartite_merge_fake)


def _bipartite_merge_setup(ctx, inputs, output):
    x, r, metric, size, protect, order = inputs
    _, size_out, source = output
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(size, size_out, source)


def _bipartite_merge_backward(ctx, g_merged, g_size, g_source):
    # merged[s] = sum_{i in s} size_i x_i / size_out[s]  =>  dx_i = g[s(i)] size_i / size_out[s(i)]
    size, size_out, source = ctx.saved_tensors
    coef = 1.0 / size_out.gather(1, source)
    if size is not None:
        coef = coef * size.to(coef.dtype)
    g = g_merged.to(coef.dtype).gather(1, source[..., None].expand(-1, -1, g_merged.shape[-1]))
    return (g * coef[..., None]).to(ctx.x_dtype), None, None, None, None, None


torch.library.register_autograd(
    "tokenreduce::bipartite_merge", _bipartite_merge_backward, setup_context=_bipartite_merge_setup
)
