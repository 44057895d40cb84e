"""attention_with_scores in Triton: a flash-attention forward plus a key-block-major score pass.

Same contract as `tokenreduce.ops.attention_with_scores` (q [B, H, Nq, Dh], k [B, Hkv, Nk, Dh],
v [B, Hkv, Nk, Dv] -> out [B, H, Nq, Dv] in q's dtype, scores float32 [B, Nk]).

Two kernels, no [B, H, Nq, Nk] buffer, no atomics, deterministic:

1. `_flash_fwd`: one program per (query block, b * H + h). Online softmax over key blocks in
   base 2 (``qk_scale = scale * log2(e)``, the key bias multiplied by log2(e)), ``tl.dot`` for
   Q K^T and P V, fp32 accumulation. Writes O and the row log-sum-exp in base 2,
   ``lse2 = log2(sum_j 2^(s2_j))``, float32 [B, H, Nq]; ``-inf`` for a row with no admissible key
   (its output is 0).
2. `_column_scores`: one program per (key block, b, head split). For every head of its split and
   every scored query row it recomputes ``s2 = q.k * qk_scale + bias2`` and accumulates the exact
   probabilities ``p = 2^(s2 - lse2)`` (the final normaliser, not the running one: no rescale
   pitfall) in a [BLOCK_R, BLOCK_N] register tile, reduced over rows once at the end. Rows are
   either ``arange(Nq)`` (all rows scored; causal skips the rows that cannot see the block) or
   the gathered ``score_rows`` (negatives wrapped in the kernel, repeats counted), so [CLS] /
   last-token scores cost one GEMV over K per head. Head splits (to fill the GPU at small B)
   write float32 partials [B, S, Nk] summed afterwards in a fixed order; with one split the
   kernel writes the scores directly. Each row counts 1 / (H * R), R = rows listed (as the
   reference: a row with no admissible key adds 0 but still counts in the mean).

Why no fused single pass: exact column sums need each row's final LSE before its probabilities
are summed across rows, so a one-kernel variant either keeps the row block's whole P resident
(not expressible in Triton for Nk in the hundreds: no addressable shared memory) or runs two
passes over the keys inside the program, which costs the same Q K^T and exp work as the two
kernels here. A CUDA kernel can keep P in shared memory (short sequences);
the race (`bench/race_attention.py`) picks the faster backend per architecture.

CPU tensors run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported in the process (triton wraps its own library functions at import), so
the tests run these kernels in a subprocess. The interpreter cannot run ``tl.dot`` on bfloat16
(numpy has no bfloat16), so there bfloat16 tiles are upcast to float32 before the dot
(``DOT_FP32``); on the GPU the dot runs on bfloat16 tensor cores. float32 inputs use
``input_precision="ieee"`` (no TF32), as the native kernel computes in full float32.

Why one module of ~460 lines: the two kernels, their launch configuration and the wrapper share
the block-size and flag conventions line by line; split apart, each part would be unreadable
without the others.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import triton
import triton.language as tl
from triton import knobs

from ..errors import fail
from ..ops.checks import rows_on_device

__all__ = ["attention_with_scores", "flash_forward"]

_OP = "attention_with_scores"
# how @triton.jit below wraps the kernels (decided now; triton's own library functions were
# wrapped the same way when triton was first imported)
_INTERPRET = bool(knobs.runtime.interpret)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreter_scalar_index_fix() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound (``range(0, hi, BLOCK_N)``) into a
    Python int with ``int(array of shape (1,))``, a TypeError under numpy >= 2.5 ("only
    0-dimensional arrays can be converted to Python scalars"); later Triton releases use
    ``int(data.squeeze())``. Install that upstream form for every interpreted launch (a no-op
    change of semantics where Triton already has it; the compiled GPU path is untouched)."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "tokenreduce_index_fix", False):
        return

    def patch_with_squeeze(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_with_squeeze.tokenreduce_index_fix = True
    interpreter._patch_lang_tensor = patch_with_squeeze


if _INTERPRET:
    _interpreter_scalar_index_fix()


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _flash_fwd(
    Q, K, V, Bias, O, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbn,
    sob, soh, som, sod,
    H, Nq, Nk, Dh, Dv, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < Nq
    d_mask = offs_d < Dh
    dv_mask = offs_dv < Dv

    q_ptrs = Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    off = Nk - Nq  # bottom-right causal: row i sees keys j <= i + off
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(pid_m * BLOCK_M + BLOCK_M + off, 0))
    for j0 in range(0, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Nk
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        if HAS_BIAS:
            bias = tl.load(Bias + b.to(tl.int64) * sbb + offs_n * sbn, mask=n_mask, other=0.0)
            s = s + bias.to(tl.float32)[None, :] * 1.4426950408889634
        ok = n_mask[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + off)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: p = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    has = l_i != 0.0  # False only with no admissible key; NaN stays NaN as in eager attention
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse2, mask=m_mask)


@triton.jit
def _column_scores(
    Q, K, Bias, LSE, Rows, Part,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    sbb, sbn,
    spb, sps,
    H, Nq, Nk, Dh, R, heads_per_split, qk_scale, row_weight,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS_ARANGE: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < Nk
    d_mask = offs_d < Dh
    if HAS_BIAS:
        bias2 = tl.load(Bias + b.to(tl.int64) * sbb + offs_n * sbn, mask=n_mask, other=0.0)
        bias2 = bias2.to(tl.float32) * 1.4426950408889634
    off = Nk - Nq
    r_start = 0
    if CAUSAL and ROWS_ARANGE:  # rows i < j0 - off see none of this block's keys
        r_start = (tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_R) * BLOCK_R
    h0 = split * heads_per_split
    h1 = tl.minimum(h0 + heads_per_split, H)
    col = tl.full([BLOCK_R, BLOCK_N], 0.0, tl.float32)  # reduced over rows once, at the end
    for h in range(h0, h1):
        hk = h // GROUP
        kt = tl.load(K + b.to(tl.int64) * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        lse_base = LSE + (b.to(tl.int64) * H + h) * Nq
        for r0 in range(r_start, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            if ROWS_ARANGE:
                rows = offs_r
            else:
                rows = tl.load(Rows + offs_r, mask=r_mask, other=0)
                rows = tl.where(rows < 0, rows + Nq, rows)  # negatives count from the end
            q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=r_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
            lse = tl.load(lse_base + rows, mask=r_mask, other=float("-inf"))
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            if HAS_BIAS:
                s = s + bias2[None, :]
            live = lse != float("-inf")  # rows with no admissible key add nothing (NaN propagates)
            ok = n_mask[None, :] & live[:, None]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= rows[:, None] + off)
            p = tl.exp2(s - tl.where(live, lse, 0.0)[:, None])
            col += tl.where(ok, p, 0.0)
    tl.store(Part + b.to(tl.int64) * spb + split * sps + offs_n, tl.sum(col, 0) * row_weight, mask=n_mask)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------

_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _default_config(q: Tensor, Nq: int, Nk: int, Dh: int, Dv: int, R: int, interpret: bool) -> dict:
    """Block sizes per shape. GPU values are untuned starting points (the race script sweeps)."""
    if interpret:  # small tiles: the tests exercise several blocks and partial tails at N <= 65
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_R=16 if R <= 16 else 32, SCORE_BLOCK_N=32,
                    fwd_warps=4, fwd_stages=1, score_warps=4, score_stages=1, head_splits=None)
    big_d = max(Dh, Dv) > 64
    if q.dtype == torch.float32:  # fp32 tiles take twice the shared memory
        return dict(BLOCK_M=64, BLOCK_N=32 if big_d else 64, BLOCK_R=16 if R <= 16 else 32,
                    SCORE_BLOCK_N=64, fwd_warps=4, fwd_stages=2, score_warps=4, score_stages=2,
                    head_splits=None)
    # bf16/fp16: chosen without spills in ptxas (bench/triton_compile_check.py, sm_80 and sm_90);
    # the GPU race's --sweep is the judge of speed
    return dict(
        BLOCK_M=128 if Nq >= 128 and not big_d else 64,
        BLOCK_N=64,
        BLOCK_R=16 if R <= 16 else 64,
        SCORE_BLOCK_N=64,
        fwd_warps=8,
        fwd_stages=2 if big_d else 3,
        score_warps=4 if R <= 16 else 8,
        score_stages=2,
        head_splits=None,  # None: enough (key block, b, split) programs to fill the device twice
    )


def _check(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor], score_rows: Optional[Tensor]):
    for name, t, shape in (("q", q, "[B, H, Nq, Dh]"), ("k", k, "[B, Hkv, Nk, Dh]"), ("v", v, "[B, Hkv, Nk, Dv]")):
        if not isinstance(t, Tensor):
            fail(_OP, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.dim() != 4:
            fail(_OP, f"{name} must have shape {shape} (4 dims), got {tuple(t.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(_OP, f"the triton backend takes float32, float16 or bfloat16 q, got {q.dtype} "
              f"(use backend='native' for float64)", TypeError)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(_OP, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}", TypeError)
    for name, t in (("k", k), ("v", v), ("key_bias", key_bias), ("score_rows", score_rows)):
        if isinstance(t, Tensor) and t.device != q.device:
            fail(_OP, f"{name} is on {t.device} but the input is on {q.device}")
    B, H, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        fail(_OP, f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != Dh:
        fail(_OP, f"k's head dim {k.shape[3]} differs from q's {Dh}")
    if v.shape[1] != Hkv or v.shape[2] != Nk:
        fail(_OP, f"v {tuple(v.shape)} must match k {tuple(k.shape)} in heads and keys")
    if Hkv == 0 or H % Hkv != 0:
        fail(_OP, f"q's heads ({H}) must be a multiple of k's heads ({Hkv})")
    if Nk == 0:
        fail(_OP, "k must hold at least one key")
    if key_bias is not None:
        if not key_bias.dtype.is_floating_point:
            fail(_OP, f"key_bias must be a floating tensor, got {key_bias.dtype}", TypeError)
        if tuple(key_bias.shape) != (B, Nk):
            fail(_OP, f"key_bias must have shape [B, Nk] = [{B}, {Nk}], got {tuple(key_bias.shape)}")
    if isinstance(score_rows, Tensor):
        _check_rows(score_rows)


def _check_rows(score_rows: Tensor):
    if score_rows.dtype != torch.long:
        fail(_OP, f"score_rows must be an int64 tensor, got {score_rows.dtype}", TypeError)
    if score_rows.dim() != 1 or score_rows.numel() == 0:
        fail(_OP, f"score_rows must be a non-empty 1-D tensor of query positions, got shape "
              f"{tuple(score_rows.shape)}")


def _interpret_for(device: torch.device) -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    if _INTERPRET:
        return True
    if device.type != "cuda":
        fail(_OP, f"the triton backend runs CUDA tensors; a tensor on {device} needs the Triton "
              f"interpreter (set TRITON_INTERPRET=1 before triton is first imported)", RuntimeError)
    return False


def _rows_tensor(score_rows, Nq: int, device: torch.device) -> Tensor:
    """score_rows as an int64 tensor on `device`; out-of-range positions raise (host data) or fail
    a device-side assertion (CUDA tensors: no host sync). Negatives are wrapped in the kernel."""
    if not isinstance(score_rows, Tensor):  # ints: checked on the host, built on the device (no copy)
        return rows_on_device(_OP, score_rows, Nq, device)
    if score_rows.device.type == "cpu":  # the data is already on the host: check it eagerly
        bad = (score_rows < -Nq) | (score_rows >= Nq)
        if bool(bad.any()):
            e = int(bad.to(torch.uint8).argmax())
            fail(_OP, f"score_rows[{e}] = {int(score_rows[e])} is out of range for Nq = {Nq}", IndexError)
    else:
        torch._assert_async(((score_rows >= -Nq) & (score_rows < Nq)).all(),
                            f"tokenreduce.{_OP}: score_rows out of range for Nq = {Nq}")
    return score_rows.contiguous()


def flash_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, causal: bool = False,
                  key_bias: Optional[Tensor] = None, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """The forward alone: out [B, H, Nq, Dv] (q's dtype) and the natural-log LSE float32 [B, H, Nq]
    (``-inf`` for rows with no admissible key)."""
    _check(q, k, v, key_bias, None)
    out, lse2, _ = _forward(q, k, v, scale, causal, key_bias, 0, config)
    return out, lse2 * _LN2


def _forward(q, k, v, scale, causal, key_bias, R, config):
    B, H, Nq, Dh = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    interpret = _interpret_for(q.device)
    cfg = _default_config(q, Nq, Nk, Dh, Dv, R, interpret)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            fail(_OP, f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    scale = Dh ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    bias = key_bias if key_bias is not None else lse2  # a dummy pointer when HAS_BIAS is False
    sbb, sbn = (key_bias.stride(0), key_bias.stride(1)) if key_bias is not None else (0, 0)
    flags = dict(
        GROUP=H // Hkv, CAUSAL=bool(causal), HAS_BIAS=key_bias is not None,
        DOT_FP32=interpret and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
    )
    if B * H * Nq > 0:
        grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
        _flash_fwd[grid](
            q, k, v, bias, out, lse2,
            *q.stride(), *k.stride(), *v.stride(), sbb, sbn, *out.stride(),
            H, Nq, Nk, Dh, Dv, scale * _LOG2E,
            **flags,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=max(16, triton.next_power_of_2(Dh)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
            num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
        )
    return out, lse2, (cfg, flags, scale, bias, sbb, sbn, interpret)


def attention_with_scores(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_bias: Optional[Tensor] = None,
    score_rows: Optional[Union[Tensor, Sequence[int], int]] = None,
    config: Optional[dict] = None,
) -> Tuple[Tensor, Tensor]:
    """Exact softmax attention plus the attention each key receives (Triton backend).

    Same arguments and results as `tokenreduce.ops.attention_with_scores`: out [B, H, Nq, Dv]
    in q's dtype, scores float32 [B, Nk] (head- and row-mean of the probabilities; scored rows
    with no admissible key add 0 but still count in the mean). float32 / float16 / bfloat16,
    any strides. ``config`` overrides block sizes (see `_default_config`; for benchmarks).
    Forward only: with inputs that require grad, backward raises (as the native op).
    """
    _check(q, k, v, key_bias, score_rows)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, key_bias)):
        return _ForwardOnly.apply(
            lambda: _attention(q, k, v, scale, causal, key_bias, score_rows, config), q, k, v, key_bias)
    return _attention(q, k, v, scale, causal, key_bias, score_rows, config)


class _ForwardOnly(torch.autograd.Function):
    """Connects the outputs to the inputs so that a backward raises instead of dropping grads."""

    @staticmethod
    def forward(ctx, run, *inputs):
        return run()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"tokenreduce.{_OP}: the op is forward-only (no backward); "
            "train with torch.nn.functional.scaled_dot_product_attention")


def _attention(q, k, v, scale, causal, key_bias, score_rows, config):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    rows = None if score_rows is None else _rows_tensor(score_rows, Nq, q.device)
    R = Nq if rows is None else rows.numel()
    out, lse2, (cfg, flags, scale, bias, sbb, sbn, interpret) = _forward(
        q, k, v, scale, causal, key_bias, R, config)
    if B * H * Nq == 0:
        return out, torch.zeros((B, Nk), dtype=torch.float32, device=q.device)
    if rows is None:
        rows = lse2  # a dummy pointer: the kernel walks arange(Nq)

    BN = cfg["SCORE_BLOCK_N"]
    n_blocks = triton.cdiv(Nk, BN)
    splits = cfg["head_splits"]
    if splits is None:
        splits = 1 if interpret else max(1, min(H, triton.cdiv(2 * _sm_count(q.device), n_blocks * B)))
    heads_per_split = triton.cdiv(H, max(1, min(int(splits), H)))
    splits = triton.cdiv(H, heads_per_split)
    if splits == 1:
        part = torch.empty((B, 1, Nk), dtype=torch.float32, device=q.device)
    else:
        part = torch.empty((B, splits, Nk), dtype=torch.float32, device=q.device)
    _column_scores[(n_blocks, B, splits)](
        q, k, bias, lse2, rows, part,
        *q.stride(), *k.stride(), sbb, sbn, part.stride(0), part.stride(1),
        H, Nq, Nk, Dh, R, heads_per_split, scale * _LOG2E, 1.0 / (H * R),
        ROWS_ARANGE=score_rows is None, **flags,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_N=BN, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
        num_warps=cfg["score_warps"], num_stages=cfg["score_stages"],
    )
    scores = part[:, 0] if splits == 1 else part.sum(1)
    return out, scores
