"""Host-side tests of the attention_with_scores CUDA kernels (no GPU needed), plus NVRTC
parity tests that run only on a GPU.

* the launch plan the NVRTC fallback uses (tokenreduce/nvrtc/attention_with_scores.py, which
  reads it from the compiled library, tokenreduce._C.plans) is what the C++ planner
  (attention_with_scores_plan.h, compiled here with g++) computes, its constants are the
  .cuh's, and it picks the intended path per shape;
* the device source is NVRTC-clean (only cuda_fp16.h / cuda_bf16.h, no std) and defines the
  kernels the Python side names;
* the mma.sync fragment layout the kernels assume reproduces A @ B^T (lane-level emulation);
* the real device code, compiled with g++ and run on the CPU (256 std::threads per CTA,
  real barriers, emulated shuffles and mma fragments: tests/cpp/attention_host_emulation/),
  matches the reference on every path (in-kernel scores, row path, key chunks, strided rows);
* a numpy emulation of the kernels' tiling (64-row query blocks, 64-key tiles, key chunks
  resident in shared memory, base-2 online softmax with the final rescale, per-block column
  sums, LSE, key-block-major column pass, deterministic reduction) matches the reference.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tokenreduce import reference
from tokenreduce.nvrtc import attention_with_scores as nvrtc_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.join(ROOT, "csrc", "attention_with_scores")
CUH = os.path.join(SRC_DIR, "attention_with_scores_kernels.cuh")
PLAN_H = os.path.join(SRC_DIR, "attention_with_scores_plan.h")
EMU_CC = os.path.join(ROOT, "tests", "cpp", "attention_host_emulation", "attention_with_scores_emu.cc")
H100, A100 = 232448, 166912  # opt-in shared memory per block (bytes)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- source checks
def _read(path):
    with open(path) as f:
        return f.read()


def test_cuh_is_nvrtc_clean_and_defines_the_named_kernels():
    src = _read(CUH)
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', src)
    assert set(includes) == {"cuda_fp16.h", "cuda_bf16.h"}
    assert "std::" not in src and "printf" not in src
    for ctype in nvrtc_attention._CTYPE.values():
        for expr in nvrtc_attention.attention_names(ctype).values():
            name = expr.split("::")[-1].split("<")[0]
            assert re.search(rf"__global__ void __launch_bounds__\(kThreads(, [^)]+)?\) {name}\(", src), name
    assert nvrtc_attention.SOURCE == "attention_with_scores/attention_with_scores_kernels.cuh"
    assert os.path.exists(os.path.join(ROOT, "csrc", nvrtc_attention.SOURCE))


def test_constants_match_the_sources():
    src = _read(CUH) + _read(PLAN_H)

    def const(name):
        m = re.search(rf"constexpr int {name} = (\d+);", src)
        assert m, name
        return int(m.group(1))

    assert const("kBQ") == nvrtc_attention.BQ and const("kBK") == nvrtc_attention.BK and const("kDvChunk") == nvrtc_attention.DV_CHUNK
    assert const("kThreads") == nvrtc_attention.THREADS and const("kScalarDChunk") == nvrtc_attention.SCALAR_D_CHUNK
    assert const("kMaxHeadDim") == nvrtc_attention.MAX_HEAD_DIM and const("kRowPathMaxRows") == nvrtc_attention.ROW_PATH_MAX_ROWS
    assert const("kMaxGridYZ") == nvrtc_attention.MAX_GRID_YZ


# ----------------------------------------------------------------------------- plan
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_PLAN_CASES = [
    (dt, H, Nq, Nk, Dh, Dv, R, smem)
    for dt in _DTYPES
    for (H, Nq, Nk, Dh, Dv) in [(16, 577, 577, 64, 64), (12, 197, 197, 64, 64), (32, 4096, 4096, 128, 128),
                                (4, 33, 5000, 8, 8), (2, 5, 300, 8, 12), (8, 1, 1, 256, 256),
                                (3, 29, 71, 24, 40), (16, 1025, 1025, 80, 80), (1, 64, 832, 64, 64)]
    for R in (-1, 1, 8, 9)
    for smem in (H100, A100)
]
_FIELDS = ["kc", "nqb", "nkt", "multi_chunk", "scores_in_fwd", "colscore", "fwd_smem", "colscore_smem",
           "partial_rows", "need_lse", "need_oacc", "ok"]


@pytest.fixture(scope="module")
def cpp_plans(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not available")
    d = tmp_path_factory.mktemp("plan")
    lines = ["#include <cstdio>", '#include "attention_with_scores_plan.h"', "int main() {",
             "  using namespace tokenreduce::attn;", "  Plan p;"]
    for dt, H, Nq, Nk, Dh, Dv, R, smem in _PLAN_CASES:
        lines.append(f"  p = make_plan({_DTYPES[dt]}, {H}, {Nq}, {Nk}, {Dh}, {Dv}, {R}, {smem});")
        lines.append('  printf("%d %d %d %d %d %d %lld %lld %lld %d %d %d\\n", p.kc, p.nqb, p.nkt, '
                     "(int)p.multi_chunk, (int)p.scores_in_fwd, (int)p.colscore, p.fwd_smem, "
                     "p.colscore_smem, p.partial_rows, (int)p.need_lse, (int)p.need_oacc, (int)p.ok);")
    lines.append("  return 0;\n}")
    (d / "plan.cpp").write_text("\n".join(lines))
    exe = d / "plan"
    subprocess.run([gxx, "-std=c++17", f"-I{SRC_DIR}", str(d / "plan.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    return [list(map(int, line.split())) for line in out if line]


def test_python_plan_matches_cpp_planner(cpp_plans):
    assert len(cpp_plans) == len(_PLAN_CASES)
    for case, got in zip(_PLAN_CASES, cpp_plans):
        p = nvrtc_attention.attention_plan(*case)
        want = [int(getattr(p, f)) for f in _FIELDS]
        assert want == got, (case, dict(zip(_FIELDS, zip(want, got))))


def test_plan_paths():
    # ViT-L/336 in fp16 on H100: all 577 keys resident, scores in the forward kernel
    p = nvrtc_attention.attention_plan(torch.float16, 16, 577, 577, 64, 64, -1, H100)
    assert p.ok and p.kc == 640 and not p.multi_chunk and p.scores_in_fwd and not p.colscore
    assert p.partial_rows == 16 * 10 and p.fwd_smem <= H100 and not p.need_lse and not p.need_oacc
    # [CLS] only: forward writes the LSE, the column pass scores one row
    p = nvrtc_attention.attention_plan(torch.float16, 16, 577, 577, 64, 64, 1, H100)
    assert p.colscore and not p.scores_in_fwd and p.need_lse and p.partial_rows == 16
    # 9 rows: back to in-kernel sums
    assert nvrtc_attention.attention_plan(torch.bfloat16, 16, 577, 577, 64, 64, 9, H100).scores_in_fwd
    # long keys: several chunks, workspace, second pass
    p = nvrtc_attention.attention_plan(torch.float16, 32, 4096, 4096, 128, 128, -1, H100)
    assert p.multi_chunk and p.need_oacc and p.need_lse and p.colscore and p.kc % 64 == 0
    assert p.kc >= 256 and 2 * p.fwd_smem <= H100  # two CTAs per SM
    # fp32 and fp64 (CUDA-core path) and the largest head dims fit both GPUs
    for dt in _DTYPES:
        for smem in (H100, A100):
            p = nvrtc_attention.attention_plan(dt, 8, 100, 3000, 256, 256, -1, smem)
            assert p.ok and p.fwd_smem <= smem and p.colscore_smem <= smem and p.kc >= 64
    assert not nvrtc_attention.attention_plan(torch.float16, 8, 10, 10, 320, 64, -1, H100).ok


# ----------------------------------------------------------------------------- mma fragments
def _acc_row(a, lane, mma):
    return (lane >> 2) + (8 if a & 2 else 0) if mma else (lane >> 3) * 4 + (a >> 2)


def _acc_col(a, lane, mma):
    return (a >> 2) * 8 + 2 * (lane & 3) + (a & 1) if mma else (lane & 7) * 4 + (a & 3)


@pytest.mark.parametrize("mma", [True, False])
def test_accumulator_layout_covers_the_warp_tile(mma):
    seen = {(_acc_row(a, lane, mma), _acc_col(a, lane, mma)) for lane in range(32) for a in range(16)}
    assert seen == {(r, c) for r in range(16) for c in range(32)}


def test_mma_fragment_loads_reproduce_a_times_b_transposed():
    """Emulate warp_qk lane by lane with the PTX m16n8k16 fragment semantics."""
    rng = np.random.default_rng(0)
    dq = 48
    A = rng.standard_normal((16, dq))  # the warp's 16 Q rows
    Bm = rng.standard_normal((32, dq))  # the warp's 32 keys
    acc = np.zeros((32, 16))
    for kk in range(0, dq, 16):
        # registers as warp_qk loads them: (row, col) of the two halves of each 32-bit word
        a_regs = [[(g, kk + 2 * t), (g + 8, kk + 2 * t), (g, kk + 2 * t + 8), (g + 8, kk + 2 * t + 8)]
                  for lane in range(32) for g, t in [(lane >> 2, lane & 3)]]
        for nt in range(4):
            b_regs = [[(nt * 8 + g, kk + 2 * t), (nt * 8 + g, kk + 2 * t + 8)]
                      for lane in range(32) for g, t in [(lane >> 2, lane & 3)]]
            # PTX semantics: A element (row g(+8), k 2t(+1)(+8)) from a0..a3; B element
            # (k 2t(+1)(+8), n g) from b0, b1; C element (row g(+8), col 2t(+1)) in c0..c3.
            Afrag = np.zeros((16, 16))
            Bfrag = np.zeros((16, 8))
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for reg, (ar, ac) in enumerate(a_regs[lane]):
                    for half in range(2):
                        prow = g + (8 if reg in (1, 3) else 0)
                        pcol = 2 * t + half + (8 if reg in (2, 3) else 0)
                        Afrag[prow, pcol] = A[ar, ac + half]
                for reg, (bn, bk) in enumerate(b_regs[lane]):
                    for half in range(2):
                        Bfrag[2 * t + half + 8 * reg, g] = Bm[bn, bk + half]
            C = Afrag @ Bfrag
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for ci in range(4):
                    acc[lane, nt * 4 + ci] += C[g + (8 if ci >= 2 else 0), 2 * t + (ci & 1)]
    want = A @ Bm.T
    for lane in range(32):
        for a in range(16):
            assert np.isclose(acc[lane, a], want[_acc_row(a, lane, True), _acc_col(a, lane, True)])


# ----------------------------------------------------------------------------- tiling emulation
def emulate(q, k, v, scale, causal, bias, rows, kc, row_path_max=nvrtc_attention.ROW_PATH_MAX_ROWS):
    """numpy float64 mirror of attn_fwd_kernel / attn_colscore_kernel / attn_reduce_scores_kernel
    with the same blocking, masks and base-2 arithmetic (kc: keys per resident chunk)."""
    B, H, Nq, Dh = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BQ, BK, DVC = nvrtc_attention.BQ, nvrtc_attention.BK, nvrtc_attention.DV_CHUNK
    sl2 = scale * LOG2E
    nqb, nkt = -(-Nq // BQ), -(-Nk // BK)
    multi = -(-Nk // BK) * BK > kc
    R = -1 if rows is None else len(rows)
    in_fwd = not multi and not (0 <= R <= row_path_max)
    out = np.full((B, H, Nq, Dv), np.nan)
    lse2 = np.full((B, H, Nq), np.nan)
    oacc = np.full((B, H, Nq, Dv), np.nan)
    partial = np.full((B, H * nqb if in_fwd else H, Nk), np.nan)
    off = Nk - Nq
    ninf = -np.inf
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for qb in range(nqb):
                i0 = qb * BQ
                mrows = min(BQ, Nq - i0)
                jend = Nk if not causal else min(max(i0 + mrows + off, 0), Nk)
                nch = -(-jend // kc) if jend > 0 else 1
                m = np.full(BQ, ninf)
                l = np.zeros(BQ)
                cnt = np.zeros(BQ, dtype=np.int64)
                if in_fwd:
                    if rows is None:
                        cnt[:mrows] = 1
                    else:
                        for i in rows:
                            i = i + Nq if i < 0 else i
                            if i0 <= i < i0 + mrows:
                                cnt[i - i0] += 1
                Q = np.zeros((BQ, Dh))
                Q[:mrows] = q[b, h, i0:i0 + mrows]
                ii = i0 + np.arange(BQ)[:, None]
                for ch in range(nch):
                    c0 = ch * kc
                    clen = min(kc, jend - c0)
                    ntiles = -(-clen // BK)
                    cw = ntiles * BK
                    S = np.empty((BQ, cw))
                    for t in range(ntiles):
                        j0 = c0 + t * BK
                        K = np.zeros((BK, Dh))
                        nk = max(min(BK, jend - j0), 0)
                        K[:nk] = k[b, hk, j0:j0 + nk]
                        acc = Q @ K.T
                        jj = j0 + np.arange(BK)[None, :]
                        ok = (ii < Nq) & (jj < jend)
                        if causal:
                            ok &= jj <= ii + off
                        s = acc * sl2
                        if bias is not None:
                            s = s + bias[b, np.minimum(jj, Nk - 1)] * LOG2E
                        S[:, t * BK:(t + 1) * BK] = np.where(ok, s, ninf)
                    mx = S.max(axis=1) if cw else np.full(BQ, ninf)  # NaN propagates like nanmax
                    m_new = np.maximum(m, mx)
                    empty = m_new == ninf
                    with np.errstate(invalid="ignore"):
                        P = np.where(empty[:, None], 0.0, np.exp2(S - m_new[:, None]))
                        corr = np.where(empty, 1.0, np.exp2(m - m_new))
                    l = l * corr + P.sum(axis=1)
                    m = m_new
                    with np.errstate(divide="ignore", invalid="ignore"):
                        w = np.where(cnt == 0, 0.0, np.where(l == 0, 0.0, cnt / l))
                    if in_fwd:
                        col = np.zeros(Nk)
                        for r in range(BQ):  # fixed row order, as the kernel
                            if cnt[r] != 0:
                                col[:clen] += w[r] * P[r, :clen]
                        partial[b, h * nqb + qb] = col
                    last = ch == nch - 1
                    for dv0 in range(0, Dv, DVC):
                        ncols = min(DVC, Dv - dv0)
                        oa = np.zeros((BQ, DVC))
                        if ch > 0:
                            oa[:mrows, :ncols] = oacc[b, h, i0:i0 + mrows, dv0:dv0 + ncols] * corr[:mrows, None]
                        for t in range(ntiles):
                            j0 = c0 + t * BK
                            V = np.zeros((BK, DVC))
                            nk = max(min(BK, jend - j0), 0)
                            V[:nk, :ncols] = v[b, hk, j0:j0 + nk, dv0:dv0 + ncols]
                            oa += P[:, t * BK:(t + 1) * BK] @ V
                        if last:
                            with np.errstate(divide="ignore", invalid="ignore"):
                                inv = np.where(l == 0, 0.0, 1.0 / l)
                            out[b, h, i0:i0 + mrows, dv0:dv0 + ncols] = (oa * inv[:, None])[:mrows, :ncols]
                        else:
                            oacc[b, h, i0:i0 + mrows, dv0:dv0 + ncols] = oa[:mrows, :ncols]
                with np.errstate(divide="ignore"):
                    lse2[b, h, i0:i0 + mrows] = np.where(l == 0, ninf, m + np.log2(l))[:mrows]
    if not in_fwd:  # attn_colscore_kernel
        entries = np.arange(Nq) if rows is None else np.asarray(rows)
        nE = len(entries)
        for b in range(B):
            for h in range(H):
                hk = h // (H // Hkv)
                for kt in range(nkt):
                    j0 = kt * BK
                    K = np.zeros((BK, Dh))
                    nk = min(BK, Nk - j0)
                    K[:nk] = k[b, hk, j0:j0 + nk]
                    colsum = np.zeros(BK)
                    for e0 in range(0, nE, BQ):
                        idx = np.full(BQ, -1)
                        lr = np.full(BQ, ninf)
                        for r in range(BQ):
                            if e0 + r < nE:
                                i = int(entries[e0 + r])
                                i = i + Nq if i < 0 else i
                                if 0 <= i < Nq and lse2[b, h, i] != ninf:
                                    idx[r], lr[r] = i, lse2[b, h, i]
                        sees = (idx >= 0) & (~causal | (j0 <= idx + off))
                        if not sees.any():
                            continue
                        Qg = np.where(idx[:, None] >= 0, q[b, h, np.maximum(idx, 0)], 0.0)
                        s = (Qg @ K.T) * sl2
                        jj = j0 + np.arange(BK)[None, :]
                        if bias is not None:
                            s = s + bias[b, np.minimum(jj, Nk - 1)] * LOG2E
                        ok = (idx[:, None] >= 0) & (jj < Nk)
                        if causal:
                            ok &= jj <= idx[:, None] + off
                        with np.errstate(invalid="ignore", over="ignore"):
                            p = np.where(ok, np.exp2(s - lr[:, None]), 0.0)
                        for r in range(BQ):
                            colsum += p[r]
                    partial[b, h, j0:j0 + nk] = colsum[:nk]
    r_eff = Nq if rows is None else len(rows)
    scores = partial.sum(axis=1) * (1.0 / (H * r_eff))
    return out, scores, lse2


def _inputs(seed, B, H, Hkv, Nq, Nk, Dh, Dv):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, Dh, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64)
    return q, k, v


def _check_emulation(q, k, v, *, scale, causal, bias, rows, kc):
    out, scores, _ = emulate(q.numpy(), k.numpy(), v.numpy(), scale, causal,
                             None if bias is None else bias.numpy(), rows, kc)
    rrows = None if rows is None else torch.tensor(rows)
    rout, rscores = reference.attention_with_scores(q, k, v, scale=scale, causal=causal, key_bias=bias,
                                                    score_rows=rrows)
    torch.testing.assert_close(torch.from_numpy(out), rout, atol=1e-12, rtol=1e-10, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(scores), rscores, atol=1e-12, rtol=1e-10, equal_nan=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rows", [None, [-1, 3, 3], list(range(0, 70, 3)) + [-2]])
@pytest.mark.parametrize("kc", [64, 192])  # 192 keys fit one chunk; 64: online softmax over 3 chunks
def test_emulation_matches_reference(causal, rows, kc):
    B, H, Hkv, Nq, Nk, Dh, Dv = 2, 4, 2, 70, 131, 24, 72
    q, k, v = _inputs(1, B, H, Hkv, Nq, Nk, Dh, Dv)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(B, Nk, generator=g, dtype=torch.float64)
    bias[0, 5] = -torch.inf
    _check_emulation(q, k, v, scale=0.3, causal=causal, bias=bias, rows=rows, kc=kc)


@pytest.mark.parametrize("kc", [64, 128])
def test_emulation_empty_rows(kc):
    """causal with Nq > Nk (leading rows see no key) and a batch row whose keys are all -inf."""
    B, H, Nq, Nk, D = 2, 2, 90, 40, 8
    q, k, v = _inputs(3, B, H, H, Nq, Nk, D, D)
    bias = torch.zeros(B, Nk, dtype=torch.float64)
    bias[1] = -torch.inf
    for rows in (None, [0, 60, -1], list(range(0, 90, 7))):
        _check_emulation(q, k, v, scale=D**-0.5, causal=True, bias=bias, rows=rows, kc=kc)


def test_emulation_nan_propagates():
    q, k, v = _inputs(4, 1, 2, 1, 10, 100, 8, 8)
    q[0, 1, 3, 2] = torch.nan
    for rows, kc in ((None, 128), ([3], 128), (None, 64)):
        out, scores, _ = emulate(q.numpy(), k.numpy(), v.numpy(), 0.5, False, None, rows, kc)
        assert np.isnan(out[0, 1, 3]).all() and not np.isnan(out[0, 0]).any()
        assert np.isnan(scores).all()


def test_emulation_lse_is_base2_log_sum_exp():
    q, k, v = _inputs(5, 1, 3, 3, 20, 150, 16, 16)
    _, _, lse2 = emulate(q.numpy(), k.numpy(), v.numpy(), 0.25, False, None, [0], 64)
    want = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1) * LOG2E
    torch.testing.assert_close(torch.from_numpy(lse2), want, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- device code on the CPU
def _cuda_include():
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "include", "cuda_fp16.h")):
            return os.path.join(d, "include")
    return None


@pytest.fixture(scope="module")
def emu_exe(tmp_path_factory):
    gxx, inc = shutil.which("g++"), _cuda_include()
    if gxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    exe = tmp_path_factory.mktemp("emu") / "attn_emu"
    subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", f"-I{inc}", f"-I{SRC_DIR}", EMU_CC, "-o", str(exe)],
                   check=True)
    return str(exe)


def _run_emu(exe, tmp_path, dtype, B, H, Hkv, Nq, Nk, Dh, Dv, causal, rows, smem=H100, pad=0, nan=False):
    g = torch.Generator().manual_seed(B * 1000 + Nq * 10 + Nk)
    q = torch.randn(B, H, Nq, Dh, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Nk, Dh, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(B, Nk, generator=g, dtype=torch.float64)
    bias[0, 3] = -torch.inf
    if nan:
        q[0, 0, 1, 0] = torch.nan
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        t.double().numpy().tofile(tmp_path / f"{name}.bin")
    R = -1 if rows is None else len(rows)
    if rows is not None:
        np.asarray(rows, dtype=np.float64).tofile(tmp_path / "rows.bin")
    scale = Dh**-0.5
    args = [exe, str(_DTYPES[dtype]), *map(str, (B, H, Hkv, Nq, Nk, Dh, Dv, int(causal), 1)), repr(scale), str(R),
            str(smem), str(pad), str(tmp_path)]
    info = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin")).reshape(B, H, Nq, Dv)
    scores = torch.from_numpy(np.fromfile(tmp_path / "scores.bin")).reshape(B, Nk)
    rout, rscores = reference.attention_with_scores(
        q, k, v, scale=scale, causal=causal, key_bias=bias, score_rows=None if rows is None else torch.tensor(rows))
    return info, out, scores, rout.double(), rscores.double()


_EMU_CASES = {
    # in-kernel column sums, tensor cores, grouped KV heads, causal, partial last query block
    "f16-fwd-scores": (torch.float16, 1, 2, 1, 70, 131, 24, 40, True, None, H100, 0, "in_fwd=1"),
    # row path ([CLS]-like, negative and repeated rows) + key chunks with online softmax
    "bf16-rows-chunks": (torch.bfloat16, 1, 1, 1, 40, 200, 16, 72, True, [0, -1, 7, 7], 50000, 0, "multi=1"),
    # CUDA-core path, strided rows (no 16-byte loads), Nq > Nk causal: leading rows empty
    "f32-strided-empty": (torch.float32, 1, 1, 1, 90, 40, 20, 12, True, None, H100, 3, "vqk=0"),
    # float64, many scored rows in the forward kernel, two batch rows
    "f64-rows": (torch.float64, 2, 2, 2, 30, 70, 8, 8, False, list(range(0, 30, 3)), H100, 0, "in_fwd=1"),
}
_EMU_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float64: dict(atol=1e-10, rtol=1e-9)}


@pytest.mark.parametrize("case", list(_EMU_CASES))
def test_device_code_on_cpu_matches_reference(emu_exe, tmp_path, case):
    *args, path = _EMU_CASES[case]
    info, out, scores, rout, rscores = _run_emu(emu_exe, tmp_path, *args)
    assert path in info, info
    torch.testing.assert_close(out, rout, **_EMU_TOL[args[0]])
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-4)


def test_device_code_on_cpu_propagates_nan(emu_exe, tmp_path):
    _, out, scores, rout, rscores = _run_emu(emu_exe, tmp_path, torch.float32, 1, 1, 1, 20, 30, 8, 8, False, None,
                                             nan=True)
    assert torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, 0]).any()
    torch.testing.assert_close(out, rout, atol=2e-5, rtol=1e-4, equal_nan=True)
    assert torch.isnan(scores).all() and torch.isnan(rscores).all()


# ----------------------------------------------------------------------------- GPU (NVRTC)
def _gpu_ready():
    if not torch.cuda.is_available():
        return False
    try:
        from tokenreduce.nvrtc import get_kernel  # noqa: F401
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and tokenreduce.nvrtc (CuPy)")
_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float64: dict(atol=1e-10, rtol=1e-9)}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 131, 24, 40), (1, 16, 16, 577, 577, 64, 64), (2, 3, 1, 40, 100, 10, 6),
                                   (2, 2, 1, 33, 3000, 72, 8), (1, 3, 3, 5, 9, 256, 200)])
@pytest.mark.parametrize("rows", [None, [0], [-1, 3, 3], list(range(0, 30, 3))])
@pytest.mark.parametrize("causal", [False, True])
def test_nvrtc_matches_reference(dtype, shape, rows, causal):
    B, H, Hkv, Nq, Nk, Dh, Dv = shape
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, Nq, Dh, generator=g).to(dtype).cuda()
    k = torch.randn(B, Hkv, Nk, Dh, generator=g).to(dtype).cuda()
    v = torch.randn(B, Hkv, Nk, Dv, generator=g).to(dtype).cuda()
    bias = torch.randn(B, Nk, generator=g).cuda()
    rows_t = None if rows is None else torch.tensor([r for r in rows if -Nq <= r < Nq] or [0]).cuda()
    out, scores = nvrtc_attention.attention_with_scores_cuda(q, k, v, Dh**-0.5, causal, bias, rows_t)
    rout, rscores = reference.attention_with_scores(q, k, v, causal=causal, key_bias=bias, score_rows=rows_t)
    torch.testing.assert_close(out, rout, **_TOL[dtype])
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-4)


@gpu
def test_nvrtc_strided_inputs_and_empty_rows():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 90, 3, 4, 32, generator=g).half().cuda()  # [B, N, qkv, H, Dh] as in a ViT
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    k, v = k[:, :, :40], v[:, :, :40]  # Nq = 90 > Nk = 40: causal leaves rows empty
    out, scores = nvrtc_attention.attention_with_scores_cuda(q, k, v, 32**-0.5, True, None, None)
    rout, rscores = reference.attention_with_scores(q, k, v, causal=True)
    torch.testing.assert_close(out, rout, **_TOL[torch.float16])
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-4)
