"""kcenter on CUDA through NVRTC: the launch sequence of csrc/kcenter/kcenter_launch.cu and
the checks of csrc/kcenter/kcenter_cuda.cpp, in Python (no host sync).

Data-dependent errors poison the batch row (index -1, mindist NaN) as in the compiled path.
"""
from __future__ import annotations

import math

import torch

from . import get_kernel, launch
from ._common import on_input_device, acc_dtype, acc_size, cdiv, check_int_range, check_smem, ctype, fail, i32, i64, last_dim_contiguous
from ._names import kcenter_names

SOURCE = "kcenter/kcenter_kernels.cuh"
GRAM_BUDGET = 1 << 30  # = kKcenterGramBudget (kcenter_launch.h)


def select_smem(N: int, D: int, asz: int, stream: bool) -> int:
    return N * asz + (D * asz if stream else 0) + N


def select_threads(N: int, stream: bool) -> int:
    if stream:
        return 1024
    return min(1024, max(64, cdiv(N, 32) * 32))


@on_input_device
def kcenter_cuda(x, k, metric, first, first_index, isolated, mask):
    """The CUDA kernel of torch.ops.tokenreduce.kcenter (same schema)."""
    op = "kcenter"
    from ..ops import _kcenter_fake

    _kcenter_fake(x, k, metric, first, first_index, isolated, mask)  # shared shape/dtype checks
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
    asz = acc_size(x)
    gram = B * N * N * asz <= GRAM_BUDGET
    smem = select_smem(N, D, asz, not gram)
    check_smem(op, f"N={N} (D={D})", smem)
    names = kcenter_names(ctype(x))
    sq = torch.empty(B, N, dtype=acc, device=x.device)
    cosine = i32(metric == "cosine")
    sb, sn = i64(x.stride(0)), i64(x.stride(1))
    rows_grid = (cdiv(N, 8), B)
    launch(get_kernel(SOURCE, names["sqnorm"]), rows_grid, (256,), (x, sb, sn, i32(N), i32(D), sq))
    dist = None
    if gram:
        dist = torch.empty(B, N, N, dtype=acc, device=x.device)
        launch(get_kernel(SOURCE, names["gram"]), (cdiv(N, 64), cdiv(N, 64), B), (256,),
               (x, sb, sn, i32(N), i32(D), sq, cosine, dist))
        if isolated:
            launch(get_kernel(SOURCE, names["nn_gram"]), rows_grid, (256,), (dist, i32(N), mindist))
    elif isolated:
        launch(get_kernel(SOURCE, names["nn_stream"]), rows_grid, (256,),
               (x, sb, sn, i32(N), i32(D), sq, cosine, mindist))
    kern = get_kernel(SOURCE, names["select_gram" if gram else "select_stream"])
    launch(kern, (B,), (select_threads(N, not gram),),
           (x, sb, sn, i32(N), i32(D), sq, cosine, dist, i32(k), i64(first), first_index,
            i32(bool(isolated)), mindist, mask.contiguous() if mask is not None else None, index, mindist),
           shared_mem=smem)
    return index, mindist
