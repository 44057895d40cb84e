"""NVRTC (CuPy) fallback of ``attention_with_scores`` on CUDA.

Compiles ``csrc/attention_with_scores/attention_with_scores_kernels.cuh`` at run time (the
same source nvcc builds into the extension) and launches it as
``csrc/attention_with_scores/attention_with_scores_launch.cu`` does, from the same launch
plan: ``attention_plan`` asks the compiled library (``tokenreduce._C.plans``, i.e.
``make_plan`` of attention_with_scores_plan.h) for the path, grids and shared-memory sizes,
and the constants below are read from the library too, so nothing here can drift from the
C++ launcher.

Paths (see the launcher): short keys with many scored rows -> forward kernel with in-kernel
column sums + reduction; few scored rows (R <= 8, e.g. [CLS]) or long keys -> forward kernel
writing the LSE, key-block-major column pass, reduction. No host sync: score_rows is read on
the device; an out-of-range entry is ignored there (the CPU op raises IndexError).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _C
from ..errors import fail
from ..ops.checks import acc_dtype
from ..ops.fake import attention_with_scores_fake
from . import get_kernel, launch, max_shared_memory_optin

# source of the kernels, relative to csrc/ (as tokenreduce/nvrtc/_names.py keys them)
SOURCE = "attention_with_scores/attention_with_scores_kernels.cuh"
NVRTC_OPTIONS = ()  # get_kernel adds -std=c++17 and the CUDA include path

# ---- constants of attention_with_scores_kernels.cuh / _plan.h, from the compiled library
_CONSTANTS = _C.plans.constants()["attention_with_scores"]
BQ = _CONSTANTS["BQ"]  # query rows per CTA
BK = _CONSTANTS["BK"]  # keys per tile
DV_CHUNK = _CONSTANTS["DvChunk"]
THREADS = _CONSTANTS["Threads"]
SCALAR_D_CHUNK = _CONSTANTS["ScalarDChunk"]
MAX_HEAD_DIM = _CONSTANTS["MaxHeadDim"]
ROW_PATH_MAX_ROWS = _CONSTANTS["RowPathMaxRows"]
MAX_GRID_YZ = _CONSTANTS["MaxGridYZ"]

_CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
          torch.float64: "double"}
_NS = "tokenreduce::attn::"


def attention_names(ctype: str) -> dict:
    """Name expressions of the three kernels for a C++ storage type."""
    acc = "double" if ctype == "double" else "float"
    return {
        "fwd": f"{_NS}attn_fwd_kernel<{ctype}>",
        "colscore": f"{_NS}attn_colscore_kernel<{ctype}>",
        "reduce": f"{_NS}attn_reduce_scores_kernel<{acc}>",
    }


def attention_plan(dtype: torch.dtype, H: int, Nq: int, Nk: int, Dh: int, Dv: int, R: int,
                   smem_optin: int):
    """The launch plan of the C++ launcher (``make_plan``), from the compiled library: an
    ``AttentionPlan`` (kc, nqb, nkt, multi_chunk, scores_in_fwd, colscore, fwd_smem,
    colscore_smem, partial_rows, need_lse, need_oacc, ok, threads, reduce_blocks).

    R: number of score_rows entries, -1 when every row is scored.
    """
    code = _C.plans.DTYPE_CODES[str(dtype).replace("torch.", "")]
    return _C.plans.attention_with_scores(code, H, Nq, Nk, Dh, Dv, R, smem_optin)


def _vec_ok(t: torch.Tensor, es: int) -> bool:
    vw = 16 // es
    return (t.data_ptr() % 16 == 0 and t.shape[-1] % vw == 0
            and all(s % vw == 0 for s in t.stride()[:3]))


def _smem_optin(device) -> int:
    """Opt-in shared memory per block of the device (bytes)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return max_shared_memory_optin()


def attention_with_scores_cuda(q, k, v, scale, causal, key_bias, score_rows):
    """NVRTC launch of the CUDA kernels: q [B,H,Nq,Dh], k [B,Hkv,Nk,Dh], v [B,Hkv,Nk,Dv]
    -> out [B,H,Nq,Dv] (dtype of q), scores [B,Nk] (float32; float64 for float64 q).

    Registered by tokenreduce.nvrtc.register_fallbacks as the CUDA kernel of the op when no
    compiled one exists: same checks and messages as csrc/.../attention_with_scores_cuda.cpp.
    """
    op = "attention_with_scores"
    attention_with_scores_fake(q, k, v, scale, causal, key_bias, score_rows)  # shapes, dtypes, devices
    if q.dtype not in _CTYPE:
        fail(op, f"unsupported dtype {q.dtype}", TypeError)
    if key_bias is not None and not key_bias.dtype.is_floating_point:
        fail(op, f"key_bias must be a floating tensor (float32, float16, bfloat16 or float64), got {key_bias.dtype}",
             TypeError)
    if score_rows is not None and (score_rows.dim() != 1 or score_rows.numel() == 0):
        fail(op, f"score_rows must be a non-empty 1-D tensor of query positions, got shape {list(score_rows.shape)}")
    B, H, Nq, Dh = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not (1 <= Dh <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        fail(op, f"the CUDA kernel supports head dims 1..{MAX_HEAD_DIM}, got Dh = {Dh} and Dv = {Dv}")
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        fail(op, f"the CUDA kernel supports at most {MAX_GRID_YZ} batch rows and heads, got B = {B}, H = {H}")
    if Nk == 0:
        fail(op, "k must hold at least one key")
    acc = acc_dtype(q)
    np_acc = np.float64 if q.dtype == torch.float64 else np.float32
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, H, Nq, Dv, dtype=q.dtype, device=q.device)
    if B * H * Nq == 0:
        return out, torch.zeros(B, Nk, dtype=acc, device=q.device)
    scores = torch.empty(B, Nk, dtype=acc, device=q.device)
    bias = None if key_bias is None else key_bias.to(acc).contiguous()
    rows = None if score_rows is None else score_rows.contiguous()
    R = -1 if rows is None else rows.numel()

    smem_optin = _smem_optin(q.device)
    plan = attention_plan(q.dtype, H, Nq, Nk, Dh, Dv, R, smem_optin)
    if not plan.ok:
        fail(op, f"head dims Dh = {Dh}, Dv = {Dv} do not fit in this GPU's shared memory "
                 f"({smem_optin} bytes per block)")
    partial = torch.empty(B, plan.partial_rows, Nk, dtype=acc, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=acc, device=q.device) if plan.need_lse else None
    oacc = torch.empty(B, H, Nq, Dv, dtype=acc, device=q.device) if plan.need_oacc else None

    names = attention_names(_CTYPE[q.dtype])
    es = q.element_size()
    vqk = np.int32(_vec_ok(q, es) and _vec_ok(k, es))
    vv = np.int32(_vec_ok(v, es))
    null = None  # launch() passes None as a null pointer
    i32, i64 = np.int32, np.int64
    scale_log2 = np_acc(scale * 1.4426950408889634)
    rows_arg = null if rows is None else rows
    bias_arg = null if bias is None else bias
    Rk = i32(0 if rows is None else R)
    qs, ks, vs = ([i64(s) for s in t.stride()[:3]] for t in (q, k, v))

    fwd = get_kernel(SOURCE, names["fwd"], NVRTC_OPTIONS)  # launch() raises the smem limit when needed
    launch(fwd, (plan.nqb, H, B), (plan.threads, 1, 1),
           (q, k, v, *qs, *ks, *vs, bias_arg, rows_arg, Rk, out,
            lse if plan.need_lse else null, oacc if plan.need_oacc else null,
            partial if plan.scores_in_fwd else null,
            i32(H), i32(Hkv), i32(Nq), i32(Nk), i32(Dh), i32(Dv), scale_log2, i32(bool(causal)),
            i32(plan.kc), vqk, vv),
           shared_mem=plan.fwd_smem)
    if plan.colscore:
        colscore = get_kernel(SOURCE, names["colscore"], NVRTC_OPTIONS)
        launch(colscore, (plan.nkt, H, B), (plan.threads, 1, 1),
               (q, k, *qs, *ks, bias_arg, rows_arg, Rk, lse, partial, i32(H), i32(Hkv), i32(Nq),
                i32(Nk), i32(Dh), scale_log2, i32(bool(causal)), vqk),
               shared_mem=plan.colscore_smem)
    r_eff = Nq if rows is None else R
    reduce = get_kernel(SOURCE, names["reduce"], NVRTC_OPTIONS)
    launch(reduce, (plan.reduce_blocks, B, 1), (plan.threads, 1, 1),
           (partial, i32(plan.partial_rows), i32(Nk), np_acc(1.0 / (H * r_eff)), scores))
    return out, scores
