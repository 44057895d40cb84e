"""`region_attention`: TokenPacker's region-to-point injection as one op. Every point query
of a low-resolution grid attends only to its own region x region window of the
high-resolution key grid, across L feature levels. The wrapper, the fake kernel
registration and the autograd (gradients w.r.t. q, k and v)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from ..errors import fail
from .checks import need_dim, need_grid, need_int, need_scale, same_device
from .fake import region_attention_fake

__all__ = ["region_attention"]


def region_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Sequence[int],
    *,
    region: int,
    heads: int = 1,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Multi-head attention of each point query to its own window of keys.

    The queries lie on a ``grid = (grid_h, grid_w)`` grid (row-major, ``M = grid_h *
    grid_w``); the keys and values on an ``H x W = (region grid_h) x (region grid_w)`` grid
    (row-major, ``N = H W``) at each of ``L`` levels. Query ``(i, j)`` attends to the
    ``R = L region^2`` keys at rows ``i region .. i region + region - 1`` and columns
    ``j region .. j region + region - 1`` of every level; channels are split into ``heads``
    equal heads (``C = heads Dh``, ``Cv = heads Dv``), as ``nn.MultiheadAttention``.

    Args:
        q: queries ``[B, M, C]``.
        k: keys ``[B, L, N, C]``, ``L >= 1``.
        v: values ``[B, L, N, Cv]``.
        grid: ``(grid_h, grid_w)``, Python ints.
        region: the window side ``s`` (``H = s grid_h``): 2 for 576 -> 144 tokens, 3 for
            576 -> 64.
        heads: number of heads; divides ``C`` and ``Cv``.
        scale: logit scale, default ``Dh ** -0.5``.
        return_lse: also return the log-sum-exp of the logits ``[B, M, heads]``.

    Returns:
        out ``[B, M, Cv]`` (dtype of q): per head ``softmax(q k_r^T scale) v_r`` over the
        query's window, heads concatenated; with ``return_lse``, also lse (float32; float64
        for float64 inputs).

    Differentiable in q, k and v (the backward is plain PyTorch from the saved
    log-sum-exp: it rebuilds the probabilities; the windows tile the key grid, so the
    key/value gradients are a permutation of per-window gradients, no scatter). The
    windowed keys are never copied in the forward.
    """
    op = "region_attention"
    if not isinstance(q, Tensor):
        fail(op, f"q must be a tensor [B, M, C], got {type(q).__name__}", TypeError)
    grid_h, grid_w = need_grid(op, "grid", grid)
    need_int(op, "region", region)
    need_int(op, "heads", heads)
    need_dim(op, "q", q, 3, "[B, M, C]")
    if heads < 1:
        fail(op, f"heads must be >= 1, got {heads}")
    scale = need_scale(op, scale, q.shape[-1] // heads)
    same_device(op, q, k=k, v=v)
    out, lse = torch.ops.tokenreduce.region_attention(q, k, v, grid_h, grid_w, region, heads, float(scale))
    return (out, lse) if return_lse else out


torch.library.register_fake("tokenreduce::region_attention")(region_attention_fake)


def windows(x: Tensor, grid_h: int, grid_w: int, region: int, heads: int) -> Tensor:
    """``[B, L, N, Cx]`` -> ``[B, M, heads, R, Cx / heads]``: each query's window of rows (a
    permuted copy, since the windows tile the grid), window order (level, row, column)."""
    B, L, _, Cx = x.shape
    s = region
    x = x.reshape(B, L, grid_h, s, grid_w, s, heads, Cx // heads)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, grid_h * grid_w, heads, L * s * s, Cx // heads)


def unwindows(x: Tensor, L: int, grid_h: int, grid_w: int, region: int) -> Tensor:
    """The inverse of `windows`: ``[B, M, heads, R, D]`` -> ``[B, L, N, heads D]``."""
    B, _, heads, _, D = x.shape
    s = region
    x = x.reshape(B, grid_h, grid_w, heads, L, s, s, D).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, L, grid_h * s * grid_w * s, heads * D)


def _region_attention_setup(ctx, inputs, output):
    q, k, v, grid_h, grid_w, region, heads, scale = inputs
    _, lse = output
    ctx.geometry = (grid_h, grid_w, region, heads, scale)
    ctx.dtypes = (q.dtype, k.dtype, v.dtype)
    ctx.save_for_backward(q, k, v, lse)


def _region_attention_backward(ctx, g_out, g_lse):
    # p = exp(q k_r scale - lse); out = sum_r p_r v_r
    # dv_r = p_r g; dp_r = g . v_r; ds_r = p_r (dp_r - sum_r' p_r' dp_r' + g_lse)
    # dq = scale sum_r ds_r k_r; dk_r = scale ds_r q
    q, k, v, lse = ctx.saved_tensors
    grid_h, grid_w, region, heads, scale = ctx.geometry
    acc = lse.dtype
    B, M, C = q.shape
    L, Cv = k.shape[1], v.shape[3]
    qh = q.to(acc).reshape(B, M, heads, C // heads)
    kw = windows(k.to(acc), grid_h, grid_w, region, heads)
    vw = windows(v.to(acc), grid_h, grid_w, region, heads)
    p = torch.exp(torch.einsum("bmhd,bmhrd->bmhr", qh, kw) * scale - lse[..., None])
    g = (torch.zeros((B, M, Cv), dtype=acc, device=q.device) if g_out is None else g_out.to(acc))
    g = g.reshape(B, M, heads, Cv // heads)
    dp = torch.einsum("bmhe,bmhre->bmhr", g, vw)
    ds = dp - (p * dp).sum(-1, keepdim=True)
    if g_lse is not None:
        ds = ds + g_lse.to(acc)[..., None]
    ds = p * ds
    dq = dk = dv = None
    if ctx.needs_input_grad[0]:
        dq = (torch.einsum("bmhr,bmhrd->bmhd", ds, kw) * scale).reshape(B, M, C).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        dk = unwindows(ds[..., None] * qh[:, :, :, None, :] * scale, L, grid_h, grid_w, region).to(ctx.dtypes[1])
    if ctx.needs_input_grad[2]:
        dv = unwindows(p[..., None] * g[:, :, :, None, :], L, grid_h, grid_w, region).to(ctx.dtypes[2])
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("tokenreduce::region_attention", _region_attention_backward,
                                setup_context=_region_attention_setup)
