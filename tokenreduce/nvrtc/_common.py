"""Argument marshalling shared by the NVRTC op implementations (tokenreduce/nvrtc/<op>.py)."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from ..errors import fail
from ._names import CTYPES


def ctype(t: torch.Tensor) -> str:
    """C++ storage type of a floating tensor ("float", "__half", "__nv_bfloat16", "double")."""
    return CTYPES[str(t.dtype).replace("torch.", "")]


def acc_size(t: torch.Tensor) -> int:
    """Bytes of the accumulation type of a floating tensor (8 for float64, else 4)."""
    return 8 if t.dtype == torch.float64 else 4


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Unit stride on the last dim (other strides kept), as the C++ glue."""
    if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def i32(v) -> np.int32:
    return np.int32(int(v))


def i64(v) -> np.int64:
    return np.int64(int(v))


def check_int_range(op: str, what: str, v: int):
    if not (0 <= v < 2**31):
        fail(op, f"{what}={v} is too large for the CUDA kernels")


def check_smem(op: str, what: str, need: int):
    from . import max_shared_memory_optin

    limit = max_shared_memory_optin()
    if need > limit:
        fail(op, f"{what} needs {need} bytes of shared memory per block on CUDA; this GPU allows {limit}")


def on_input_device(fn):
    """Run an op implementation with the device of its first tensor argument current (what
    the compiled glue's CUDAGuard does), so that kernels and streams are that device's."""

    @functools.wraps(fn)
    def wrapper(x, *args):
        ctx = torch.cuda.device(x.device) if getattr(x, "is_cuda", False) else contextlib.nullcontext()
        with ctx:
            return fn(x, *args)

    return wrapper


def vector_ok(t: torch.Tensor, D: int) -> bool:
    """= vector_ok (csrc/common/cuda_launch.h): rows of t readable as 16-byte vectors."""
    v = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and t.stride(0) % v == 0 and t.stride(1) % v == 0 and D % v == 0
