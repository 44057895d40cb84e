"""dpp_select on CUDA through NVRTC: the checks of csrc/dpp_select/dpp_select_cuda.cpp and the
launch sequence of csrc/dpp_select/dpp_select_launch.cu, with the geometry of the same plan
(``tokenreduce._C.plans.dpp_select``, from csrc/dpp_select/dpp_select_plan.h). No host sync.
"""
from __future__ import annotations

import torch

from .. import _C
from ..ops.checks import acc_dtype
from ..ops.fake import dpp_select_fake
from . import get_kernel, launch_step
from ._common import acc_size, check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous, on_input_device
from ._names import dpp_select_names

SOURCE = "dpp_select/dpp_select_kernels.cuh"


@on_input_device
def dpp_select_cuda(features, k, relevance, mask):
    """The CUDA kernel of torch.ops.tokenreduce.dpp_select (same schema)."""
    op = "dpp_select"
    dpp_select_fake(features, k, relevance, mask)  # shared shape/dtype checks
    B, N, D = features.shape
    for what, v in (("N", N), ("D", D), ("B", B)):
        check_int_range(op, what, v)
    x = last_dim_contiguous(features)
    acc = acc_dtype(x)
    index = torch.empty(B, k, dtype=torch.long, device=x.device)
    gains = torch.empty(B, k, dtype=acc, device=x.device)
    if B == 0 or N == 0 or k == 0:
        return index, gains
    plan = _C.plans.dpp_select(B, N, D, k, acc_size(x))
    check_smem(op, f"N={N} (D={D}, k={k})", plan.greedy.smem)
    names = dpp_select_names(ctype(x))
    rel = relevance.to(acc).contiguous() if relevance is not None else None
    m = mask.contiguous() if mask is not None else None
    inv = torch.empty(B, N, dtype=acc, device=x.device)
    diag = torch.empty(B, N, dtype=acc, device=x.device)
    chol = torch.empty(B, k, N, dtype=acc, device=x.device)
    sb, sn = i64(x.stride(0)), i64(x.stride(1))
    launch_step(get_kernel(SOURCE, names["norms"]), plan.norms, (x, sb, sn, i32(N), i32(D), rel, inv, diag))
    launch_step(get_kernel(SOURCE, names["greedy"]), plan.greedy,
                (x, sb, sn, i32(N), i32(D), i32(k), rel, m, inv, diag, chol, index, gains))
    return index, gains
