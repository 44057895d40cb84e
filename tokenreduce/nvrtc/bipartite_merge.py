"""bipartite_merge on CUDA through NVRTC: the launch sequence of
csrc/bipartite_merge/bipartite_merge_launch.cu and the checks of bipartite_merge_cuda.cpp.

A non-finite metric row poisons the batch row (merged and size NaN), as the compiled path.
"""
from __future__ import annotations

import torch

from . import get_kernel, launch
from ._common import on_input_device, vector_ok, acc_dtype, acc_size, cdiv, check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous
from ._names import bipartite_merge_names

SOURCE = "bipartite_merge/bipartite_merge_kernels.cuh"


def plan_smem(N: int, asz: int) -> int:  # = plan_smem_bytes (bipartite_merge_kernels.cuh)
    Na, Nb = (N + 1) // 2, N // 2
    return Na * asz + 2 * Na * 4 + (Nb + 1) * 4 + 16


@on_input_device
def bipartite_merge_cuda(x, r, metric, size, protect, order):
    """The CUDA kernel of torch.ops.tokenreduce.bipartite_merge (same schema)."""
    op = "bipartite_merge"
    from ..ops import _bipartite_merge_fake

    _bipartite_merge_fake(x, r, metric, size, protect, order)  # shared shape/dtype checks
    if metric is not None and not metric.dtype.is_floating_point:
        from ..ops import _need_float
        _need_float(op, "metric", metric)
    if size is not None:
        from ..ops import _need_float
        _need_float(op, "size", size)
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
    masz = acc_size(m)
    smem = plan_smem(N, masz)
    check_smem(op, f"N={N}", smem)
    Na, Nb, No, R = (N + 1) // 2, N // 2, N - r, max(r, 1)
    macc = acc_dtype(m)
    inv = torch.empty(B, N, dtype=macc, device=x.device)
    node_max = torch.empty(B, Na, dtype=macc, device=x.device)
    node_idx = torch.empty(B, Na, dtype=torch.int32, device=x.device)
    owner = torch.empty(B, No, dtype=torch.int32, device=x.device)
    off = torch.empty(B, Nb + 1, dtype=torch.int32, device=x.device)
    mem = torch.empty(B, R, dtype=torch.int32, device=x.device)
    bad = torch.empty(B, dtype=torch.int32, device=x.device)
    mn = bipartite_merge_names(ctype(m))
    xn = bipartite_merge_names(ctype(x))
    msb, msn = i64(m.stride(0)), i64(m.stride(1))
    Dm = m.shape[2]
    launch(get_kernel(SOURCE, mn["inv_norm"]), (cdiv(N, 8), B), (256,), (m, msb, msn, i32(N), i32(Dm), inv))
    launch(get_kernel(SOURCE, mn["match"]), (cdiv(Na, 64), B), (256,),
           (m, msb, msn, i32(N), i32(Dm), inv, i32((protect + 1) // 2), i32(protect // 2), node_max, node_idx))
    launch(get_kernel(SOURCE, mn["plan"]), (B,), (512,),
           (node_max, node_idx, inv, i32(N), i32(r), i32(protect), i32(order == "tome"), source, owner, off,
            mem, bad), shared_mem=smem)
    vec = vector_ok(x, D) and vector_ok(merged, D)
    launch(get_kernel(SOURCE, xn["merge_vec" if vec else "merge"]), (No, B), (128,),
           (x, i64(x.stride(0)), i64(x.stride(1)), i32(N), i32(D), i32(r), size, owner, off, mem, bad,
            merged, size_out))
    return merged, size_out, source
