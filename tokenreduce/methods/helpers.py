"""The batched helpers the methods share (the framework types are in `methods.base`).

* checks of what a method reads: `check_x` (the tokens, and a [CLS] first when asked) and
  `need` (any other `Context` tensor: present, for a per-layer statistic found by its layer,
  aligned with ``ctx.x``), `patch_grid`, `num_layers`; of the options: `int_option`,
  `is_int_at_least`;
* selections: `topk_indices`, `complement`, `gather_tokens`; the cheaper `top_positions` (the
  top-k set in position order) and `gather_rows` (row copies by `index_select`);
* the `Reduction` of a selection or a merge: `keep_indices` (and `keep_positions`, the same
  `Reduction` with fewer ops), `padded_selection`, `assemble`, `source_from_index`.

No loops over the batch, no host syncs: shapes depend only on Python ints. Errors go through
`tokenreduce.errors.fail`; ``where`` is the method's `Method.where` (``methods.<name>``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..errors import fail
from .base import Context, Method, Reduction

__all__ = ["check_x", "need", "patch_grid", "num_layers", "abs_layer", "int_option", "is_int_at_least",
           "topk_indices", "complement", "gather_tokens", "image_part", "keep_indices",
           "padded_selection", "assemble", "source_from_index", "top_positions", "gather_rows",
           "keep_positions"]


# -- checks of the inputs ---------------------------------------------------------------------

def check_x(ctx: Context, where: str, *, cls: bool = False) -> None:
    """``ctx.x`` is a floating ``[B, N, D]`` tensor with at least one image token; with ``cls``
    its first token must be a [CLS] (``ctx.has_cls``), whose attention row scores the others."""
    x = ctx.x
    if not isinstance(x, Tensor) or x.dim() != 3:
        fail(where, f"ctx.x must be a tensor [B, N, D], got "
                    f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.dtype.is_floating_point:
        fail(where, f"ctx.x must be floating (float32, float16 or bfloat16), got {x.dtype}", TypeError)
    if ctx.n_image < 1:
        fail(where, "ctx.x holds no image token")
    if cls and not ctx.has_cls:
        fail(where, "needs a [CLS] token (ctx.has_cls=True): its scores are the [CLS] attention row")


def need(ctx: Context, where: str, field: str, layer: Optional[int] = None, *,
         dims: Optional[int] = 2) -> Any:
    """``ctx.<field>``, or ``ctx.<field>[layer]`` for a per-layer statistic (a negative
    ``layer`` counts from the end: with ``ctx.num_layers`` set, a dict keyed either way
    serves), with an error naming the method, the field and the layer when the model did not
    provide it. ``dims`` 2 / 3: it must be aligned with ``ctx.x`` (``[B, N]`` / ``[B, N, C]``);
    ``dims=None`` skips the shape check (``ctx.pixels``)."""
    val = getattr(ctx, field)
    name = field
    if layer is not None:
        L = ctx.num_layers
        keys = [layer] if L is None else [layer, layer + L if layer < 0 else layer - L]
        found = next((k for k in keys if k in val), None)
        if found is None:
            fail(where, f"needs ctx.{field}[{layer}] (layer {layer}{'' if L is None else f' of {L}'}), "
                        f"which the model did not provide (declare/collect it via needs and "
                        f"attention_layers()); present: {sorted(val)}")
        name, val = f"{field}[{found}]", val[found]
    elif val is None:
        fail(where, f"needs ctx.{field}, which the model did not provide (declare/collect it via needs "
                    f"and attention_layers())")
    if dims is not None:
        B, N = ctx.x.shape[:2]
        if val.dim() != dims or tuple(val.shape[:2]) != (B, N):
            want = "[B, N]" if dims == 2 else "[B, N, C]"
            fail(where, f"ctx.{name} must have shape {want} with B={B}, N={N} (aligned with ctx.x), "
                        f"got {tuple(val.shape)}")
    return val


def patch_grid(where: str, n: int, grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The patch grid ``(h, w)`` of ``n`` image tokens: ``grid`` (``ctx.grid``) checked against
    ``n``, else the square grid."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            fail(where, f"grid {h}x{w} does not match the {n} image tokens")
        return h, w
    s = math.isqrt(n)
    if s * s != n:
        fail(where, f"{n} image tokens are not a square grid; pass ctx.grid=(h, w)")
    return s, s


def num_layers(ctx: Context, where: str, default: Optional[int] = None) -> int:
    """``ctx.num_layers`` (layers of the model part the method runs in), else ``default``."""
    if ctx.num_layers is not None:
        return int(ctx.num_layers)
    if default is not None:
        return default
    fail(where, "needs ctx.num_layers (layers of the model part it runs in)")


def abs_layer(layer: int, num_layers: int) -> int:
    """A layer counted from the end (negative) as a 0-based index."""
    return layer + num_layers if layer < 0 else layer


def is_int_at_least(value: Any, minimum: int) -> bool:
    """``value`` is an int (not a bool) ``>= minimum``: the check of count / layer options."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def int_option(method: Method, name: str, default: int, *, minimum: int = 1, rule: str = "an int >= 1") -> int:
    """The method's option ``name`` (``default`` when not given), an int ``>= minimum``; else the
    error ``<name> must be <rule>, got <value>``."""
    value = method.opts.get(name, default)
    if not is_int_at_least(value, minimum):
        fail(method.where, f"{name} must be {rule}, got {value!r}")
    return value


# -- selections ---------------------------------------------------------------------------------

def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row ``[B, N] -> [B, k]``; ties to the smallest
    index (a stable descending sort, deterministic on every device)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def complement(index: Tensor, n: int) -> Tensor:
    """Positions ``[0, n)`` not in ``index`` (``[B, K]``, distinct), ascending: ``[B, n - K]``."""
    B, K = index.shape
    taken = torch.zeros(B, n, dtype=torch.long, device=index.device).scatter(1, index, 1)
    key = taken * n + torch.arange(n, device=index.device)
    return key.sort(dim=1).values[:, : n - K] % n


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]``: ``[B, N, D]`` x int64 ``[B, K]`` -> ``[B, K, D]``. Row copies by
    advanced indexing (about 2x faster on the CPU than `torch.gather` with an index expanded
    over D, which loads one index per element); the values are the same."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def image_part(ctx: Context, t: Tensor) -> Tensor:
    """Drop the [CLS] position of a per-token tensor ``[B, N, ...]`` when ``ctx.has_cls``."""
    return t[:, 1:] if ctx.has_cls else t


# -- the Reduction of a selection or a merge ---------------------------------------------------

def source_from_index(index: Tensor, n: int) -> Tensor:
    """Source map of a pure selection: ``[B, K]`` kept positions -> ``[B, N]`` slots (-1 dropped)."""
    B, K = index.shape
    src = torch.full((B, n), -1, dtype=torch.long, device=index.device)
    slots = torch.arange(K, device=index.device).expand(B, K)
    return src.scatter(1, index, slots)


def keep_indices(ctx: Context, index: Tensor, *, sort: bool = True) -> Reduction:
    """The `Reduction` that keeps image tokens ``index`` (int64 ``[B, K]``, positions
    among the image tokens, i.e. not counting [CLS]); [CLS] is prepended when
    ``ctx.has_cls``. ``sort=True`` restores the original (spatial) order."""
    x = ctx.x
    B, N, _ = x.shape
    c = int(ctx.has_cls)
    if sort:
        index = index.sort(dim=1).values
    index = index + c
    if c:
        index = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), index], dim=1)
    if ctx.size is not None:
        size = torch.gather(ctx.size.float(), 1, index)
    else:
        size = torch.ones(index.shape, dtype=torch.float32, device=x.device)
    return Reduction.of_kept_rows(lambda: gather_tokens(x, index), index, source_from_index(index, N), size,
                                  lazy=ctx.lazy_tokens)


def padded_selection(ctx: Context, index: Tensor, valid: Optional[Tensor] = None) -> Reduction:
    """A `Reduction` that keeps image tokens ``index`` ``[B, K]`` in the given order (positions
    among the image tokens) where ``valid`` ``[B, K]`` (default all) is True; invalid slots are
    padding: zero token, index -1, size 0 (consumers mask slots of size 0). [CLS] is prepended
    when ``ctx.has_cls``. Used by methods whose authors pad to a static count (HoloV, VFlowOpt)."""
    x = ctx.x
    B, N, _ = x.shape
    c = int(ctx.has_cls)
    if valid is None:
        valid = torch.ones(index.shape, dtype=torch.bool, device=x.device)
    pos = index.clamp_min(0) + c
    if c:
        pos = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), pos], dim=1)
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), valid], dim=1)
    tokens = gather_tokens(x, pos) * valid.unsqueeze(-1).to(x.dtype)
    size = (torch.gather(ctx.size.float(), 1, pos) if ctx.size is not None
            else torch.ones(pos.shape, dtype=torch.float32, device=x.device)) * valid
    out_index = torch.where(valid, pos, torch.full_like(pos, -1))
    K = pos.shape[1]
    src = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
    slots = torch.arange(K, device=x.device).expand(B, K)
    src = src.scatter(1, torch.where(valid, pos, torch.full_like(pos, N)), slots)[:, :N]
    return Reduction(tokens, out_index, src, size)


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


# -- cheaper forms of the selection helpers (same results, fewer / cheaper ops) ----------------

# below this many scores a stable sort is the cheapest top-k (few ops, each ~5 us of overhead);
# above it the int64-key top-k of `top_positions` wins (B=16 N=576: 0.19 vs 0.39 ms, one thread)
TOP_SORT_MAX = 2048


def _descending_key(scores: Tensor) -> Tensor:
    """int64 keys ``[B, N]`` that order like ``scores`` descending with ties to the smaller index:
    the float32 bits made monotone (-0.0 as +0.0, NaN above everything as in `torch.sort`) in
    the high 32 bits, ``N - 1 - position`` in the low 32, so every key is distinct."""
    N = scores.shape[1]
    s = scores.float() + 0.0                                   # -0.0 -> +0.0
    s = torch.where(s.isnan(), torch.full_like(s, float("nan")).abs(), s)   # one positive NaN
    bits = s.view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)      # negatives: reverse their order
    return bits * (1 << 32) + (N - 1 - torch.arange(N, device=scores.device))


def top_positions(scores: Tensor, k: int, *, sort_max: Optional[int] = None) -> Tensor:
    """The set of `topk_indices` ``(scores, k)`` in ascending position order ``[B, N] -> [B, k]``
    (ties to the smallest index). Small inputs (``B * N <= sort_max``, default
    `TOP_SORT_MAX`): the stable sort; larger: one `torch.topk` of distinct int64 keys
    (`_descending_key`, exact ties handled), then a sort of the k positions."""
    B, N = scores.shape
    if B * N <= (TOP_SORT_MAX if sort_max is None else sort_max):
        return topk_indices(scores, k).sort(dim=1).values
    return _descending_key(scores).topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """`gather_tokens` by one `index_select` of rows: ``[B, N, D]`` x int64 ``[B, K]`` ->
    ``[B, K, D]``, the same values (row copies, no per-element index math; about 2x faster
    than advanced indexing at LLaVA shapes). A strided ``x`` whose rows are evenly spaced
    (a slice ``h[:, s:s + n]`` of a contiguous ``h``) is read in place, without a copy."""
    B, N, D = x.shape
    K = index.shape[1]
    s0, s1 = x.stride(0), x.stride(1)
    if x.stride(2) != 1 or s1 < max(D, 1) or (B > 1 and s0 % s1 != 0):
        return gather_tokens(x, index)
    r = s0 // s1 if B > 1 else N                               # row pitch between samples
    rows = x.as_strided(((B - 1) * r + N, D), (s1, 1))         # every row of x's span
    flat = index.reshape(-1) if B == 1 else (index + torch.arange(B, device=index.device)[:, None] * r).reshape(-1)
    return rows.index_select(0, flat).view(B, K, D)


def keep_positions(ctx: Context, index: Tensor, *, sort: bool = True) -> Reduction:
    """`keep_indices` ``(ctx, index, sort=sort)`` with fewer ops: the same `Reduction` (tokens
    by `gather_rows` on first use: `Reduction.kept_rows`, [CLS] slot by one pad, the source
    map scattered in place)."""
    x = ctx.x
    B, N, _ = x.shape
    if sort:
        index = index.sort(dim=1).values
    if ctx.has_cls:
        index = torch.nn.functional.pad(index + 1, (1, 0))
    K = index.shape[1]
    if ctx.size is not None:
        size = torch.gather(ctx.size.float(), 1, index)
    else:
        size = torch.ones((B, K), dtype=torch.float32, device=x.device)
    src = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    src.scatter_(1, index, torch.arange(K, device=x.device).expand(B, K))
    return Reduction.of_kept_rows(lambda: gather_rows(x, index), index, src, size, lazy=ctx.lazy_tokens)
