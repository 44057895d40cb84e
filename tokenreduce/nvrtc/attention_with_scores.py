"""NVRTC (CuPy) fallback of ``attention_with_scores`` on CUDA.

Compiles ``csrc/attention_with_scores/attention_with_scores_kernels.cuh`` at run time (the
same source nvcc builds into the extension) and launches it exactly as
``csrc/attention_with_scores/attention_with_scores_launch.cu`` does. ``attention_plan`` is
the one place on the Python side that decides the path and the shared-memory sizes; it
mirrors ``make_plan`` and the layout functions of the .cuh (change them together; the
host tests check the two agree on the constants).

Paths (see the launcher): short keys with many scored rows -> forward kernel with in-kernel
column sums + reduction; few scored rows (R <= 8, e.g. [CLS]) or long keys -> forward kernel
writing the LSE, key-block-major column pass, reduction. No host sync: score_rows is read on
the device; an out-of-range entry is ignored there (the CPU op raises IndexError).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

try:  # the NVRTC framework (tokenreduce/nvrtc/__init__.py) may be absent in a partial checkout
    from tokenreduce.nvrtc import get_kernel, launch
except ImportError:  # pragma: no cover - exercised only without the framework
    get_kernel = launch = None

# source of the kernels, relative to csrc/ (as tokenreduce/nvrtc/_names.py keys them)
SOURCE = "attention_with_scores/attention_with_scores_kernels.cuh"
NVRTC_OPTIONS = ()  # get_kernel adds -std=c++17 and the CUDA include path

# ---- constants of attention_with_scores_kernels.cuh / attention_with_scores_launch.h
BQ = 64  # query rows per CTA
BK = 64  # keys per tile
DV_CHUNK = 64
THREADS = 256
SCALAR_D_CHUNK = 64
MAX_HEAD_DIM = 256
ROW_PATH_MAX_ROWS = 8
MAX_GRID_YZ = 65535

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


# ---- shared-memory layout (mirrors the __host__ __device__ functions of the .cuh)
def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _dq_width(mma: bool, dh: int) -> int:
    return _round_up(dh, 16) if mma else min(dh, SCALAR_D_CHUNK)


def _q_ld(mma: bool, dh: int) -> int:
    return _dq_width(mma, dh) + (8 if mma else 1)


def _v_ld(mma: bool) -> int:
    return BK + 8 if mma else DV_CHUNK + 1


def _q_tile_bytes(mma, dh, es):
    return _round_up(BQ * _q_ld(mma, dh) * es, 16)


def _kv_tile_bytes(mma, dh, es):
    return _round_up(max(BK * _q_ld(mma, dh), (DV_CHUNK if mma else BK) * _v_ld(mma)) * es, 16)


def _s_bytes(kc, acc_size):
    return _round_up(BQ * (kc + 4) * acc_size, 16)


def _row_bytes(acc_size):
    return _round_up(BQ * (4 * acc_size + 4), 16)


def fwd_smem_bytes(mma: bool, dh: int, es: int, acc_size: int, kc: int) -> int:
    return _q_tile_bytes(mma, dh, es) + _kv_tile_bytes(mma, dh, es) + _s_bytes(kc, acc_size) + _row_bytes(acc_size)


def colscore_smem_bytes(mma: bool, dh: int, es: int, acc_size: int) -> int:
    return fwd_smem_bytes(mma, dh, es, acc_size, BK)


def _sizes(dtype: torch.dtype):
    mma = dtype in (torch.float16, torch.bfloat16)
    es = 2 if mma else (8 if dtype == torch.float64 else 4)
    return mma, es, (8 if dtype == torch.float64 else 4)


def _max_chunk(dtype: torch.dtype, dh: int, budget: int) -> int:
    """Largest multiple of 64 keys whose forward tiles fit in ``budget`` bytes (0: none)."""
    mma, es, acc = _sizes(dtype)
    fixed = fwd_smem_bytes(mma, dh, es, acc, 0) - _s_bytes(0, acc)
    kc = (budget - fixed - 16) // (BQ * acc) - 4
    if kc < BK:
        return 0
    kc = kc // BK * BK
    while kc >= BK and fwd_smem_bytes(mma, dh, es, acc, kc) > budget:
        kc -= BK
    return kc if kc >= BK else 0


@dataclass(frozen=True)
class AttentionPlan:
    kc: int = 0  # keys whose logits stay in shared memory per chunk
    nqb: int = 0  # query blocks (forward grid.x)
    nkt: int = 0  # key tiles (column-score grid.x)
    multi_chunk: bool = False  # Nk > kc: online softmax over chunks, O workspace
    scores_in_fwd: bool = False  # column sums inside the forward kernel
    colscore: bool = False  # column sums by the key-block-major pass from the LSE
    fwd_smem: int = 0
    colscore_smem: int = 0
    partial_rows: int = 0  # P of the partial sums [B, P, Nk]
    need_lse: bool = False
    need_oacc: bool = False
    ok: bool = False


def attention_plan(dtype: torch.dtype, H: int, Nq: int, Nk: int, Dh: int, Dv: int, R: int,
                   smem_optin: int) -> AttentionPlan:
    """The launch plan (mirror of ``make_plan`` in attention_with_scores_launch.cu).

    R: number of score_rows entries, -1 when every row is scored.
    """
    mma, es, acc = _sizes(dtype)
    nqb, nkt = -(-Nq // BQ), -(-Nk // BK)
    kc_max = _max_chunk(dtype, Dh, smem_optin)
    if kc_max == 0 or Dh > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return AttentionPlan(nqb=nqb, nkt=nkt)
    kc_full = _round_up(Nk, BK)
    multi = kc_full > kc_max
    if not multi:
        kc = kc_full
    else:
        kc_half = _max_chunk(dtype, Dh, smem_optin // 2 - 1024)
        kc = kc_half if kc_half >= 256 else kc_max
    row_path = 0 <= R <= ROW_PATH_MAX_ROWS
    in_fwd = not multi and not row_path
    cs_smem = colscore_smem_bytes(mma, Dh, es, acc)
    return AttentionPlan(
        kc=kc, nqb=nqb, nkt=nkt, multi_chunk=multi, scores_in_fwd=in_fwd, colscore=not in_fwd,
        fwd_smem=fwd_smem_bytes(mma, Dh, es, acc, kc), colscore_smem=cs_smem,
        partial_rows=H * nqb if in_fwd else H, need_lse=not in_fwd, need_oacc=multi,
        ok=cs_smem <= smem_optin)


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
    from tokenreduce.nvrtc import max_shared_memory_optin

    return max_shared_memory_optin()


def _fail(msg: str, exc=ValueError):
    raise exc(f"tokenreduce.attention_with_scores: {msg}")


def attention_with_scores_cuda(q, k, v, scale, causal, key_bias, score_rows):
    """NVRTC launch of the CUDA kernels: q [B,H,Nq,Dh], k [B,Hkv,Nk,Dh], v [B,Hkv,Nk,Dv]
    -> out [B,H,Nq,Dv] (dtype of q), scores [B,Nk] (float32; float64 for float64 q).

    Registered by tokenreduce.nvrtc.register_fallbacks as the CUDA kernel of the op when no
    compiled one exists: same checks and messages as csrc/.../attention_with_scores_cuda.cpp.
    """
    if get_kernel is None:
        _fail("the NVRTC fallback needs tokenreduce.nvrtc (CuPy)", RuntimeError)
    from ..ops import _attention_with_scores_fake

    _attention_with_scores_fake(q, k, v, scale, causal, key_bias, score_rows)  # shapes, dtypes, devices
    if q.dtype not in _CTYPE:
        _fail(f"unsupported dtype {q.dtype}", TypeError)
    if key_bias is not None and not key_bias.dtype.is_floating_point:
        _fail(f"key_bias must be a floating tensor (float32, float16, bfloat16 or float64), got {key_bias.dtype}",
              TypeError)
    if score_rows is not None and (score_rows.dim() != 1 or score_rows.numel() == 0):
        _fail(f"score_rows must be a non-empty 1-D tensor of query positions, got shape {list(score_rows.shape)}")
    B, H, Nq, Dh = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not (1 <= Dh <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        _fail(f"the CUDA kernel supports head dims 1..{MAX_HEAD_DIM}, got Dh = {Dh} and Dv = {Dv}")
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        _fail(f"the CUDA kernel supports at most {MAX_GRID_YZ} batch rows and heads, got B = {B}, H = {H}")
    if Nk == 0:
        _fail("k must hold at least one key")
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    np_acc = np.float64 if q.dtype == torch.float64 else np.float32
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, H, Nq, Dv, dtype=q.dtype, device=q.device)
    if B * H * Nq == 0:
        return out, torch.zeros(B, Nk, dtype=acc_dtype, device=q.device)
    scores = torch.empty(B, Nk, dtype=acc_dtype, device=q.device)
    bias = None if key_bias is None else key_bias.to(acc_dtype).contiguous()
    rows = None if score_rows is None else score_rows.contiguous()
    R = -1 if rows is None else rows.numel()

    smem_optin = _smem_optin(q.device)
    plan = attention_plan(q.dtype, H, Nq, Nk, Dh, Dv, R, smem_optin)
    if not plan.ok:
        _fail(f"head dims Dh = {Dh}, Dv = {Dv} do not fit in this GPU's shared memory "
              f"({smem_optin} bytes per block)")
    partial = torch.empty(B, plan.partial_rows, Nk, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=acc_dtype, device=q.device) if plan.need_lse else None
    oacc = torch.empty(B, H, Nq, Dv, dtype=acc_dtype, device=q.device) if plan.need_oacc else None

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
    launch(fwd, (plan.nqb, H, B), (THREADS, 1, 1),
           (q, k, v, *qs, *ks, *vs, bias_arg, rows_arg, Rk, out,
            lse if plan.need_lse else null, oacc if plan.need_oacc else null,
            partial if plan.scores_in_fwd else null,
            i32(H), i32(Hkv), i32(Nq), i32(Nk), i32(Dh), i32(Dv), scale_log2, i32(bool(causal)),
            i32(plan.kc), vqk, vv),
           shared_mem=plan.fwd_smem)
    if plan.colscore:
        cs = get_kernel(SOURCE, names["colscore"], NVRTC_OPTIONS)
        launch(cs, (plan.nkt, H, B), (THREADS, 1, 1),
               (q, k, *qs, *ks, bias_arg, rows_arg, Rk, lse, partial, i32(H), i32(Hkv), i32(Nq),
                i32(Nk), i32(Dh), scale_log2, i32(bool(causal)), vqk),
               shared_mem=plan.colscore_smem)
    r_eff = Nq if rows is None else R
    red = get_kernel(SOURCE, names["reduce"], NVRTC_OPTIONS)
    launch(red, (-(-Nk // THREADS), B, 1), (THREADS, 1, 1),
           (partial, i32(plan.partial_rows), i32(Nk), np_acc(1.0 / (H * r_eff)), scores))
    return out, scores
