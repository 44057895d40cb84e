"""Python argument checks shared by the op wrappers, the fake kernels and the NVRTC
fallback (`tokenreduce.nvrtc`). Each raises through `tokenreduce.errors.fail`, so messages
read ``tokenreduce.<op>: <argument> ...``."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import fail

__all__ = ["acc_dtype", "need_float", "need_long", "need_dim", "same_device", "need_int"]


def acc_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype of a floating tensor: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def need_float(op: str, name: str, t: Tensor) -> None:
    """TypeError unless `t` is a floating tensor."""
    if not t.dtype.is_floating_point:
        fail(op, f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), "
                 f"got {t.dtype}", TypeError)


def need_long(op: str, name: str, t: Tensor) -> None:
    """TypeError unless `t` is an int64 tensor."""
    if t.dtype != torch.long:
        fail(op, f"{name} must be an int64 tensor, got {t.dtype}", TypeError)


def need_dim(op: str, name: str, t: Tensor, dim: int, shape: str) -> None:
    """ValueError unless `t` has `dim` dims (`shape` names them, e.g. ``"[B, N, D]"``)."""
    if t.dim() != dim:
        fail(op, f"{name} must have shape {shape} ({dim} dims), got {tuple(t.shape)}")


def same_device(op: str, ref: Tensor, **named) -> None:
    """ValueError if a named tensor (None is skipped) is not on `ref`'s device."""
    for name, t in named.items():
        if isinstance(t, Tensor) and t.device != ref.device:
            fail(op, f"{name} is on {t.device} but the input is on {ref.device}")


def need_int(op: str, name: str, v) -> None:
    """TypeError unless `v` is a Python int (not bool): output shapes are static."""
    if isinstance(v, bool) or not isinstance(v, int):
        fail(op, f"{name} must be a Python int (output shapes are static), got {type(v).__name__}",
             TypeError)
