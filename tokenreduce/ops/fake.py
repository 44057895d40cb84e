"""Fake (meta) kernels of the ops: the shape, dtype and device contract of each
``torch.ops.tokenreduce.<op>`` schema, without data.

`torch.compile` and `torch.library.opcheck` run them (each op's module registers its own
with ``torch.library.register_fake``), and the NVRTC fallback (`tokenreduce.nvrtc`) calls
them first for the same checks and messages as the compiled kernels. Arguments are the
schema's (see csrc/registration.cpp); each returns empty tensors of the output shapes.
"""
from __future__ import annotations

import torch

from ..errors import fail
from .checks import acc_dtype, need_dim, need_float, need_long, same_device

__all__ = ["attention_with_scores_fake", "kcenter_fake", "bipartite_merge_fake", "recycle_fake",
           "region_attention_fake", "dpp_select_fake"]


def attention_with_scores_fake(q, k, v, scale, causal, key_bias, score_rows):
    """-> out ``[B, H, Nq, Dv]`` (dtype of q), scores ``[B, Nk]`` (accumulation dtype)."""
    op = "attention_with_scores"
    need_dim(op, "q", q, 4, "[B, H, Nq, Dh]")
    need_dim(op, "k", k, 4, "[B, Hkv, Nk, Dh]")
    need_dim(op, "v", v, 4, "[B, Hkv, Nk, Dv]")
    need_float(op, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(op, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}", TypeError)
    same_device(op, q, k=k, v=v, key_bias=key_bias, score_rows=score_rows)
    B, H, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != Dh or v.shape[1] != Hkv or v.shape[2] != Nk:
        fail(op, f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        fail(op, f"q's heads ({H}) must be a multiple of k's heads ({Hkv})")
    if key_bias is not None and tuple(key_bias.shape) != (B, Nk):
        fail(op, f"key_bias must have shape [B, Nk] = [{B}, {Nk}], got {tuple(key_bias.shape)}")
    if score_rows is not None:
        need_long(op, "score_rows", score_rows)
    out = q.new_empty((B, H, Nq, v.shape[3]))
    scores = q.new_empty((B, Nk), dtype=acc_dtype(q))
    return out, scores


def kcenter_fake(x, k, metric, first, first_index, isolated, mask):
    """-> index int64 ``[B, k]``, mindist ``[B, N]`` (accumulation dtype)."""
    op = "kcenter"
    need_dim(op, "x", x, 3, "[B, N, D]")
    need_float(op, "x", x)
    if metric not in ("cosine", "l2"):
        fail(op, f'metric must be "cosine" or "l2", got "{metric}"')
    same_device(op, x, first=first_index, mask=mask)
    B, N, _ = x.shape
    if k < 0 or k > N:
        fail(op, f"k={k} must lie in [0, N={N}]")
    if mask is not None:
        if mask.dtype != torch.bool:
            fail(op, f"mask must be a bool tensor, got {mask.dtype}", TypeError)
        if tuple(mask.shape) != (B, N):
            fail(op, f"mask must have shape [B, N] = [{B}, {N}], got {tuple(mask.shape)}")
    if first_index is not None:
        need_long(op, "first", first_index)
    return x.new_empty((B, k), dtype=torch.long), x.new_empty((B, N), dtype=acc_dtype(x))


def bipartite_merge_fake(x, r, metric, size, protect, order):
    """-> merged ``[B, N - r, D]`` (dtype of x), size ``[B, N - r]``, source int64 ``[B, N]``."""
    op = "bipartite_merge"
    need_dim(op, "x", x, 3, "[B, N, D]")
    need_float(op, "x", x)
    same_device(op, x, metric=metric, size=size)
    B, N, D = x.shape
    if order not in ("tome", "spatial"):
        fail(op, f'order must be "tome" or "spatial", got "{order}"')
    if protect < 0 or protect > N:
        fail(op, f"protect={protect} must lie in [0, N={N}]")
    if r < 0 or r > (N - protect) // 2:
        fail(op, f"r={r} must lie in [0, (N - protect) // 2 = {(N - protect) // 2}] "
                 f"(N={N}, protect={protect})")
    if metric is not None and (metric.dim() != 3 or tuple(metric.shape[:2]) != (B, N)):
        fail(op, f"metric must have shape [B, N, Dm] = [{B}, {N}, Dm], got {tuple(metric.shape)}")
    if size is not None and tuple(size.shape) != (B, N):
        fail(op, f"size must have shape [B, N] = [{B}, {N}], got {tuple(size.shape)}")
    return (
        x.new_empty((B, N - r, D)),
        x.new_empty((B, N - r), dtype=acc_dtype(x)),
        x.new_empty((B, N), dtype=torch.long),
    )


def recycle_fake(x, target, source, weight, assign, features, metric, include_target):
    """-> out ``[B, T, D]`` (dtype of x), count int64 ``[B, T]``, slot int64 ``[B, S]``,
    weight_sum ``[B, T]`` (accumulation dtype)."""
    op = "recycle"
    need_dim(op, "x", x, 3, "[B, N, D]")
    need_float(op, "x", x)
    need_long(op, "target", target)
    need_long(op, "source", source)
    same_device(op, x, target=target, source=source, weight=weight, assign=assign, features=features)
    B, N, D = x.shape
    if metric != "cosine":
        fail(op, f'metric must be "cosine", got "{metric}"')
    if target.dim() != 2 or target.shape[0] != B:
        fail(op, f"target must have shape [B, T] with B={B}, got {tuple(target.shape)}")
    if source.dim() != 2 or source.shape[0] != B:
        fail(op, f"source must have shape [B, S] with B={B}, got {tuple(source.shape)}")
    T, S = target.shape[1], source.shape[1]
    if weight is not None and tuple(weight.shape) != (B, N):
        fail(op, f"weight must have shape [B, N] = [{B}, {N}], got {tuple(weight.shape)}")
    if assign is not None:
        need_long(op, "assign", assign)
        if tuple(assign.shape) != (B, S):
            fail(op, f"assign must have shape [B, S] = [{B}, {S}], got {tuple(assign.shape)}")
    if features is not None and (features.dim() != 3 or tuple(features.shape[:2]) != (B, N)):
        fail(op, f"features must have shape [B, N, Df] = [{B}, {N}, Df], got {tuple(features.shape)}")
    return (
        x.new_empty((B, T, D)),
        x.new_empty((B, T), dtype=torch.long),
        x.new_empty((B, S), dtype=torch.long),
        x.new_empty((B, T), dtype=acc_dtype(x)),
    )


def region_attention_fake(q, k, v, grid_h, grid_w, region, heads, scale):
    """-> out ``[B, M, Cv]`` (dtype of q), lse ``[B, M, heads]`` (accumulation dtype)."""
    op = "region_attention"
    need_dim(op, "q", q, 3, "[B, M, C]")
    need_dim(op, "k", k, 4, "[B, L, N, C]")
    need_dim(op, "v", v, 4, "[B, L, N, Cv]")
    need_float(op, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(op, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}", TypeError)
    same_device(op, q, k=k, v=v)
    if grid_h < 0 or grid_w < 0:
        fail(op, f"grid_h and grid_w must be >= 0, got {grid_h} and {grid_w}")
    if region < 1:
        fail(op, f"region must be >= 1, got {region}")
    if heads < 1:
        fail(op, f"heads must be >= 1, got {heads}")
    B, M, C = q.shape
    if M != grid_h * grid_w:
        fail(op, f"q has M={M} queries but the query grid is {grid_h} x {grid_w} = {grid_h * grid_w}")
    N = (region * grid_h) * (region * grid_w)
    if k.shape[0] != B or k.shape[1] < 1 or k.shape[2] != N or k.shape[3] != C:
        fail(op, f"k must have shape [B, L, N, C] = [{B}, L >= 1, {N}, {C}] (N = (region grid_h) x "
                 f"(region grid_w) = {region * grid_h} x {region * grid_w}), got {tuple(k.shape)}")
    if v.shape[0] != B or v.shape[1] != k.shape[1] or v.shape[2] != N:
        fail(op, f"v must have shape [B, L, N, Cv] = [{B}, {k.shape[1]}, {N}, Cv], got {tuple(v.shape)}")
    if C % heads != 0 or v.shape[3] % heads != 0:
        fail(op, f"heads={heads} must divide q's channels C={C} and v's channels Cv={v.shape[3]}")
    return q.new_empty((B, M, v.shape[3])), q.new_empty((B, M, heads), dtype=acc_dtype(q))
def dpp_select_fake(features, k, relevance, mask):
    """-> index int64 ``[B, k]``, gains ``[B, k]`` (accumulation dtype)."""
    op = "dpp_select"
    need_dim(op, "features", features, 3, "[B, N, D]")
    need_float(op, "features", features)
    B, N, _ = features.shape
    if k < 0 or k > N:
        fail(op, f"k={k} must lie in [0, N={N}]")
    if relevance is not None:
        need_float(op, "relevance", relevance)
        same_device(op, features, relevance=relevance)
        if tuple(relevance.shape) != (B, N):
            fail(op, f"relevance must have shape [B, N] = [{B}, {N}], got {tuple(relevance.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            fail(op, f"mask must be a bool tensor, got {mask.dtype}", TypeError)
        same_device(op, features, mask=mask)
        if tuple(mask.shape) != (B, N):
            fail(op, f"mask must have shape [B, N] = [{B}, {N}], got {tuple(mask.shape)}")
    return features.new_empty((B, k), dtype=torch.long), features.new_empty((B, k), dtype=acc_dtype(features))
