"""bipartite_merge on CUDA through NVRTC: the checks of csrc/bipartite_merge/bipartite_merge_cuda.cpp
and the launch sequence of bipartite_merge_launch.cu, with the geometry and workspace sizes
of the same plan (``tokenreduce._C.plans.bipartite_merge``, from bipartite_merge_plan.h).

A non-finite metric row poisons the batch row (merged and size NaN), as the compiled path.
"""
from __future__ import annotations

import torch

from .. import _C
from ..ops.checks import acc_dtype, need_float
from ..ops.fake import bipartite_merge_fake
from . import get_kernel, launch_step
from ._common import acc_size, check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous, on_input_device, vector_ok
from ._names import bipartite_merge_names

SOURCE = "bipartite_merge/bipartite_merge_kernels.cuh"


@on_input_device
def bipartite_merge_cuda(x, r, metric, size, protect, order):
    """The CUDA kernel of torch.ops.tokenreduce.bipartite_merge (same schema)."""
    op = "bipartite_merge"
    bipartite_merge_fake(x, r, metric, size, protect, order)  # shared shape/dtype checks
    if metric is not None and not metric.dtype.is_floating_point:
        need_float(op, "metric", metric)
    if size is not None:
        need_float(op, "size", size)
    B, N, D = x.shape
    m = x if metric is None else metric
    for what, v in (("N", N), ("D", D), ("Dm", m.shape[2])):
        check_int_range(op, what, v)
    acc = acc_dtype(x)
    size = torch.ones(B, N, dtype=acc, device=x.device) if size is None else size.to(acc).contiguous()
    x = last_dim_contiguous(x)
    m = last_dim_contiguous(m)
    merged = torch.empty(B, N - r, D, dtype=x.dtype, device=x.device)
    size_out = torch.empty(B, N - r, dtype=acc, device=x.device)
    source = torch.empty(B, N, dtype=torch.long, device=x.device)
    if r == 0:
        merged.copy_(x)
        size_out.copy_(size)
        source.copy_(torch.arange(N, device=x.device).expand(B, N))
        return merged, size_out, source
    if B == 0:
        return merged, size_out, source
    plan = _C.plans.bipartite_merge(B, N, r, acc_size(m))
    check_smem(op, f"N={N}", plan.plan.smem)
    macc = acc_dtype(m)
    inv = torch.empty(B, N, dtype=macc, device=x.device)
    node_max = torch.empty(B, plan.na, dtype=macc, device=x.device)
    node_idx = torch.empty(B, plan.na, dtype=torch.int32, device=x.device)
    owner = torch.empty(B, plan.no, dtype=torch.int32, device=x.device)
    off = torch.empty(B, plan.nb + 1, dtype=torch.int32, device=x.device)
    mem = torch.empty(B, plan.members, dtype=torch.int32, device=x.device)
    bad = torch.empty(B, dtype=torch.int32, device=x.device)
    metric_names = bipartite_merge_names(ctype(m))
    x_names = bipartite_merge_names(ctype(x))
    msb, msn = i64(m.stride(0)), i64(m.stride(1))
    Dm = m.shape[2]
    launch_step(get_kernel(SOURCE, metric_names["inv_norm"]), plan.inv_norm, (m, msb, msn, i32(N), i32(Dm), inv))
    launch_step(get_kernel(SOURCE, metric_names["match"]), plan.match,
                (m, msb, msn, i32(N), i32(Dm), inv, i32((protect + 1) // 2), i32(protect // 2), node_max, node_idx))
    launch_step(get_kernel(SOURCE, metric_names["plan"]), plan.plan,
                (node_max, node_idx, inv, i32(N), i32(r), i32(protect), i32(order == "tome"), source, owner, off,
                 mem, bad))
    vec = vector_ok(x, D) and vector_ok(merged, D)
    launch_step(get_kernel(SOURCE, x_names["merge_vec" if vec else "merge"]), plan.merge,
                (x, i64(x.stride(0)), i64(x.stride(1)), i32(N), i32(D), i32(r), size, owner, off, mem, bad,
                 merged, size_out))
    return merged, size_out, source
