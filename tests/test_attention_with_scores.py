import pytest
import torch

from tokenreduce import ops, reference
from conftest import DTYPES, TOL, randn


def run_both(q, k, v, **kw):
    out, scores = ops.attention_with_scores(q, k, v, **kw)
    rout, rscores = reference.attention_with_scores(q, k, v, **kw)
    return out, scores, rout, rscores


def check(q, k, v, **kw):
    out, scores, rout, rscores = run_both(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == rout.shape
    assert scores.dtype == torch.float32 and scores.shape == (q.shape[0], k.shape[2])
    torch.testing.assert_close(out, rout, **TOL[q.dtype])
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-4)
    return out, scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,Hkv,Nq,Nk,Dh,Dv",
    [(1, 1, 1, 1, 1, 8, 8), (2, 4, 4, 37, 37, 16, 16), (3, 6, 2, 29, 71, 24, 40),
     (2, 8, 1, 197, 197, 64, 64), (1, 2, 2, 5, 300, 8, 12)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(gen, dtype, B, H, Hkv, Nq, Nk, Dh, Dv, causal):
    q, k, v = randn(gen, B, H, Nq, Dh, dtype=dtype), randn(gen, B, Hkv, Nk, Dh, dtype=dtype), randn(gen, B, Hkv, Nk, Dv, dtype=dtype)
    _, scores = check(q, k, v, causal=causal)
    if not causal or Nq <= Nk:
        torch.testing.assert_close(scores.sum(-1), torch.ones(B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_bias_scale_and_score_rows(gen, dtype):
    B, H, N, Dh = 3, 4, 51, 32
    q, k, v = (randn(gen, B, H, N, Dh, dtype=dtype) for _ in range(3))
    size = torch.randint(1, 5, (B, N), generator=gen).float()
    for rows in ([0], [N - 1], [0, 7, -1], torch.tensor([3, 3, 10])):
        _, scores = check(q, k, v, key_bias=size.log(), scale=0.3, score_rows=rows)
        torch.testing.assert_close(scores.sum(-1), torch.ones(B), atol=1e-5, rtol=0)


def test_cls_row_is_the_cls_attention(gen):
    """score_rows=[0] is what VisionZip/FasterVLM read: the [CLS] row of the probabilities."""
    B, H, N, Dh = 2, 3, 17, 8
    q, k, v = (randn(gen, B, H, N, Dh) for _ in range(3))
    _, scores = ops.attention_with_scores(q, k, v, score_rows=[0])
    probs = (q @ k.transpose(-1, -2) * Dh**-0.5).softmax(-1)
    torch.testing.assert_close(scores, probs[:, :, 0].mean(1))


def test_long_keys_two_pass_path(gen):
    """Nk above the single-pass limit (4096) takes the two-pass path."""
    B, H, Hkv, Nq, Nk, D = 1, 4, 2, 33, 5000, 8
    q, k, v = randn(gen, B, H, Nq, D), randn(gen, B, Hkv, Nk, D), randn(gen, B, Hkv, Nk, D)
    bias = randn(gen, B, Nk)
    check(q, k, v, key_bias=bias)
    check(q, k, v, causal=True, score_rows=[0, -1])
    check(q, k, v, causal=True, key_bias=bias)


def test_long_sequence_2k(gen):
    B, H, N, D = 1, 2, 2049, 8
    q, k, v = (randn(gen, B, H, N, D) for _ in range(3))
    check(q, k, v, causal=True)


def test_causal_more_queries_than_keys_gives_zero_rows(gen):
    q, k, v = randn(gen, 2, 2, 9, 8), randn(gen, 2, 2, 4, 8), randn(gen, 2, 2, 4, 8)
    out, scores = check(q, k, v, causal=True)
    assert (out[:, :, :5] == 0).all()  # rows 0..4 see no key (bottom-right alignment)
    torch.testing.assert_close(scores.sum(-1), torch.full((2,), 4 / 9))


def test_fully_masked_row_by_bias(gen):
    q, k, v = (randn(gen, 2, 2, 6, 8) for _ in range(3))
    bias = torch.zeros(2, 6)
    bias[1] = float("-inf")  # batch 1: every key masked
    bias[0, :3] = float("-inf")
    out, scores = check(q, k, v, key_bias=bias)
    assert (out[1] == 0).all() and (scores[1] == 0).all()
    assert (scores[0, :3] == 0).all()


def test_non_contiguous_inputs(gen):
    B, N, H, Dh = 2, 23, 4, 16
    qkv = randn(gen, B, N, 3, H, Dh)  # HF layout: [B, N, H, Dh] then transpose
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v)
    check(q[..., ::2], k[..., ::2], v[..., ::2])  # inner stride 2
    # one query row broadcast over N (row stride 0): the CPU GEMM reads q in place
    check(q[:, :, :1].expand(-1, -1, N, -1), k, v)


def test_nan_propagates_like_eager(gen):
    q, k, v = (randn(gen, 2, 2, 5, 4) for _ in range(3))
    k[1, 0, 2, 0] = float("nan")
    out, scores = ops.attention_with_scores(q, k, v)
    assert torch.isnan(scores[1]).all() and torch.isfinite(scores[0]).all()
    assert torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all()


def test_deterministic_across_thread_counts(gen):
    q, k, v = (randn(gen, 2, 4, 300, 16) for _ in range(3))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.attention_with_scores(q, k, v)
        torch.set_num_threads(max(n, 2))
        b = ops.attention_with_scores(q, k, v)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "args,kw,exc,needle",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)), {}, ValueError, "q must have shape"),
        ((torch.randn(1, 3, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {}, ValueError, "multiple of k's heads"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 7), torch.randn(1, 2, 5, 8)), {}, ValueError, "head dim"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)), {}, ValueError, "v "),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 5, 8)), {}, TypeError, "share a dtype"),
        ((torch.ones(1, 2, 4, 8, dtype=torch.int32),) * 3, {}, TypeError, "floating"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"key_bias": torch.randn(1, 4)}, ValueError, "key_bias"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": [4]}, IndexError, "score_rows"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": torch.tensor([0.5])}, TypeError, "score_rows"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), {}, ValueError, "at least one key"),
    ],
)
def test_bad_input_raises(args, kw, exc, needle):
    with pytest.raises(exc, match="tokenreduce.attention_with_scores") as info:
        ops.attention_with_scores(*args, **kw)
    assert needle in str(info.value)


def test_device_mismatch_raises():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8, device="meta")
    with pytest.raises((ValueError, RuntimeError), match="tokenreduce.attention_with_scores|meta|device"):
        ops.attention_with_scores(q, k, k)


def test_backward_raises_clearly(gen):
    q = randn(gen, 1, 2, 4, 8).requires_grad_()
    out, _ = ops.attention_with_scores(q, q, q)
    with pytest.raises(Exception, match="forward-only"):
        out.sum().backward()
