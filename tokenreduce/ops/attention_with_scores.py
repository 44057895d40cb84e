"""`attention_with_scores`: exact softmax attention that also returns the attention each
key receives. The wrapper, the fake kernel registration and the (refusing) autograd."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from .. import backends
from ..errors import fail
from .checks import need_dim, need_scale, rows_on_device, same_device
from .fake import attention_with_scores_fake

__all__ = ["attention_with_scores"]


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
    if backends.select("attention_with_scores", q.device, backend, q.dtype) == "triton":
        try:
            from ..triton import attention_with_scores as triton_attention
        except ImportError as e:
            fail("attention_with_scores", f"backend 'triton' needs the triton package ({e})", RuntimeError)
        return triton_attention(q, k, v, scale=scale, causal=causal, key_bias=key_bias,
                                score_rows=score_rows)
    op = "attention_with_scores"
    if not isinstance(q, Tensor):
        fail(op, f"q must be a tensor [B, H, Nq, Dh], got {type(q).__name__}", TypeError)
    need_dim(op, "q", q, 4, "[B, H, Nq, Dh]")
    scale = need_scale(op, scale, q.shape[-1])
    if score_rows is not None and not isinstance(score_rows, Tensor):
        score_rows = rows_on_device(op, score_rows, q.shape[2], q.device)
    same_device("attention_with_scores", q, k=k, v=v, key_bias=key_bias, score_rows=score_rows)
    return torch.ops.tokenreduce.attention_with_scores(q, k, v, float(scale), bool(causal), key_bias, score_rows)


torch.library.register_fake("tokenreduce::attention_with_scores")(attention_with_scores_fake)


def _attention_backward(ctx, *grads):
    raise NotImplementedError(
        "tokenreduce.attention_with_scores: the op is forward-only (no backward); "
        "train with torch.nn.functional.scaled_dot_product_attention"
    )


torch.library.register_autograd("tokenreduce::attention_with_scores", _attention_backward)
