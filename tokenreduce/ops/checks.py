"""Python argument checks shared by the op wrappers, the fake kernels and the NVRTC
fallback (`tokenreduce.nvrtc`). Each raises through `tokenreduce.errors.fail`, so messages
read ``tokenreduce.<op>: <argument> ...``."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import fail

__all__ = ["acc_dtype", "need_float", "need_long", "need_dim", "same_device", "need_int",
           "need_scale", "need_grid", "rows_on_device"]


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
    """TypeError unless `v` is a Python int (not bool): output shapes are static; ValueError
    unless it fits the int64 the op schemas take."""
    if isinstance(v, bool) or not isinstance(v, int):
        fail(op, f"{name} must be a Python int (output shapes are static), got {type(v).__name__}",
             TypeError)
    if not -(2**63) <= v < 2**63:
        fail(op, f"{name} = {v} does not fit in int64")


def need_grid(op: str, name: str, grid) -> tuple:
    """``(h, w)`` as two Python ints (TypeError otherwise): a grid's rows and columns."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list)) or len(grid) != 2:
        fail(op, f"{name} must be a pair of ints (rows, columns), got {grid!r}", TypeError)
    for v in grid:
        need_int(op, name, v)
    return int(grid[0]), int(grid[1])


def need_scale(op: str, scale, head_dim: int) -> float:
    """The logit scale as a float: a real number, or ``head_dim ** -0.5`` when None."""
    if scale is None:
        if head_dim == 0:
            fail(op, "q has head dim Dh = 0: give scale explicitly (the default is Dh ** -0.5)")
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        fail(op, f"scale must be a real number (float), got {type(scale).__name__}", TypeError)
    return float(scale)


def rows_on_device(op: str, rows, nq: int, device: torch.device) -> Tensor:
    """``score_rows`` given as Python ints (one int or a sequence) -> int64 ``[R]`` on ``device``,
    checked on the host (types, ``-nq <= r < nq``; negatives count from the end) and built
    there without copying host data in: one ``arange`` (or ``full``) per run of an arithmetic
    progression, so ``[0]`` / ``[-1]`` / ``range(n)`` are one small kernel, never a blocking
    host-to-device copy, and CUDA-graph capture keeps working."""
    if isinstance(rows, (str, bytes)) or isinstance(rows, bool):
        fail(op, f"score_rows must be an int, a sequence of ints or an int64 tensor, got {rows!r}", TypeError)
    if isinstance(rows, int):
        rows = [rows]
    elif isinstance(rows, (list, tuple, range)):
        rows = list(rows)
    else:
        fail(op, f"score_rows must be an int, a sequence of ints or an int64 tensor, "
                 f"got {type(rows).__name__}", TypeError)
    if not rows:
        fail(op, "score_rows must be a non-empty 1-D tensor of query positions, got shape (0,) "
                 "(None scores every row)")
    for e, r in enumerate(rows):
        if isinstance(r, bool) or not isinstance(r, int):
            fail(op, f"score_rows must hold ints, got {type(r).__name__} ({r!r}) at {e}", TypeError)
        if not -nq <= r < nq:
            fail(op, f"score_rows[{e}] = {r} is out of range for Nq = {nq}", IndexError)
    rows = [r % nq for r in rows]
    pieces, i = [], 0
    while i < len(rows):
        step = rows[i + 1] - rows[i] if i + 1 < len(rows) else 1
        j = i + 1
        while j < len(rows) and rows[j] - rows[j - 1] == step:
            j += 1
        n = j - i
        pieces.append(torch.full((n,), rows[i], dtype=torch.long, device=device) if step == 0 else
                      torch.arange(rows[i], rows[i] + step * n, step, dtype=torch.long, device=device))
        i = j
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
