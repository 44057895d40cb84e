"""recycle on CUDA through NVRTC: the launch sequence of csrc/recycle/recycle_launch.cu and
the checks of csrc/recycle/recycle_cuda.cpp.

Invalid positions / slots or non-finite compared features poison the batch row (out and
weight_sum NaN, count 0, slot -1), as the compiled path.
"""
from __future__ import annotations

import torch

from . import get_kernel, launch
from ._common import on_input_device, vector_ok, acc_dtype, cdiv, check_int_range, check_smem, ctype, fail, i32, i64, last_dim_contiguous
from ._names import recycle_names

SOURCE = "recycle/recycle_kernels.cuh"


@on_input_device
def recycle_cuda(x, target, source, weight, assign, features, metric, include_target):
    """The CUDA kernel of torch.ops.tokenreduce.recycle (same schema)."""
    op = "recycle"
    from ..ops import _need_float, _recycle_fake

    _recycle_fake(x, target, source, weight, assign, features, metric, include_target)
    if weight is not None:
        _need_float(op, "weight", weight)
    B, N, D = x.shape
    T, S = target.shape[1], source.shape[1]
    feats = None
    if assign is None:
        if T == 0 and S > 0:
            fail(op, f"sources need at least one target to join (T=0, S={S}); pass assign to drop them")
        feats = x if features is None else features
        _need_float(op, "features", feats)
        check_int_range(op, "Df", feats.shape[2])
    for what, v in (("N", N), ("D", D), ("T", T), ("S", S)):
        check_int_range(op, what, v)
    acc = acc_dtype(x)
    target, source = target.contiguous(), source.contiguous()
    w = None if weight is None else weight.to(acc).contiguous()
    slot = assign.contiguous().clone() if assign is not None else torch.empty(B, S, dtype=torch.long,
                                                                               device=x.device)
    x = last_dim_contiguous(x)
    out = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    count = torch.empty(B, T, dtype=torch.long, device=x.device)
    wsum = torch.empty(B, T, dtype=acc, device=x.device)
    if B == 0:
        return out, count, slot, wsum
    smem = (T + 1) * 4
    check_smem(op, f"T={T}", smem)
    inv_f = inv_d = None
    if feats is not None:
        feats = last_dim_contiguous(feats)
        fn = recycle_names(ctype(feats))
        inv = torch.empty(B, N, dtype=acc_dtype(feats), device=x.device)
        if feats.dtype == torch.float64:
            inv_d = inv
        else:
            inv_f = inv
        if N > 0:
            fsb, fsn = i64(feats.stride(0)), i64(feats.stride(1))
            launch(get_kernel(SOURCE, fn["inv_norm"]), (cdiv(N, 8), B), (256,),
                   (feats, fsb, fsn, i32(N), i32(feats.shape[2]), inv))
            if S > 0:
                launch(get_kernel(SOURCE, fn["assign"]), (cdiv(S, 64), B), (256,),
                       (feats, fsb, fsn, i32(N), i32(feats.shape[2]), inv, target, i32(T), source, i32(S), slot))
    off = torch.empty(B, T + 1, dtype=torch.int32, device=x.device)
    mem = torch.empty(B, max(S, 1), dtype=torch.int32, device=x.device)
    bad = torch.empty(B, dtype=torch.int32, device=x.device)
    xn = recycle_names(ctype(x))
    launch(get_kernel(SOURCE, xn["plan"]), (B,), (512,),
           (target, source, slot, inv_f, inv_d, i32(N), i32(T), i32(S), i32(bool(include_target)), count, off,
            mem, bad), shared_mem=smem)
    if T > 0:
        vec = vector_ok(x, D) and vector_ok(out, D)
        launch(get_kernel(SOURCE, xn["aggregate_vec" if vec else "aggregate"]), (T, B), (128,),
               (x, i64(x.stride(0)), i64(x.stride(1)), i32(N), i32(D), i32(T), i32(S), target, w, off, mem, bad,
                i32(bool(include_target)), out, wsum))
    return out, count, slot, wsum
