import pytest
import torch

from tokenreduce import ops, reference
from conftest import DTYPES, TOL, randn


def inputs(gen, B, Hq, Wq, s, L, C, Cv, dtype=torch.float32):
    q = randn(gen, B, Hq * Wq, C, dtype=dtype)
    k = randn(gen, B, L, Hq * s * Wq * s, C, dtype=dtype)
    v = randn(gen, B, L, Hq * s * Wq * s, Cv, dtype=dtype)
    return q, k, v


def naive(q, k, v, grid, region, heads, scale):
    """Loop over the queries and gather each window: the definition, in float64."""
    Hq, Wq = grid
    B, M, C = q.shape
    L, Cv = k.shape[1], v.shape[3]
    W = region * Wq
    out = torch.zeros(B, M, Cv, dtype=torch.float64)
    for i in range(Hq):
        for j in range(Wq):
            idx = [(i * region + a) * W + j * region + c for a in range(region) for c in range(region)]
            kk = k[:, :, idx].double().reshape(B, L * region * region, heads, C // heads)
            vv = v[:, :, idx].double().reshape(B, L * region * region, heads, Cv // heads)
            qq = q[:, i * Wq + j].double().reshape(B, heads, C // heads)
            p = (torch.einsum("bhd,brhd->bhr", qq, kk) * scale).softmax(-1)
            out[:, i * Wq + j] = torch.einsum("bhr,brhe->bhe", p, vv).reshape(B, Cv)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Wq,s,L,C,Cv,heads", [
    (1, 1, 1, 1, 1, 1, 1, 1),
    (2, 3, 5, 2, 1, 12, 12, 3),
    (3, 4, 3, 3, 2, 10, 6, 2),
    (2, 12, 12, 2, 1, 64, 64, 8),      # TokenPacker 576 -> 144 (scaled-down channels)
    (1, 8, 8, 3, 4, 32, 48, 4),        # 576 -> 64, four levels
    (2, 2, 7, 4, 3, 7, 5, 1),          # odd sizes
])
def test_matches_reference(gen, dtype, B, Hq, Wq, s, L, C, Cv, heads):
    q, k, v = inputs(gen, B, Hq, Wq, s, L, C, Cv, dtype)
    out, lse = ops.region_attention(q, k, v, (Hq, Wq), region=s, heads=heads, return_lse=True)
    rout, rlse = reference.region_attention(q, k, v, (Hq, Wq), region=s, heads=heads, return_lse=True)
    assert out.shape == (B, Hq * Wq, Cv) and out.dtype == dtype
    assert lse.shape == (B, Hq * Wq, heads) and lse.dtype == torch.float32
    torch.testing.assert_close(out, rout, **TOL[dtype])
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), naive(q, k, v, (Hq, Wq), s, heads, (C // heads) ** -0.5),
                                   atol=2e-5, rtol=1e-4)


def test_float64_and_scale(gen):
    q, k, v = inputs(gen, 2, 3, 4, 2, 2, 8, 6, torch.float64)
    out, lse = ops.region_attention(q, k, v, [3, 4], region=2, heads=2, scale=0.7, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, reference.region_attention(q, k, v, (3, 4), region=2, heads=2, scale=0.7),
                               **TOL[torch.float64])
    torch.testing.assert_close(out, naive(q, k, v, (3, 4), 2, 2, 0.7), **TOL[torch.float64])


def test_strided_inputs(gen):
    """Non-contiguous q, k, v (views of larger tensors, transposed level axis)."""
    B, Hq, Wq, s, L, C = 2, 3, 3, 2, 2, 8
    N = Hq * s * Wq * s
    q = randn(gen, Hq * Wq, B, C + 4)[..., :C].transpose(0, 1)
    k = randn(gen, B, N, L, C).transpose(1, 2)
    v = randn(gen, B, L, N, 2 * C)[..., ::2]
    out = ops.region_attention(q, k, v, (Hq, Wq), region=s, heads=2)
    ref = reference.region_attention(q.contiguous(), k.contiguous(), v.contiguous(), (Hq, Wq), region=s, heads=2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_matches_torch_multihead_attention_on_windows(gen):
    """TokenPacker's released formulation: nn.MultiheadAttention over (query, window) batches."""
    B, Hq, Wq, s, C, heads = 2, 4, 4, 2, 16, 4
    q, k, v = inputs(gen, B, Hq, Wq, s, 1, C, C)
    mha = torch.nn.MultiheadAttention(C, heads, bias=False)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(C).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(C))
    kw = k.reshape(B, Hq, s, Wq, s, C).permute(2, 4, 1, 3, 0, 5).reshape(s * s, Hq * Wq * B, C)
    vw = v.reshape(B, Hq, s, Wq, s, C).permute(2, 4, 1, 3, 0, 5).reshape(s * s, Hq * Wq * B, C)
    qw = q.permute(1, 0, 2).reshape(1, Hq * Wq * B, C)
    with torch.no_grad():
        want = mha(qw, kw, vw)[0].reshape(Hq * Wq, B, C).permute(1, 0, 2)
    torch.testing.assert_close(ops.region_attention(q, k, v, (Hq, Wq), region=s, heads=heads), want,
                               atol=1e-5, rtol=1e-4)


def test_empty_batch_and_grid(gen):
    q, k, v = inputs(gen, 0, 2, 2, 2, 1, 4, 4)
    assert ops.region_attention(q, k, v, (2, 2), region=2).shape == (0, 4, 4)
    q, k, v = inputs(gen, 2, 0, 3, 2, 1, 4, 4)
    assert ops.region_attention(q, k, v, (0, 3), region=2).shape == (2, 0, 4)


def test_gradcheck(gen):
    q, k, v = (t.requires_grad_() for t in inputs(gen, 2, 2, 3, 2, 2, 6, 4, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.region_attention(q, k, v, (2, 3), region=2, heads=2),
                                    (q, k, v))
    # through the log-sum-exp too
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.cat([t.flatten() for t in
                                   ops.region_attention(q, k, v, (2, 3), region=2, heads=2, return_lse=True)]),
        (q, k, v))


def test_gradients_match_reference(gen):
    q, k, v = inputs(gen, 2, 3, 3, 3, 2, 8, 12)
    g = randn(gen, 2, 9, 12)
    grads = []
    for fn in (ops.region_attention, reference.region_attention):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv, (3, 3), region=3, heads=4) * g).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # only the inputs that need it
    kk = k.clone().requires_grad_()
    (ops.region_attention(q, kk, v, (3, 3), region=3, heads=4) * g).sum().backward()
    torch.testing.assert_close(kk.grad, grads[0][1], atol=1e-5, rtol=1e-4)


def test_half_gradients_have_input_dtype(gen):
    q, k, v = (t.requires_grad_() for t in inputs(gen, 1, 2, 2, 2, 1, 8, 8, torch.bfloat16))
    ops.region_attention(q, k, v, (2, 2), region=2, heads=2).float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16


def test_fake_and_compile(gen):
    q, k, v = inputs(gen, 2, 3, 3, 2, 2, 8, 8)
    torch.library.opcheck(torch.ops.tokenreduce.region_attention.default, (q, k, v, 3, 3, 2, 2, 0.5))
    m = torch.empty(3, 6, 16, device="meta")
    mk = torch.empty(3, 2, 24, 16, device="meta")
    o, lse = ops.region_attention(m, mk, mk, (2, 3), region=2, heads=4, return_lse=True)
    assert o.shape == (3, 6, 16) and lse.shape == (3, 6, 4) and lse.dtype == torch.float32

    def f(q, k, v):
        return ops.region_attention(q, k, v, (3, 3), region=2, heads=2).square().sum()

    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    eager = torch.autograd.grad(f(qq, kk, vv), (qq, kk, vv))
    compiled = torch.compile(f, fullgraph=True)
    comp = torch.autograd.grad(compiled(qq, kk, vv), (qq, kk, vv))
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)


def test_special_values(gen):
    q, k, v = inputs(gen, 1, 2, 2, 2, 1, 4, 4)
    k[0, 0, 0, 0] = float("nan")
    out = ops.region_attention(q, k, v, (2, 2), region=2)
    assert out[0, 0].isnan().all() and not out[0, 1:].isnan().any()  # NaN stays in its window
    q2, k2, v2 = inputs(gen, 1, 2, 2, 2, 1, 4, 4)
    q2 *= 1e4  # large logits: still a stable softmax
    out = ops.region_attention(q2, k2, v2, (2, 2), region=2)
    assert out.isfinite().all()
    torch.testing.assert_close(out, reference.region_attention(q2, k2, v2, (2, 2), region=2))


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: ops.region_attention(q[0], k, v, (2, 2), region=2), ValueError, "q must have shape"),
    (lambda q, k, v: ops.region_attention(q, k[0], v, (2, 2), region=2), ValueError, "k must have shape"),
    (lambda q, k, v: ops.region_attention(q, k, v[0], (2, 2), region=2), ValueError, "v must have shape"),
    (lambda q, k, v: ops.region_attention(q.long(), k.long(), v.long(), (2, 2), region=2, scale=1.0), TypeError,
     "q must be a floating tensor"),
    (lambda q, k, v: ops.region_attention(q, k.double(), v, (2, 2), region=2), TypeError, "share a dtype"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 3), region=2), ValueError, "M=4 queries"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=3), ValueError, "k must have shape"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=0), ValueError, "region must be >= 1"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=2, heads=3), ValueError, "heads=3 must divide"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=2, heads=0), ValueError, "heads must be >= 1"),
    (lambda q, k, v: ops.region_attention(q, k, v[:, :, :8], (2, 2), region=2), ValueError, "v must have shape"),
    (lambda q, k, v: ops.region_attention(q, k, v, 4, region=2), TypeError, "grid must be a pair"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2.0), region=2), TypeError, "grid must be a Python int"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=2.0), TypeError, "region must be a Python int"),
    (lambda q, k, v: ops.region_attention(q, k, v, (2, 2), region=2, scale="x"), TypeError, "scale must be"),
    (lambda q, k, v: ops.region_attention(None, k, v, (2, 2), region=2), TypeError, "q must be a tensor"),
])
def test_bad_input(gen, call, exc, match):
    q, k, v = inputs(gen, 2, 2, 2, 2, 1, 8, 8)
    with pytest.raises(exc, match=f"^tokenreduce.region_attention: .*{match}|^tokenreduce.region_attention: {match}"):
        call(q, k, v)


@pytest.mark.parametrize("bad", [
    lambda q, k, v: (q, k, v, 2, 3, 2, 1, 1.0),
    lambda q, k, v: (q, k[:, :, :-1], v, 2, 2, 2, 1, 1.0),
    lambda q, k, v: (q, k, v.float(), 2, 2, 2, 1, 1.0),
    lambda q, k, v: (q, k, v, 2, 2, 2, 4, 1.0),
])
def test_raw_op_and_fake_raise_the_same(gen, bad):
    """The C++ checks and the fake kernel's refuse the same inputs, both naming the op."""
    from tokenreduce.ops.fake import region_attention_fake

    q, k, v = inputs(gen, 2, 2, 2, 2, 1, 6, 6, torch.float64)
    args = bad(q, k, v)
    with pytest.raises((ValueError, TypeError), match="^tokenreduce.region_attention: ") as cpp:
        torch.ops.tokenreduce.region_attention(*args)
    with pytest.raises(cpp.type, match="^tokenreduce.region_attention: "):
        region_attention_fake(*args)


def test_launch_plan_binding():
    """The CUDA plan (csrc/region_attention/region_attention_plan.h) as bound in _C.plans."""
    import os
    import re

    from tokenreduce import _C

    p = _C.plans.region_attention(2, 144, 8, 1, 2, 4)
    assert p.keys == 4 and p.forward.launched
    assert p.forward.grid == (2 * 144 * 8 // 8, 1, 1) and p.forward.block == 256 and p.forward.smem == 8 * 4 * 4
    assert _C.plans.region_attention(1, 64, 8, 4, 3, 8).forward.smem == 8 * 36 * 8
    assert not _C.plans.region_attention(0, 144, 8, 1, 2, 4).forward.launched
    consts = _C.plans.constants()["region_attention"]
    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc", "region_attention")
    plan = open(os.path.join(csrc, "region_attention_plan.h")).read()
    threads = int(re.search(r"constexpr int kRaThreads = (\d+);", plan).group(1))
    assert consts["RaThreads"] == threads and consts["RaWarps"] == threads // 32
    assert f"__launch_bounds__({threads})" in open(os.path.join(csrc, "region_attention_kernels.cuh")).read()


def test_plan_binding_is_the_header(tmp_path):
    """_C.plans.region_attention returns what region_attention_plan.h computes (compiled here)."""
    import os
    import shutil
    import subprocess

    from tokenreduce import _C

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not available")
    cases = [(2, 144, 8, 1, 2, 4), (1, 64, 8, 4, 3, 8), (3, 7, 3, 2, 4, 4), (0, 5, 1, 1, 1, 4)]
    src = ['#include <cstdio>', '#include "region_attention/region_attention_plan.h"',
           "using namespace tokenreduce::cuda;", "int main() {"]
    for c in cases:
        src.append(f"  {{ auto p = make_region_attention_plan({', '.join(map(str, c))}); printf(\"%lld %lld %lld "
                   "%lld %d %lld\\n\", p.keys, p.forward.grid_x, p.forward.grid_y, p.forward.grid_z, p.forward.block, "
                   "p.forward.smem); }")
    src.append("  return 0;\n}")
    (tmp_path / "p.cpp").write_text("\n".join(src))
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
    subprocess.run([gxx, "-std=c++17", f"-I{csrc}", str(tmp_path / "p.cpp"), "-o", str(tmp_path / "p")], check=True)
    out = subprocess.run([str(tmp_path / "p")], check=True, capture_output=True, text=True).stdout.splitlines()
    for c, line in zip(cases, out):
        p = _C.plans.region_attention(*c)
        assert list(map(int, line.split())) == [p.keys, *p.forward.grid, p.forward.block, p.forward.smem]


def test_nvrtc_path_launches_the_plan(monkeypatch):
    """The NVRTC implementation launches the library's plan (launches recorded on CPU tensors)."""
    import tokenreduce.nvrtc
    from tokenreduce import _C
    from tokenreduce.nvrtc import region_attention as nvrtc_region_attention

    calls = []
    monkeypatch.setattr(tokenreduce.nvrtc, "launch",
                        lambda kernel, grid, block, args, shared_mem=0: calls.append((kernel, tuple(grid),
                                                                                      tuple(block)[0], shared_mem,
                                                                                      len(args))))
    monkeypatch.setattr(nvrtc_region_attention, "get_kernel", lambda source, name, options=(): name)
    monkeypatch.setattr(tokenreduce.nvrtc, "max_shared_memory_optin", lambda: 232448)
    q, k, v = torch.randn(2, 6, 8), torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 4)
    out, lse = nvrtc_region_attention.region_attention_cuda(q, k, v, 2, 3, 2, 2, 0.5)
    p = _C.plans.region_attention(2, 6, 2, 3, 2, 4)
    assert out.shape == (2, 6, 4) and lse.shape == (2, 6, 2)
    assert calls == [("tokenreduce::cuda::region_attention::ra_forward<float>", p.forward.grid, p.forward.block,
                      p.forward.smem, 22)]
    with pytest.raises(ValueError, match="^tokenreduce.region_attention: heads=3 must divide"):
        nvrtc_region_attention.region_attention_cuda(q, k, v, 2, 3, 2, 3, 0.5)
