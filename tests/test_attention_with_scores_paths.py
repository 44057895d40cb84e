"""The CPU kernel's internal paths, each forced and checked against the reference: the
single pass (S for the whole key range in a tile) and the blocked online-softmax path
(TOKENREDUCE_ATTENTION_CPU_PATH = single / blocked, whatever Nk), and the AVX-512 row kernel's
tails (Nk not a multiple of 16 or 32)."""
import pytest
import torch

from tokenreduce import ops, reference
from conftest import TOL, randn

PATHS = ["single", "blocked"]


def check(q, k, v, **kw):
    out, scores = ops.attention_with_scores(q, k, v, **kw)
    rout, rscores = reference.attention_with_scores(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == rout.shape
    assert scores.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert scores.shape == (q.shape[0], k.shape[2])
    torch.testing.assert_close(out, rout, **TOL[q.dtype])
    torch.testing.assert_close(scores, rscores.to(scores.dtype), atol=1e-6, rtol=1e-4)
    return out, scores


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_ATTENTION_CPU_PATH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,Dh,Dv", [(2, 4, 2, 37, 53, 16, 24), (1, 3, 3, 130, 130, 64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_forced_path_matches_reference(gen, path, dtype, B, H, Hkv, Nq, Nk, Dh, Dv, causal):
    q, k, v = randn(gen, B, H, Nq, Dh, dtype=dtype), randn(gen, B, Hkv, Nk, Dh, dtype=dtype), randn(gen, B, Hkv, Nk, Dv, dtype=dtype)
    check(q, k, v, causal=causal)
    check(q, k, v, causal=causal, score_rows=[0, -1])


def test_forced_path_bias_scale_rows(gen, path):
    B, H, N, Dh = 2, 4, 77, 32
    q, k, v = (randn(gen, B, H, N, Dh) for _ in range(3))
    bias = randn(gen, B, N)
    bias[0, :5] = float("-inf")
    for rows in (None, [0], [3, 3, -1]):
        _, scores = check(q, k, v, key_bias=bias, scale=0.3, score_rows=rows)
        assert (scores[0, :5] == 0).all()
        torch.testing.assert_close(scores.sum(-1), torch.ones(B), atol=1e-5, rtol=0)


def test_forced_path_nan_and_empty_rows(gen, path):
    q, k, v = (randn(gen, 2, 2, 5, 4) for _ in range(3))
    k[1, 0, 2, 0] = float("nan")
    out, scores = ops.attention_with_scores(q, k, v)
    assert torch.isnan(scores[1]).all() and torch.isfinite(scores[0]).all()
    assert torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all()
    q, k, v = randn(gen, 2, 2, 9, 8), randn(gen, 2, 2, 4, 8), randn(gen, 2, 2, 4, 8)
    out, scores = check(q, k, v, causal=True)
    assert (out[:, :, :5] == 0).all()


@pytest.mark.parametrize("Nk", [1, 15, 16, 17, 31, 32, 33, 47, 577])
def test_row_kernel_tails(gen, Nk):
    """Row lengths around the 16 / 32 lanes of the AVX-512 exp, masked keys in the tail."""
    q, k, v = randn(gen, 2, 3, 7, 16), randn(gen, 2, 3, Nk, 16), randn(gen, 2, 3, Nk, 16)
    check(q, k, v)
    bias = torch.zeros(2, Nk)
    bias[:, -1] = float("-inf")
    if Nk > 1:
        _, scores = check(q, k, v, key_bias=bias, score_rows=[0])
        assert (scores[:, -1] == 0).all()


def test_large_logits_underflow_to_exact_zero(gen):
    """Logits 100 below the row max give probability exactly 0 (no denormals), as the
    portable fast_exp does."""
    q = torch.zeros(1, 1, 2, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 40, 4)
    k[0, 0, 0, 0] = 200.0  # key 0 dominates every row by 200 / 2 = 100
    v = randn(gen, 1, 1, 40, 4)
    out, scores = ops.attention_with_scores(q, k, v)
    assert scores[0, 0] == 1 and (scores[0, 1:] == 0).all()
    torch.testing.assert_close(out[0, 0], v[0, 0, :1].expand(2, 4))


def test_forced_path_strided_keys(gen, path):
    """k, v with a row stride of 3 H Dh (HF's fused qkv layout), borrowed without a copy."""
    B, H, N, Dh = 2, 4, 197, 64
    qkv = randn(gen, B, N, 3, H, Dh)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check(q, k, v)
    check(q, k, v, score_rows=[0])


def test_paths_agree_and_thread_count_independent(gen, monkeypatch):
    q, k, v = (randn(gen, 2, 4, 300, 16) for _ in range(3))
    results = {}
    n = torch.get_num_threads()
    try:
        for p in PATHS:
            monkeypatch.setenv("TOKENREDUCE_ATTENTION_CPU_PATH", p)
            torch.set_num_threads(1)
            a = ops.attention_with_scores(q, k, v, score_rows=[0])
            torch.set_num_threads(max(n, 2))
            b = ops.attention_with_scores(q, k, v, score_rows=[0])
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            results[p] = a
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(results["single"][0], results["blocked"][0], **TOL[torch.float32])
    torch.testing.assert_close(results["single"][1], results["blocked"][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_width_values_give_the_same_scores(gen, path, dtype, causal):
    """Scores only (`llm_scores.unused_values`): v of width 0 skips P V on the CPU; the scores
    are those of any v, bit for bit, and the output is [B, H, Nq, 0]."""
    B, H, Hkv, Nq, Nk, Dh = 2, 6, 3, 5, 71, 32
    q, k = randn(gen, B, H, Nq, Dh, dtype=dtype), randn(gen, B, Hkv, Nk, Dh, dtype=dtype)
    bias = torch.zeros(B, Nk).index_fill_(1, torch.tensor([3, 40]), float("-inf"))
    for kw in ({}, {"score_rows": [-1]}, {"key_bias": bias, "score_rows": [0, 2]}):
        out0, s0 = check(q, k, k[..., :0], causal=causal, **kw)
        _, s1 = ops.attention_with_scores(q, k, k, causal=causal, **kw)
        assert out0.shape == (B, H, Nq, 0)
        assert torch.equal(s0, s1)
