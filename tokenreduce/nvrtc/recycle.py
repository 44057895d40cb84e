"""recycle on CUDA through NVRTC: the checks of csrc/recycle/recycle_cuda.cpp and the launch
sequence of csrc/recycle/recycle_launch.cu, with the geometry of the same plan
(``tokenreduce._C.plans.recycle``, from csrc/recycle/recycle_plan.h).

Invalid positions / slots or non-finite compared features poison the batch row (out and
weight_sum NaN, count 0, slot -1), as the compiled path.
"""
from __future__ import annotations

import torch

from .. import _C
from ..errors import fail
from ..ops.checks import acc_dtype, need_float
from ..ops.fake import recycle_fake
from . import get_kernel, launch_step
from ._common import check_int_range, check_smem, ctype, i32, i64, last_dim_contiguous, on_input_device, vector_ok
from ._names import recycle_names

SOURCE = "recycle/recycle_kernels.cuh"


@on_input_device
def recycle_cuda(x, target, source, weight, assign, features, metric, include_target):
    """The CUDA kernel of torch.ops.tokenreduce.recycle (same schema)."""
    op = "recycle"
    recycle_fake(x, target, source, weight, assign, features, metric, include_target)
    if weight is not None:
        need_float(op, "weight", weight)
    B, N, D = x.shape
    T, S = target.shape[1], source.shape[1]
    feats = None
    if assign is None:
        if T == 0 and S > 0:
            fail(op, f"sources need at least one target to join (T=0, S={S}); pass assign to drop them")
        feats = x if features is None else features
        need_float(op, "features", feats)
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
    plan = _C.plans.recycle(B, N, T, S, feats is not None)
    check_smem(op, f"T={T}", plan.plan.smem)
    inv_f = inv_d = None
    if feats is not None:
        feats = last_dim_contiguous(feats)
        feat_names = recycle_names(ctype(feats))
        inv = torch.empty(B, N, dtype=acc_dtype(feats), device=x.device)
        if feats.dtype == torch.float64:
            inv_d = inv
        else:
            inv_f = inv
        fsb, fsn = i64(feats.stride(0)), i64(feats.stride(1))
        launch_step(get_kernel(SOURCE, feat_names["inv_norm"]), plan.inv_norm,
                    (feats, fsb, fsn, i32(N), i32(feats.shape[2]), inv))
        launch_step(get_kernel(SOURCE, feat_names["assign"]), plan.assign,
                    (feats, fsb, fsn, i32(N), i32(feats.shape[2]), inv, target, i32(T), source, i32(S), slot))
    off = torch.empty(B, T + 1, dtype=torch.int32, device=x.device)
    mem = torch.empty(B, plan.members, dtype=torch.int32, device=x.device)
    bad = torch.empty(B, dtype=torch.int32, device=x.device)
    x_names = recycle_names(ctype(x))
    launch_step(get_kernel(SOURCE, x_names["plan"]), plan.plan,
                (target, source, slot, inv_f, inv_d, i32(N), i32(T), i32(S), i32(bool(include_target)), count, off,
                 mem, bad))
    if plan.aggregate.launched:
        vec = vector_ok(x, D) and vector_ok(out, D)
        launch_step(get_kernel(SOURCE, x_names["aggregate_vec" if vec else "aggregate"]), plan.aggregate,
                    (x, i64(x.stride(0)), i64(x.stride(1)), i32(N), i32(D), i32(T), i32(S), target, w, off, mem, bad,
                     i32(bool(include_target)), out, wsum))
    return out, count, slot, wsum
