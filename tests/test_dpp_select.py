"""dpp_select: parity with the plain-PyTorch reference and with the authors' greedy loop,
ties, masks, the gain-0 rule, dtypes, batch splits, bad input, torch.compile."""
import pytest
import torch

from tokenreduce import ops, reference
from tokenreduce.testing.authors.cdpruner import fast_map_dpp
from conftest import DTYPES, randn


def log_det(x, rel, idx):
    """log det L_Y of the op's picks (float64), for near-tie checks."""
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    r = torch.ones(x.shape[:2], dtype=torch.float64) if rel is None else rel.double()
    L = r[:, :, None] * (u @ u.transpose(1, 2)) * r[:, None, :]
    out = []
    for b in range(x.shape[0]):
        Y = idx[b]
        out.append(torch.linalg.slogdet(L[b][Y][:, Y])[1])
    return torch.stack(out)


def assert_same_picks(x, rel, idx, gains, ridx, rgains, tol=1e-4):
    """Picks equal; where a low-precision near-tie flips one, the first differing step must be
    a near-tie of the gains."""
    assert idx.shape == ridx.shape and idx.dtype == torch.long
    for b in range(x.shape[0]):
        if torch.equal(idx[b], ridx[b]):
            torch.testing.assert_close(gains[b], rgains[b], atol=1e-4, rtol=1e-3)
            continue
        i = int((idx[b] != ridx[b]).nonzero()[0])
        assert abs(float(gains[b, i] - rgains[b, i])) <= tol * max(1.0, float(rgains[b, 0])), (b, i)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("B,N,D,k", [(1, 1, 4, 1), (2, 7, 3, 3), (3, 65, 17, 20), (2, 577, 64, 64), (2, 40, 300, 40)])
def test_matches_reference(gen, dtype, B, N, D, k):
    x = randn(gen, B, N, D, dtype=dtype)
    rel = torch.rand(B, N, generator=gen).to(dtype) + 0.1
    for r in (None, rel):
        idx, gains = ops.dpp_select(x, k, relevance=r)
        ridx, rgains = reference.dpp_select(x, k, relevance=r)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert gains.dtype == acc and gains.shape == (B, k)
        assert_same_picks(x, r, idx, gains, ridx, rgains)
        assert (idx.sort(1).values.diff(dim=1) > 0).all()  # distinct picks


def test_matches_authors_loop(gen):
    """The authors' encode_images loop (same picks, pick order included) on random features."""
    x = randn(gen, 3, 576, 256)
    rel = torch.rand(3, 576, generator=gen) + 1e-6
    idx, _ = ops.dpp_select(x, 64, relevance=rel)
    assert torch.equal(idx, fast_map_dpp(x, rel, 64))
    # without relevance every L_ii is exactly 1 here (the authors': 1 +- rounding of their Gram,
    # which then picks the first token arbitrarily): ties go to token 0; where the authors'
    # rounding also starts at token 0, the rest agree
    plain = ops.dpp_select(x, 64)[0]
    assert (plain[:, 0] == 0).all()
    assert torch.equal(plain, reference.dpp_select(x, 64)[0])
    theirs = fast_map_dpp(x, None, 64)
    same_start = theirs[:, 0] == 0
    assert torch.equal(plain[same_start], theirs[same_start])


def test_gains_are_determinant_ratios(gen):
    x = randn(gen, 2, 50, 8, dtype=torch.float64)
    rel = torch.rand(2, 50, generator=gen, dtype=torch.float64) + 0.5
    idx, gains = ops.dpp_select(x, 8, relevance=rel)
    for t in range(1, 9):
        prev = log_det(x, rel, idx[:, : t - 1]) if t > 1 else torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(gains[:, t - 1].log(), log_det(x, rel, idx[:, :t]) - prev, atol=1e-8, rtol=1e-8)
    assert (gains[:, :-1] >= gains[:, 1:]).all()  # d2 only decreases: the gains never grow


def test_ties_go_to_the_lowest_index():
    """Orthogonal tokens with tied relevance: picks by relevance, then index."""
    x = torch.eye(6).repeat(2, 1, 1)
    rel = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    idx, gains = ops.dpp_select(x, 6, relevance=rel)
    assert idx.tolist() == [[1, 3, 5, 0, 2, 4], [0, 1, 2, 3, 4, 5]]
    assert gains[0].tolist() == [4.0, 4.0, 4.0, 1.0, 1.0, 1.0]
    assert torch.equal(idx, reference.dpp_select(x, 6, relevance=rel)[0])


def test_mask():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 90, 12, generator=g)
    mask = torch.rand(3, 90, generator=g) > 0.4
    rel = torch.rand(3, 90, generator=g)
    idx, gains = ops.dpp_select(x, 20, relevance=rel, mask=mask)
    ridx, rgains = reference.dpp_select(x, 20, relevance=rel, mask=mask)
    assert torch.equal(idx, ridx)
    assert mask.gather(1, idx).all()
    torch.testing.assert_close(gains, rgains, atol=1e-5, rtol=1e-4)


def test_gain_zero_duplicates():
    """Three directions, each repeated: three real picks, then the fallback (largest L_ii =
    relevance^2 among the unpicked, then the lowest index) with gain 0."""
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 1.0]])
    x = base.repeat(3, 1)[None]                         # tokens 0..8: directions 0,1,2,0,1,2,...
    rel = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 2.0, 1.0, 1.0]])
    idx, gains = ops.dpp_select(x, 6, relevance=rel)
    ridx, rgains = reference.dpp_select(x, 6, relevance=rel)
    assert torch.equal(idx, ridx)
    # d2 = r^2: token 6 (r=2) first; direction 2 ([1,1,1]) is not orthogonal to 0 (d2 2/3),
    # so direction 1's best (token 1, lowest index) beats it; then a direction-2 token
    assert idx[0, :3].tolist() == [6, 1, 2]
    assert (gains[0, :3] > 1e-3).all() and (gains[0, 3:] == 0).all()
    assert idx[0, 3:].tolist() == [0, 3, 5]           # r = 1 unpicked, lowest index first
    torch.testing.assert_close(gains, rgains, atol=1e-5, rtol=1e-4)


def test_gain_zero_rank_and_k_above_valid():
    g = torch.Generator().manual_seed(4)
    # rank 3 features: picks 4.. are fallback picks with gain 0
    x = torch.randn(2, 30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    idx, gains = ops.dpp_select(x, 10)
    assert (gains[:, :3] > 1e-3).all() and (gains[:, 3:] == 0).all()
    assert torch.equal(idx, reference.dpp_select(x, 10)[0])
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    # k above the eligible count: the eligible first, then the masked ones (gain 0)
    y = torch.randn(1, 12, 8, generator=g)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, [2, 5, 7]] = True
    idx, gains = ops.dpp_select(y, 6, mask=mask)
    assert sorted(idx[0, :3].tolist()) == [2, 5, 7] and (gains[0, :3] > 0).all()
    assert idx[0, 3:].tolist() == [0, 1, 3] and (gains[0, 3:] == 0).all()
    assert torch.equal(idx, reference.dpp_select(y, 6, mask=mask)[0])


def test_zero_rows_and_zero_relevance():
    x = torch.zeros(1, 5, 4)
    x[0, 3] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    idx, gains = ops.dpp_select(x, 3)
    assert idx.tolist() == [[3, 0, 1]] and gains[0, 1:].tolist() == [0.0, 0.0]
    idx, gains = ops.dpp_select(torch.randn(1, 5, 4), 2, relevance=torch.zeros(1, 5))
    assert idx.tolist() == [[0, 1]] and gains.tolist() == [[0.0, 0.0]]


def test_k_zero_and_empty():
    idx, gains = ops.dpp_select(torch.randn(2, 5, 3), 0)
    assert idx.shape == (2, 0) and gains.shape == (2, 0)
    idx, gains = ops.dpp_select(torch.randn(0, 5, 3), 2)
    assert idx.shape == (0, 2)


def test_non_contiguous_and_batch_split(gen):
    x = randn(gen, 40, 3, 16).transpose(0, 1)
    assert torch.equal(ops.dpp_select(x, 9)[0], ops.dpp_select(x.contiguous(), 9)[0])
    y = randn(gen, 2, 40, 32)[..., ::2]
    assert torch.equal(ops.dpp_select(y, 9)[0], ops.dpp_select(y.contiguous(), 9)[0])
    z = randn(gen, 5, 130, 16)
    rel = torch.rand(5, 130, generator=gen)
    full, _ = ops.dpp_select(z, 30, relevance=rel)
    for b in range(5):
        assert torch.equal(ops.dpp_select(z[b : b + 1], 30, relevance=rel[b : b + 1])[0][0], full[b])


@pytest.mark.parametrize("B,N,k", [(3, 200, 40), (1, 300, 200)])
def test_thread_count_does_not_matter(gen, B, N, k):
    """Rows in parallel (B >= threads) or one after the other with a threaded GEMM (B = 1);
    k = 200 also runs past the cache bound (cleared, rows recomputed)."""
    x = randn(gen, B, N, 256)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, g1 = ops.dpp_select(x, k)
    finally:
        torch.set_num_threads(n)
    many, g2 = ops.dpp_select(x, k)
    assert torch.equal(one, many) and torch.equal(g1, g2)
    ridx, rgains = reference.dpp_select(x, k)
    assert_same_picks(x, None, many, g2, ridx, rgains)


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda x: ops.dpp_select(x[0], 3), ValueError, "features must have shape"),
        (lambda x: ops.dpp_select(x, 11), ValueError, "k=11"),
        (lambda x: ops.dpp_select(x, -1), ValueError, "k=-1"),
        (lambda x: ops.dpp_select(x, 3.0), TypeError, "k must be a Python int"),
        (lambda x: ops.dpp_select(x.long(), 3), TypeError, "features must be a floating"),
        (lambda x: ops.dpp_select(x, 3, relevance=torch.ones(2, 9)), ValueError, "relevance must have shape"),
        (lambda x: ops.dpp_select(x, 3, relevance=torch.ones(2, 10, dtype=torch.long)), TypeError, "relevance"),
        (lambda x: ops.dpp_select(x, 3, mask=torch.ones(2, 10)), TypeError, "mask"),
        (lambda x: ops.dpp_select(x, 3, mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "mask"),
        (lambda x: ops.dpp_select(torch.where(torch.arange(10)[None, :, None] == 4, float("nan"), x), 3),
         ValueError, "features has a non-finite"),
        (lambda x: ops.dpp_select(x, 3, relevance=torch.full((2, 10), float("inf"))), ValueError,
         "relevance has a non-finite"),
        (lambda x: ops.dpp_select(x, 3, mask=torch.ones(2, 10, dtype=torch.bool, device="meta")), ValueError,
         "mask is on meta"),
    ],
)
def test_bad_input_raises(call, exc, needle):
    x = torch.randn(2, 10, 4)
    with pytest.raises(exc, match="tokenreduce.dpp_select") as info:
        call(x)
    assert needle in str(info.value)


def test_fake_and_compile_fullgraph(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        idx, gains = ops.dpp_select(torch.empty(2, 30, 8), 5, relevance=torch.empty(2, 30))
        assert idx.shape == (2, 5) and idx.dtype == torch.long and gains.dtype == torch.float32

    def pick(x, rel):
        idx, gains = ops.dpp_select(x * 2.0, 7, relevance=rel.abs())
        return idx.sort(1).values, gains.sum(1)

    x = randn(gen, 2, 33, 16)
    rel = torch.rand(2, 33, generator=gen)
    compiled = torch.compile(pick, fullgraph=True, backend="inductor")
    a, b = compiled(x, rel)
    ea, eb = pick(x, rel)
    assert torch.equal(a, ea)
    torch.testing.assert_close(b, eb)


def test_opcheck(gen):
    x = randn(gen, 2, 20, 8)
    torch.library.opcheck(torch.ops.tokenreduce.dpp_select.default, (x, 5, torch.rand(2, 20, generator=gen), None),
                          test_utils=("test_schema", "test_faketensor"))
