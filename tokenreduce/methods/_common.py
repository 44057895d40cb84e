"""Checks and assembly helpers shared by the methods of this package (not a method:
modules whose name starts with ``_`` are skipped by the registry's auto-discovery).

Everything here is batched and sync-free: shapes depend only on Python ints.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .base import Context, Reduction, image_part

_raw = None


def fail(method: str, msg: str, exc=ValueError):
    raise exc(f"tokenreduce.methods.{method}: {msg}")


def check_x(ctx: Context, method: str) -> None:
    x = ctx.x
    if not isinstance(x, Tensor) or x.dim() != 3:
        fail(method, f"ctx.x must be a tensor [B, N, D], got "
                     f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.dtype.is_floating_point:
        fail(method, f"ctx.x must be floating (float32, float16 or bfloat16), got {x.dtype}", TypeError)
    if ctx.n_image < 1:
        fail(method, "ctx.x holds no image token")


def need_cls(ctx: Context, method: str) -> None:
    if not ctx.has_cls:
        fail(method, "needs a [CLS] token (ctx.has_cls=True): its scores are the [CLS] attention row")


def per_token(ctx: Context, method: str, name: str, t: Optional[Tensor], dims: int = 2) -> Tensor:
    """Check an aligned per-token tensor (``[B, N]`` or ``[B, N, C]``)."""
    if t is None:
        fail(method, f"needs ctx.{name} (the model integration must provide it)")
    B, N = ctx.x.shape[:2]
    if t.dim() != dims or tuple(t.shape[:2]) != (B, N):
        want = "[B, N]" if dims == 2 else "[B, N, C]"
        fail(method, f"ctx.{name} must have shape {want} with B={B}, N={N} (aligned with ctx.x), "
                     f"got {tuple(t.shape)}")
    return t


def layer_stat(ctx: Context, method: str, field: str, layer: int, dims: int = 2) -> Tensor:
    """``ctx.<field>[layer]``; ``layer`` may be negative (from the end, needs
    ``ctx.num_layers`` unless the dict is keyed that way too)."""
    d: Dict[int, Tensor] = getattr(ctx, field)
    keys = [layer]
    L = ctx.num_layers
    if L is not None:
        keys.append(layer + L if layer < 0 else layer - L)
    for k in keys:
        if k in d:
            return per_token(ctx, method, f"{field}[{k}]", d[k], dims)
    fail(method, f"needs ctx.{field}[{layer}] (layer {layer}{'' if L is None else f' of {L}'}); "
                 f"present: {sorted(d)}")


def abs_layer(layer: int, num_layers: int) -> int:
    return layer + num_layers if layer < 0 else layer


def num_layers(ctx: Context, method: str, default: Optional[int] = None) -> int:
    if ctx.num_layers is not None:
        return int(ctx.num_layers)
    if default is not None:
        return default
    fail(method, "needs ctx.num_layers (layers of the model part it runs in)")


def complement(index: Tensor, n: int) -> Tensor:
    """Positions ``[0, n)`` not in ``index`` (``[B, K]``, distinct), ascending: ``[B, n - K]``."""
    B, K = index.shape
    taken = torch.zeros(B, n, dtype=torch.long, device=index.device).scatter(1, index, 1)
    key = taken * n + torch.arange(n, device=index.device)
    return key.sort(dim=1).values[:, : n - K] % n


def assemble(ctx: Context, tokens: Tensor, index: Tensor, source: Tensor) -> Reduction:
    """Reduction from image-token level outputs: tokens ``[B, K, D]``, index ``[B, K]``
    (positions among the image tokens, -1 for synthesised), source ``[B, n]`` (slot in
    ``tokens`` of every image token, -1 dropped). [CLS] is prepended when
    ``ctx.has_cls``; sizes are the summed input sizes of each output's members."""
    x = ctx.x
    B = x.shape[0]
    c = int(ctx.has_cls)
    index = torch.where(index >= 0, index + c, index)
    if c:
        zero = torch.zeros(B, 1, dtype=torch.long, device=x.device)
        tokens = torch.cat([x[:, :1].to(tokens.dtype), tokens], dim=1)
        index = torch.cat([zero, index], dim=1)
        source = torch.cat([zero, torch.where(source >= 0, source + 1, source)], dim=1)
    K = tokens.shape[1]
    size_in = (torch.ones(source.shape, dtype=torch.float32, device=x.device) if ctx.size is None
               else ctx.size.float())
    size = torch.zeros(B, K, dtype=torch.float32, device=x.device).scatter_add(
        1, source.clamp_min(0), size_in * (source >= 0))
    return Reduction(tokens, index, source, size)


def recycle_slots(x: Tensor, target: Tensor, source: Tensor, *, weight=None, assign=None,
                  features=None, include_target: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """`tokenreduce.ops.recycle` that also returns the slot of each source (``[B, S]``,
    -1 dropped): the raw op computes it anyway and a method needs it for its source map."""
    from .. import ops
    return ops.recycle(x, target, source, weight=weight, assign=assign, features=features,
                       include_target=include_target, return_slot=True)


__all__ = ["fail", "check_x", "need_cls", "per_token", "layer_stat", "abs_layer", "num_layers",
           "complement", "assemble", "recycle_slots", "image_part"]
