import math

import pytest
import torch

from tokenreduce import measure, ops, reference
from conftest import DTYPES, TOL, randn


# ---- facebookresearch/ToMe tome/merge.py, as published (the oracle for order="tome") ----
def tome_bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


@pytest.mark.parametrize("protect", [0, 1, 2])
@pytest.mark.parametrize("B,N,D,r", [(2, 11, 8, 3), (3, 197, 64, 50), (2, 577, 32, 200)])
def test_tome_order_reproduces_tome(gen, protect, B, N, D, r):
    r = min(r, (N - protect) // 2)
    x = randn(gen, B, N, D)
    k = randn(gen, B, N, 16)
    size = torch.randint(1, 4, (B, N, 1), generator=gen).float()
    m = tome_bipartite_soft_matching(k, r, class_token=protect >= 1, distill_token=protect >= 2)
    tx, tsize = tome_merge_wavg(m, x, size)
    merged, osize, source = ops.bipartite_merge(x, r, metric=k, size=size, protect=protect)
    torch.testing.assert_close(merged, tx)
    torch.testing.assert_close(osize, tsize[..., 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["tome", "spatial"])
@pytest.mark.parametrize("B,N,D,r,protect", [(1, 1, 4, 0, 0), (1, 2, 4, 1, 0), (2, 9, 5, 4, 0), (3, 64, 24, 31, 1), (6, 77, 24, 30, 1), (2, 101, 33, 40, 3), (2, 2001, 16, 999, 1)])
def test_matches_reference(gen, dtype, order, B, N, D, r, protect):
    x = randn(gen, B, N, D, dtype=dtype)
    size = (torch.rand(B, N, generator=gen) * 3 + 0.5).to(dtype)
    merged, osize, source = ops.bipartite_merge(x, r, size=size, protect=protect, order=order)
    rm, rs, rsrc = reference.bipartite_merge(x, r, size=size, protect=protect, order=order)
    assert merged.shape == (B, N - r, D) and merged.dtype == dtype
    assert osize.dtype == torch.float32 and source.dtype == torch.long
    assert torch.equal(source, rsrc)
    torch.testing.assert_close(merged, rm, **TOL[dtype])
    torch.testing.assert_close(osize, rs)
    # invariants: sizes are conserved, protected tokens stay put and alone
    torch.testing.assert_close(osize.sum(-1), size.float().sum(-1), rtol=1e-5, atol=1e-4)
    if protect:
        assert torch.equal(source[:, :protect], torch.arange(protect).expand(B, protect))
        counts = torch.zeros(B, N - r, dtype=torch.long).scatter_add_(1, source, torch.ones_like(source))
        assert (counts[:, :protect] == 1).all()


def test_spatial_keeps_relative_order(gen):
    x = randn(gen, 2, 50, 8)
    _, _, source = ops.bipartite_merge(x, 20, order="spatial", protect=1)
    for b in range(2):
        b_slots = set(source[b, 1::2].tolist())
        survivors = [i for i in range(50) if i % 2 == 1 or int(source[b, i]) not in b_slots]
        assert len(survivors) == 30
        assert source[b, survivors].tolist() == list(range(30))  # survivors in original order


def test_merged_rows_are_size_weighted_means(gen):
    x = randn(gen, 2, 31, 6)
    size = torch.rand(2, 31, generator=gen) + 0.1
    merged, osize, source = ops.bipartite_merge(x, 12, size=size, protect=1)
    num = torch.zeros(2, 19, 6).scatter_add_(1, source[..., None].expand(-1, -1, 6), x * size[..., None])
    den = torch.zeros(2, 19).scatter_add_(1, source, size)
    torch.testing.assert_close(merged, num / den[..., None])
    torch.testing.assert_close(osize, den)


def test_ties_go_to_smaller_indices():
    # all tokens identical: every score ties; the r smallest unprotected A merge into B[0]... of
    # their own row's best = the smallest B index
    x = torch.ones(1, 10, 4)
    merged, size, source = ops.bipartite_merge(x, 3, order="spatial")
    # A tokens 0, 2, 4 merge (smallest A indices) into B token 1 (smallest B index)
    assert source[0].tolist() == [0, 0, 0, 1, 0, 2, 3, 4, 5, 6]
    assert size[0].tolist() == [4, 1, 1, 1, 1, 1, 1]
    _, _, rsource = reference.bipartite_merge(x, 3, order="spatial")
    assert torch.equal(source, rsource)


def test_non_contiguous(gen):
    x = randn(gen, 41, 2, 16).transpose(0, 1)
    a = ops.bipartite_merge(x, 13, protect=1)
    b = ops.bipartite_merge(x.contiguous(), 13, protect=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    m = randn(gen, 2, 41, 32)[..., ::2]
    a = ops.bipartite_merge(x, 13, metric=m)
    b = ops.bipartite_merge(x, 13, metric=m.contiguous())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("order", ["tome", "spatial"])
def test_gradcheck(gen, order):
    x = randn(gen, 2, 13, 5, dtype=torch.float64).requires_grad_()
    size = torch.rand(2, 13, generator=gen, dtype=torch.float64) + 0.5
    metric = randn(gen, 2, 13, 7, dtype=torch.float64)
    f = lambda x: ops.bipartite_merge(x, 5, metric=metric, size=size, protect=1, order=order)[0]
    assert torch.autograd.gradcheck(f, (x,))
    g = lambda x: ops.bipartite_merge(x, 4)[0]  # metric = x itself: matching is piecewise constant
    assert torch.autograd.gradcheck(g, (x,))


def test_grad_matches_reference(gen):
    x = randn(gen, 2, 40, 8).requires_grad_()
    w = randn(gen, 2, 30, 8)
    (ops.bipartite_merge(x, 10, protect=1)[0] * w).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (reference.bipartite_merge(x2, 10, protect=1)[0] * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda x: ops.bipartite_merge(x[0], 2), ValueError, "x must have shape"),
        (lambda x: ops.bipartite_merge(x, 6), ValueError, "r=6"),
        (lambda x: ops.bipartite_merge(x, 5, protect=1), ValueError, "r=5"),
        (lambda x: ops.bipartite_merge(x, -1), ValueError, "r=-1"),
        (lambda x: ops.bipartite_merge(x, 2.0), TypeError, "r must be a Python int"),
        (lambda x: ops.bipartite_merge(x, 2, protect=11), ValueError, "protect"),
        (lambda x: ops.bipartite_merge(x, 2, order="random"), ValueError, "order"),
        (lambda x: ops.bipartite_merge(x, 2, metric=torch.randn(2, 9, 3)), ValueError, "metric"),
        (lambda x: ops.bipartite_merge(x, 2, size=torch.ones(2, 9)), ValueError, "size"),
        (lambda x: ops.bipartite_merge(x.int(), 2), TypeError, "floating"),
        (lambda x: ops.bipartite_merge(x, 2, metric=x.int()), TypeError, "metric"),
        (lambda x: ops.bipartite_merge(torch.where(torch.arange(10)[None, :, None] == 3, float("inf"), x), 2), ValueError, "non-finite"),
        (lambda x: ops.bipartite_merge(x, 2, size=torch.ones(2, 10, device="meta")), ValueError, "size is on meta"),
    ],
)
def test_bad_input_raises(call, exc, needle):
    x = torch.randn(2, 10, 4)
    with pytest.raises(exc, match="tokenreduce.bipartite_merge") as info:
        call(x)
    assert needle in str(info.value)


# --------------------------------------------------------------------------------------
# Wide metrics (D >= 128) take the bf16-screened path where the bf16 GEMM is the faster
# (measured per machine; the tests force it on and off: `bf16_screen`): a bf16 GEMM of the
# unit rows picks candidate partners, which are rescored in float32. Its result must be the
# float32 one. Inputs are redrawn until the float64 decisions have margins far above float32
# rounding (top-2 partner gap and the merge boundary at rank r), so the comparison is exact.
# --------------------------------------------------------------------------------------


def _margins_ok(m: torch.Tensor, r: int, protect: int, margin: float = 2e-6) -> bool:
    u = m.double() / m.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = u[:, ::2] @ u[:, 1::2].transpose(1, 2)
    s[:, : (protect + 1) // 2] = -math.inf
    s[:, :, : protect // 2] = -math.inf
    top2 = s[:, (protect + 1) // 2:].topk(2, dim=-1).values
    best = s.max(-1).values.sort(dim=-1, descending=True).values
    return bool((top2[..., 0] - top2[..., 1]).min() > margin) and bool((best[:, r - 1] - best[:, r]).min() > margin)


def _draw(gen, make, r, protect, tries=40):
    for _ in range(tries):
        x = make()
        if _margins_ok(x.float(), r, protect):
            return x
    raise AssertionError("could not draw inputs with clear margins")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "clustered", "two_level"])
def test_wide_metric_screening_matches_reference(gen, bf16_screen, dtype, kind):
    B, N, D, r, protect = 2, 577, 1024, 250, 1
    if kind == "clustered":  # fewer, wider-spread decisions so clear margins can be drawn
        B, N, D, r = 2, 129, 256, 50

    def make():
        if kind == "random":  # scores ~ N(0, 1/32): a few candidates per row
            return randn(gen, B, N, D, dtype=dtype)
        if kind == "clustered":  # all cosines ~0.96: every column is a candidate (float32 fallback)
            return (randn(gen, B, 1, D) + 0.2 * randn(gen, B, N, D)).to(dtype)
        # a shared direction plus noise: cosines ~0.5 +- 0.03, many candidates in the band
        return (randn(gen, B, 1, D) + randn(gen, B, N, D)).to(dtype)

    x = _draw(gen, make, r, protect)
    size = (torch.rand(B, N, generator=gen) + 0.5).to(dtype)
    for order in ("tome", "spatial"):
        merged, osize, source = ops.bipartite_merge(x, r, size=size, protect=protect, order=order)
        rm, rs, rsrc = reference.bipartite_merge(x, r, size=size, protect=protect, order=order)
        assert torch.equal(source, rsrc)
        torch.testing.assert_close(merged, rm, **TOL[dtype])
        torch.testing.assert_close(osize, rs)


def test_wide_separate_metric_screening(gen, bf16_screen):
    B, N, D, Dm, r = 3, 301, 40, 256, 120
    x = randn(gen, B, N, D)
    k = _draw(gen, lambda: randn(gen, B, N, Dm) + 0.5 * randn(gen, B, 1, Dm), r, 0)
    merged, osize, source = ops.bipartite_merge(x, r, metric=k)
    rm, rs, rsrc = reference.bipartite_merge(x, r, metric=k)
    assert torch.equal(source, rsrc)
    torch.testing.assert_close(merged, rm)


# With B >= 2 x threads one task per batch row runs matching, planning and merging back to
# back; with fewer batch rows each step is split over (batch row, block) tasks. Both splits,
# screened (random: a few candidates per row) and float32 fallback (clustered: every column).
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_wide_screening_both_parallel_splits(gen, bf16_screen, B, kind):
    N, D, r, protect = 129, 256, 50, 1

    def make():
        if kind == "random":
            return randn(gen, B, N, D)
        return randn(gen, B, 1, D) + 0.2 * randn(gen, B, N, D)

    x = _draw(gen, make, r, protect)
    size = torch.rand(B, N, generator=gen) + 0.5
    with measure.threads(2):
        for order in ("tome", "spatial"):
            merged, osize, source = ops.bipartite_merge(x, r, size=size, protect=protect, order=order)
            rm, rs, rsrc = reference.bipartite_merge(x, r, size=size, protect=protect, order=order)
            assert torch.equal(source, rsrc)
            torch.testing.assert_close(merged, rm)
            torch.testing.assert_close(osize, rs)


# The screen's choice: measured once per process (bf16 / float32 GEMM speedup on one thread),
# forced by TOKENREDUCE_BF16_SCREEN=on|off, read per call.
def test_bf16_screen_choice(monkeypatch):
    from tokenreduce import _C

    monkeypatch.delenv("TOKENREDUCE_BF16_SCREEN", raising=False)
    info = _C.bf16_screen()
    assert info["speedup"] > 0 and info["min_speedup"] > 1
    assert info["on"] == (info["speedup"] >= info["min_speedup"])
    assert _C.bf16_screen()["speedup"] == info["speedup"]  # measured once
    for forced, on in (("on", True), ("off", False), ("bogus", info["on"])):
        monkeypatch.setenv("TOKENREDUCE_BF16_SCREEN", forced)
        assert _C.bf16_screen()["on"] is on
