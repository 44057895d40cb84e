"""The four core ops of tokenreduce.

Each op is a real torch op (`torch.ops.tokenreduce.<name>`) with a C++ CPU kernel (and,
from a later release, a CUDA kernel) chosen by the torch dispatcher from the inputs'
device; this module adds the Python-friendly signatures, the fake (meta) kernels that
`torch.compile` and `torch.library.opcheck` use, and autograd where an op is
differentiable. Plain-PyTorch references of the same contracts are in
`tokenreduce.reference`.

Conventions shared by every op:
  * batched inputs; float32, float16 and bfloat16 (and float64, for gradcheck), any
    strides; accumulation in float32 (float64 for float64 inputs);
  * sizes (k, r) are Python ints, so output shapes are static;
  * ties go to the smallest index;
  * bad arguments raise a ValueError / TypeError / IndexError whose message starts with
    "tokenreduce.<op>:" and names the argument.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the native library and registers the ops)
from . import backends as _backends

__all__ = ["attention_with_scores", "kcenter", "bipartite_merge", "recycle"]

_ops = torch.ops.tokenreduce


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"tokenreduce.{op}: {msg}")


def _need_float(op: str, name: str, t: Tensor):
    if not t.dtype.is_floating_point:
        _fail(op, f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), "
                  f"got {t.dtype}", TypeError)


def _need_long(op: str, name: str, t: Tensor):
    if t.dtype != torch.long:
        _fail(op, f"{name} must be an int64 tensor, got {t.dtype}", TypeError)


def _need_dim(op: str, name: str, t: Tensor, dim: int, shape: str):
    if t.dim() != dim:
        _fail(op, f"{name} must have shape {shape} ({dim} dims), got {tuple(t.shape)}")


def _same_device(op: str, ref: Tensor, **named):
    for name, t in named.items():
        if isinstance(t, Tensor) and t.device != ref.device:
            _fail(op, f"{name} is on {t.device} but the input is on {ref.device}")


def _need_int(op: str, name: str, v):
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(op, f"{name} must be a Python int (output shapes are static), got {type(v).__name__}",
              TypeError)


# --------------------------------------------------------------------------------------
# attention_with_scores
# --------------------------------------------------------------------------------------


def attention_with_scores(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_bias: Optional[Tensor] = None,
    score_rows: Optional[Union[Tensor, Sequence[int], int]] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Exact softmax attention that also returns the attention each key receives.

    Args:
        q: queries ``[B, H, Nq, Dh]``.
        k: keys ``[B, Hkv, Nk, Dh]``; ``H % Hkv == 0`` (grouped / multi-query KV heads:
            query head ``h`` reads KV head ``h // (H // Hkv)``).
        v: values ``[B, Hkv, Nk, Dv]``.
        scale: logit scale, default ``Dh ** -0.5``.
        causal: mask keys after the query, bottom-right aligned as in FlashAttention
            (query row ``i`` sees keys ``j <= i + Nk - Nq``).
        key_bias: optional additive logit bias per key ``[B, Nk]`` (e.g. ToMe's
            ``log(size)``); ``-inf`` masks a key.
        score_rows: query positions whose attention is scored, a LongTensor ``[R]`` or
            ints (negative counts from the end): ``[0]`` for [CLS], ``[-1]`` for the last
            token. ``None`` scores every row.
        backend: ``"native"`` (the torch op) or ``"triton"`` (`tokenreduce.triton`); ``None``
            follows `tokenreduce.backends.select` (overrides, env var
            ``TOKENREDUCE_ATTENTION_BACKEND``, then the per-device default table).

    Returns:
        out: ``softmax(q k^T * scale + key_bias + mask) v`` ``[B, H, Nq, Dv]``, dtype of q.
        scores: float32 ``[B, Nk]``: the attention probabilities averaged over heads and
            scored rows, so each row sums to 1.

    A query row with no admissible key (causal with ``Nq > Nk``, or every key at
    ``-inf`` bias) outputs zeros and adds nothing to the scores. NaN in the inputs
    propagates to ``out`` and ``scores`` as in eager attention. The ``[B, H, Nq, Nk]``
    probabilities are never materialised. Forward only: no autograd.
    """
    if _backends.select("attention_with_scores", q.device, backend, q.dtype) == "triton":
        try:
            from .triton import attention_with_scores as _triton_attention
        except ImportError as e:
            _fail("attention_with_scores", f"backend 'triton' needs the triton package ({e})", RuntimeError)
        return _triton_attention(q, k, v, scale=scale, causal=causal, key_bias=key_bias,
                                 score_rows=score_rows)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if score_rows is not None and not isinstance(score_rows, Tensor):
        rows = [score_rows] if isinstance(score_rows, int) else list(score_rows)
        score_rows = torch.tensor(rows, dtype=torch.long, device=q.device)
    _same_device("attention_with_scores", q, k=k, v=v, key_bias=key_bias, score_rows=score_rows)
    return _ops.attention_with_scores(q, k, v, float(scale), bool(causal), key_bias, score_rows)


@torch.library.register_fake("tokenreduce::attention_with_scores")
def _attention_with_scores_fake(q, k, v, scale, causal, key_bias, score_rows):
    op = "attention_with_scores"
    _need_dim(op, "q", q, 4, "[B, H, Nq, Dh]")
    _need_dim(op, "k", k, 4, "[B, Hkv, Nk, Dh]")
    _need_dim(op, "v", v, 4, "[B, Hkv, Nk, Dv]")
    _need_float(op, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(op, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}", TypeError)
    _same_device(op, q, k=k, v=v, key_bias=key_bias, score_rows=score_rows)
    B, H, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != Dh or v.shape[1] != Hkv or v.shape[2] != Nk:
        _fail(op, f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        _fail(op, f"q's heads ({H}) must be a multiple of k's heads ({Hkv})")
    if key_bias is not None and tuple(key_bias.shape) != (B, Nk):
        _fail(op, f"key_bias must have shape [B, Nk] = [{B}, {Nk}], got {tuple(key_bias.shape)}")
    if score_rows is not None:
        _need_long(op, "score_rows", score_rows)
    out = q.new_empty((B, H, Nq, v.shape[3]))
    scores = q.new_empty((B, Nk), dtype=_acc_dtype(q))
    return out, scores


def _attention_backward(ctx, *grads):
    raise NotImplementedError(
        "tokenreduce.attention_with_scores: the op is forward-only (no backward); "
        "train with torch.nn.functional.scaled_dot_product_attention"
    )


torch.library.register_autograd("tokenreduce::attention_with_scores", _attention_backward)


# --------------------------------------------------------------------------------------
# kcenter
# --------------------------------------------------------------------------------------


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
    _need_int(op, "k", k)
    first_index, isolated, first_int = None, False, 0
    if isinstance(first, str):
        if first != "isolated":
            _fail(op, f'first must be an int, an int64 tensor [B] or "isolated", got "{first}"')
        isolated = True
    elif isinstance(first, Tensor):
        first_index = first
    else:
        _need_int(op, "first", first)
        first_int = first
    _same_device(op, x, first=first_index, mask=mask)
    return _ops.kcenter(x, k, metric, first_int, first_index, isolated, mask)


@torch.library.register_fake("tokenreduce::kcenter")
def _kcenter_fake(x, k, metric, first, first_index, isolated, mask):
    op = "kcenter"
    _need_dim(op, "x", x, 3, "[B, N, D]")
    _need_float(op, "x", x)
    if metric not in ("cosine", "l2"):
        _fail(op, f'metric must be "cosine" or "l2", got "{metric}"')
    _same_device(op, x, first=first_index, mask=mask)
    B, N, _ = x.shape
    if k < 0 or k > N:
        _fail(op, f"k={k} must lie in [0, N={N}]")
    if mask is not None:
        if mask.dtype != torch.bool:
            _fail(op, f"mask must be a bool tensor, got {mask.dtype}", TypeError)
        if tuple(mask.shape) != (B, N):
            _fail(op, f"mask must have shape [B, N] = [{B}, {N}], got {tuple(mask.shape)}")
    if first_index is not None:
        _need_long(op, "first", first_index)
    return x.new_empty((B, k), dtype=torch.long), x.new_empty((B, N), dtype=_acc_dtype(x))


# --------------------------------------------------------------------------------------
# bipartite_merge
# --------------------------------------------------------------------------------------


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

    ``r == 0`` returns the tokens unchanged (as ToMe). Raises ValueError on NaN/Inf in
    the metric.
    """
    op = "bipartite_merge"
    _need_int(op, "r", r)
    _need_int(op, "protect", protect)
    if size is not None and size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    _same_device(op, x, metric=metric, size=size)
    return _ops.bipartite_merge(x, r, metric, size, protect, order)


@torch.library.register_fake("tokenreduce::bipartite_merge")
def _bipartite_merge_fake(x, r, metric, size, protect, order):
    op = "bipartite_merge"
    _need_dim(op, "x", x, 3, "[B, N, D]")
    _need_float(op, "x", x)
    _same_device(op, x, metric=metric, size=size)
    B, N, D = x.shape
    if order not in ("tome", "spatial"):
        _fail(op, f'order must be "tome" or "spatial", got "{order}"')
    if protect < 0 or protect > N:
        _fail(op, f"protect={protect} must lie in [0, N={N}]")
    if r < 0 or r > (N - protect) // 2:
        _fail(op, f"r={r} must lie in [0, (N - protect) // 2 = {(N - protect) // 2}] "
                  f"(N={N}, protect={protect})")
    if metric is not None and (metric.dim() != 3 or tuple(metric.shape[:2]) != (B, N)):
        _fail(op, f"metric must have shape [B, N, Dm] = [{B}, {N}, Dm], got {tuple(metric.shape)}")
    if size is not None and tuple(size.shape) != (B, N):
        _fail(op, f"size must have shape [B, N] = [{B}, {N}], got {tuple(size.shape)}")
    return (
        x.new_empty((B, N - r, D)),
        x.new_empty((B, N - r), dtype=_acc_dtype(x)),
        x.new_empty((B, N), dtype=torch.long),
    )


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


# --------------------------------------------------------------------------------------
# recycle
# --------------------------------------------------------------------------------------


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
) -> Tuple[Tensor, Tensor]:
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

    Returns:
        out ``[B, T, D]`` (dtype of x): the weighted means; a slot with no member or zero
        total weight is 0. count int64 ``[B, T]``: members per slot.

    Expresses VisionZip's contextual tokens (``include_target=False`` plus the target),
    VFlowOpt's grid recycling (``assign`` + attention ``weight``) and PruMerge+'s
    absorption (``weight`` = attention, ``include_target=True``).
    """
    _same_device("recycle", x, target=target, source=source, weight=weight, assign=assign,
                 features=features)
    out, count, _, _ = _ops.recycle(x, target, source, weight, assign, features, metric,
                                    bool(include_target))
    return out, count


@torch.library.register_fake("tokenreduce::recycle")
def _recycle_fake(x, target, source, weight, assign, features, metric, include_target):
    op = "recycle"
    _need_dim(op, "x", x, 3, "[B, N, D]")
    _need_float(op, "x", x)
    _need_long(op, "target", target)
    _need_long(op, "source", source)
    _same_device(op, x, target=target, source=source, weight=weight, assign=assign, features=features)
    B, N, D = x.shape
    if metric != "cosine":
        _fail(op, f'metric must be "cosine", got "{metric}"')
    if target.dim() != 2 or target.shape[0] != B:
        _fail(op, f"target must have shape [B, T] with B={B}, got {tuple(target.shape)}")
    if source.dim() != 2 or source.shape[0] != B:
        _fail(op, f"source must have shape [B, S] with B={B}, got {tuple(source.shape)}")
    T, S = target.shape[1], source.shape[1]
    if weight is not None and tuple(weight.shape) != (B, N):
        _fail(op, f"weight must have shape [B, N] = [{B}, {N}], got {tuple(weight.shape)}")
    if assign is not None:
        _need_long(op, "assign", assign)
        if tuple(assign.shape) != (B, S):
            _fail(op, f"assign must have shape [B, S] = [{B}, {S}], got {tuple(assign.shape)}")
    if features is not None and (features.dim() != 3 or tuple(features.shape[:2]) != (B, N)):
        _fail(op, f"features must have shape [B, N, Df] = [{B}, {N}, Df], got {tuple(features.shape)}")
    return (
        x.new_empty((B, T, D)),
        x.new_empty((B, T), dtype=torch.long),
        x.new_empty((B, S), dtype=torch.long),
        x.new_empty((B, T), dtype=_acc_dtype(x)),
    )


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
    sl = slot.clamp_min(0)
    cs = w.gather(1, source) * inv.gather(1, sl) * keep
    gs = g.gather(1, sl[..., None].expand(-1, -1, D)) * cs[..., None]
    grad.scatter_add_(1, source[..., None].expand(-1, -1, D), gs)
    return grad.to(ctx.x_dtype), None, None, None, None, None, None, None


torch.library.register_autograd("tokenreduce::recycle", _recycle_backward, setup_context=_recycle_setup)

try:  # CUDA kernels compiled at run time (NVRTC via CuPy) when the build has none
    from .nvrtc import register_fallbacks as _register_nvrtc_fallbacks
    _register_nvrtc_fallbacks()
except Exception:  # pragma: no cover - a broken CuPy must not break import
    pass
