"""kcenter on CUDA through NVRTC: the checks of csrc/kcenter/kcenter_cuda.cpp and the launch
sequence of csrc/kcenter/kcenter_launch.cu, with the geometry of the same plan
(``tokenreduce._C.plans.kcenter``, from csrc/kcenter/kcenter_plan.h). No host sync.

Data-dependent errors poison the batch row (index -1, mindist NaN) as in the compiled path.
"""
from __future__ import annotations

import math

import torch

from .. import _C
from ..errors import fail
from ..ops.checks import acc_dtype
from ..ops.fake import kcenter_fake
from . import get_kernel, launch_step
from ._common import acc_size, check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous, on_input_device
from ._names import kcenter_names

SOURCE = "kcenter/kcenter_kernels.cuh"


#: tests and the sanitizer driver set 0 to force the re-streaming kernels (None: the library's
#: kKcenterGramBudget decides)
gram_budget_override = None


@on_input_device
def kcenter_cuda(x, k, metric, first, first_index, isolated, mask):
    """The CUDA kernel of torch.ops.tokenreduce.kcenter (same schema)."""
    op = "kcenter"
    kcenter_fake(x, k, metric, first, first_index, isolated, mask)  # shared shape/dtype checks
    B, N, D = x.shape
    if first_index is not None:
        if first_index.dim() != 1 or first_index.shape[0] != B:
            fail(op, f"first must be an int or an int64 tensor of shape [B] = [{B}], got shape "
                     f"{list(first_index.shape)}")
        first_index = first_index.contiguous()
    elif not isolated and B > 0 and not (-N <= first < N):
        fail(op, f"first={first} is out of range for N={N}", IndexError)
    for what, v in (("N", N), ("D", D), ("B", B)):
        check_int_range(op, what, v)
    x = last_dim_contiguous(x)
    acc = acc_dtype(x)
    index = torch.empty(B, k, dtype=torch.long, device=x.device)
    mindist = torch.empty(B, N, dtype=acc, device=x.device)
    if B == 0 or N == 0:
        return index, mindist
    if k == 0:
        return index, mindist.fill_(math.inf)
    budget = () if gram_budget_override is None else (gram_budget_override,)
    plan = _C.plans.kcenter(B, N, D, acc_size(x), bool(isolated), *budget)
    check_smem(op, f"N={N} (D={D})", plan.select.smem)
    names = kcenter_names(ctype(x))
    sq = torch.empty(B, N, dtype=acc, device=x.device)
    cosine = i32(metric == "cosine")
    sb, sn = i64(x.stride(0)), i64(x.stride(1))
    launch_step(get_kernel(SOURCE, names["sqnorm"]), plan.sqnorm, (x, sb, sn, i32(N), i32(D), sq))
    dist = None
    if plan.gram:
        dist = torch.empty(B, N, N, dtype=acc, device=x.device)
        launch_step(get_kernel(SOURCE, names["gram"]), plan.tiles, (x, sb, sn, i32(N), i32(D), sq, cosine, dist))
        if plan.nn.launched:
            launch_step(get_kernel(SOURCE, names["nn_gram"]), plan.nn, (dist, i32(N), mindist))
    elif plan.nn.launched:
        launch_step(get_kernel(SOURCE, names["nn_stream"]), plan.nn,
                    (x, sb, sn, i32(N), i32(D), sq, cosine, mindist))
    launch_step(get_kernel(SOURCE, names["select_gram" if plan.gram else "select_stream"]), plan.select,
                (x, sb, sn, i32(N), i32(D), sq, cosine, dist, i32(k), i64(first), first_index,
                 i32(bool(isolated)), mindist, mask.contiguous() if mask is not None else None, index, mindist))
    return index, mindist
