import pytest
import torch

from tokenreduce import ops, reference
from conftest import DTYPES, randn


def distances(x, metric):
    x = x.double()
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1 - xn @ xn.transpose(-1, -2)
    return torch.cdist(x, x)


def assert_same_kcenter(x, idx, md, ridx, rmd, metric, tie_tol):
    """Indices must match; where they differ, the two picks must be a near-tie in the
    max-min objective (bf16/fp16 near-ties can flip), and mindist must still agree with
    the op's own picks."""
    assert idx.shape == ridx.shape and idx.dtype == torch.long
    dist = distances(x, metric)
    for b in range(x.shape[0]):
        if torch.equal(idx[b], ridx[b]):
            torch.testing.assert_close(md[b], rmd[b], atol=1e-5, rtol=1e-5)
            continue
        i = int((idx[b] != ridx[b]).nonzero()[0])
        prefix = idx[b, :i]
        d = dist[b][prefix].min(0).values if i > 0 else None
        assert i > 0 and abs(float(d[idx[b, i]] - d[ridx[b, i]])) <= tie_tol, (b, i)
    # mindist is the distance to the op's own picked set
    for b in range(x.shape[0]):
        own = dist[b][idx[b]].min(0).values
        own[idx[b]] = 0
        torch.testing.assert_close(md[b].double(), own, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("B,N,D,k", [(1, 1, 4, 1), (2, 7, 3, 7), (3, 65, 17, 20), (2, 577, 64, 64)])
def test_matches_reference(gen, dtype, metric, B, N, D, k):
    x = randn(gen, B, N, D, dtype=dtype)
    idx, md = ops.kcenter(x, k, metric=metric)
    ridx, rmd = reference.kcenter(x, k, metric=metric)
    assert md.dtype == torch.float32 and md.shape == (B, N)
    assert_same_kcenter(x, idx, md, ridx, rmd, metric, tie_tol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_isolated_start_and_mask(gen, metric):
    B, N, D = 3, 150, 12
    x = randn(gen, B, N, D)
    mask = torch.rand(B, N, generator=gen) > 0.3
    idx, md = ops.kcenter(x, 25, metric=metric, first="isolated", mask=mask)
    ridx, rmd = reference.kcenter(x, 25, metric=metric, first="isolated", mask=mask)
    assert_same_kcenter(x, idx, md, ridx, rmd, metric, tie_tol=1e-5)
    assert mask.gather(1, idx).all()


def test_isolated_is_divprune_start(gen):
    """DivPrune: argmax over tokens of the 2nd-smallest distance (the nearest other token)."""
    x = randn(gen, 1, 90, 16)
    idx, _ = ops.kcenter(x, 1, first="isolated")
    dist = distances(x, "cosine")[0]
    nn = torch.topk(dist, 2, dim=0, largest=False).values[1]
    assert int(idx[0, 0]) == int(nn.argmax())


def test_first_forms(gen):
    x = randn(gen, 3, 40, 8)
    a, _ = ops.kcenter(x, 5, first=-1)
    assert (a[:, 0] == 39).all()
    firsts = torch.tensor([3, 0, 17])
    b, _ = ops.kcenter(x, 5, first=firsts)
    assert torch.equal(b[:, 0], firsts)
    rb, _ = reference.kcenter(x, 5, first=firsts)
    assert torch.equal(b, rb)


def test_large_n(gen):
    x = randn(gen, 2, 2001, 24)
    idx, md = ops.kcenter(x, 100)
    ridx, rmd = reference.kcenter(x, 100)
    assert_same_kcenter(x, idx, md, ridx, rmd, "cosine", tie_tol=1e-5)


def test_ties_go_to_smallest_index():
    # four copies of two points: every later pick is a tie between duplicates
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = base.repeat(4, 1)[None]  # tokens 0,2,4,6 = e0 ; 1,3,5,7 = e1
    idx, md = ops.kcenter(x, 4, first=0)
    assert idx.tolist() == [[0, 1, 2, 3]]  # after both points, all distances are 0: smallest index
    assert torch.equal(idx, reference.kcenter(x, 4, first=0)[0])
    assert (md == 0).all()
    x2 = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    idx2, _ = ops.kcenter(x2, 2, metric="l2", first=0)
    assert idx2.tolist() == [[0, 1]]  # tokens 1, 2, 3 all at distance 1


def test_zero_rows_cosine_distance_one():
    x = torch.zeros(1, 4, 3)
    x[0, 1] = torch.tensor([1.0, 2.0, 3.0])
    idx, md = ops.kcenter(x, 2, first=1)
    assert idx.tolist() == [[1, 0]]
    assert md[0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_non_contiguous(gen):
    x = randn(gen, 40, 2, 16).transpose(0, 1)
    assert torch.equal(ops.kcenter(x, 9)[0], ops.kcenter(x.contiguous(), 9)[0])
    y = randn(gen, 2, 40, 32)[..., ::2]
    assert torch.equal(ops.kcenter(y, 9)[0], ops.kcenter(y.contiguous(), 9)[0])


def test_batch_independent_of_split(gen):
    x = randn(gen, 5, 130, 16)
    full, _ = ops.kcenter(x, 30)
    for b in range(5):
        assert torch.equal(ops.kcenter(x[b : b + 1], 30)[0][0], full[b])


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda x: ops.kcenter(x[0], 3), ValueError, "x must have shape"),
        (lambda x: ops.kcenter(x, 11), ValueError, "k=11"),
        (lambda x: ops.kcenter(x, 3.0), TypeError, "k must be a Python int"),
        (lambda x: ops.kcenter(x, 3, metric="dot"), ValueError, "metric"),
        (lambda x: ops.kcenter(x, 3, first="random"), ValueError, "first"),
        (lambda x: ops.kcenter(x, 3, first=10), IndexError, "first=10"),
        (lambda x: ops.kcenter(x, 3, first=torch.tensor([0])), ValueError, "first"),
        (lambda x: ops.kcenter(x, 3, first=torch.tensor([0.0, 1.0])), TypeError, "first"),
        (lambda x: ops.kcenter(x.long(), 3), TypeError, "floating"),
        (lambda x: ops.kcenter(x, 3, mask=torch.ones(2, 10)), TypeError, "mask"),
        (lambda x: ops.kcenter(x, 3, mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "mask"),
        (lambda x: ops.kcenter(x, 6, mask=torch.arange(10).expand(2, 10) < 5), ValueError, "eligible"),
        (lambda x: ops.kcenter(x, 2, first=7, mask=torch.arange(10).expand(2, 10) < 5), ValueError, "masked out"),
        (lambda x: ops.kcenter(torch.where(torch.arange(10)[None, :, None] == 4, float("nan"), x), 3), ValueError, "non-finite"),
        (lambda x: ops.kcenter(x, 3, mask=torch.ones(2, 10, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
    ],
)
def test_bad_input_raises(call, exc, needle):
    x = torch.randn(2, 10, 4)
    with pytest.raises(exc, match="tokenreduce.kcenter") as info:
        call(x)
    assert needle in str(info.value)
