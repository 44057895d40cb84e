"""region_attention on CUDA through NVRTC: the checks of
csrc/region_attention/region_attention_cuda.cpp and the launch of
csrc/region_attention/region_attention_launch.cu, with the geometry of the same plan
(``tokenreduce._C.plans.region_attention``, from csrc/region_attention/region_attention_plan.h).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _C
from ..ops.checks import acc_dtype
from ..ops.fake import region_attention_fake
from . import get_kernel, launch_step
from ._common import acc_size, check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous, on_input_device
from ._names import region_attention_names

SOURCE = "region_attention/region_attention_kernels.cuh"


@on_input_device
def region_attention_cuda(q, k, v, grid_h, grid_w, region, heads, scale):
    """The CUDA kernel of torch.ops.tokenreduce.region_attention (same schema)."""
    op = "region_attention"
    region_attention_fake(q, k, v, grid_h, grid_w, region, heads, scale)
    B, M, C = q.shape
    L, Cv = k.shape[1], v.shape[3]
    for what, val in (("B", B), ("M", M), ("C", C), ("Cv", Cv), ("L * region^2", L * region * region),
                      ("region * grid_w", region * grid_w)):
        check_int_range(op, what, val)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty(B, M, Cv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, M, heads, dtype=acc_dtype(q), device=q.device)
    if B * M == 0:
        return out, lse
    plan = _C.plans.region_attention(B, M, heads, L, region, acc_size(q))
    check_smem(op, f"L * region^2 = {L * region * region} keys", plan.forward.smem)
    sc = np.float64(scale) if q.dtype == torch.float64 else np.float32(scale)
    launch_step(get_kernel(SOURCE, region_attention_names(ctype(q))["forward"]), plan.forward,
                (q, i64(q.stride(0)), i64(q.stride(1)), k, i64(k.stride(0)), i64(k.stride(1)), i64(k.stride(2)),
                 v, i64(v.stride(0)), i64(v.stride(1)), i64(v.stride(2)), i32(B), i32(M), i32(grid_w), i32(region),
                 i32(L), i32(heads), i32(C // heads), i32(Cv // heads), sc, out, lse))
    return out, lse
