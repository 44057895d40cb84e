"""kcenter's `first="isolated"` on the CPU (csrc/kcenter/kcenter_cpu.cpp): the bounded
search (index neighbours, exact passes for the highest bounds, column chunks) against the
all-pairs path (TOKENREDUCE_KCENTER_ISOLATED=full) and the reference; and the pass kernels
(4 rows x 4 vectors up to three speculative candidates, 2 x 8 beyond) on the reference's
picks."""
import pytest
import torch

from tokenreduce import measure, ops, reference
from conftest import DTYPES, randn
from test_kcenter import assert_same_kcenter, distances


def assert_same_isolated(x, metric, mask, got, want, tol=1e-5):
    """Same first pick, or (an exact tie in the op's symmetric distances that the
    reference's GEMM, not symmetric bit for bit, may break either way) a pick whose nearest-
    neighbour distance (float64) is within tol of the best eligible one."""
    dist = distances(x, metric)
    eye = torch.eye(x.shape[1], dtype=torch.bool)
    nn = dist.masked_fill(eye, float("inf")).min(-1).values if x.shape[1] > 1 else \
        torch.zeros(x.shape[:2], dtype=torch.float64)
    if mask is not None:
        nn = nn.masked_fill(~mask, -float("inf"))
    for b in range(x.shape[0]):
        g, w = int(got[b]), int(want[b])
        assert mask is None or bool(mask[b, g])
        assert g == w or float(nn[b].max() - nn[b, g]) <= tol, (b, g, w)


def isolated_first(x, metric, mask=None, full=False, monkeypatch=None):
    """The op's first pick with first="isolated" (k = 1), by the bounded search or all pairs."""
    if full:
        monkeypatch.setenv("TOKENREDUCE_KCENTER_ISOLATED", "full")
    try:
        return ops.kcenter(x, 1, metric=metric, first="isolated", mask=mask)[0][:, 0]
    finally:
        if full:
            monkeypatch.delenv("TOKENREDUCE_KCENTER_ISOLATED")


def clustered(gen, B, N, D, groups):
    centres = randn(gen, B, groups, D)
    x = centres.repeat_interleave((N + groups - 1) // groups, dim=1)[:, :N]
    return x + 0.3 * randn(gen, B, N, D)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["gauss", "clustered", "lowrank"])
@pytest.mark.parametrize("B,N,D", [(2, 577, 64), (3, 130, 33), (1, 67, 256)])
def test_bounded_search_equals_all_pairs(gen, monkeypatch, metric, kind, B, N, D):
    if kind == "gauss":
        x = randn(gen, B, N, D)
    elif kind == "clustered":
        x = clustered(gen, B, N, D, groups=max(2, N // 20))
    else:
        x = randn(gen, B, N, 4) @ randn(gen, B, 4, D) + 0.05 * randn(gen, B, N, D)
    mask = torch.rand(B, N, generator=gen) > 0.25
    mask[:, 5] = True
    for m in (None, mask):
        fast = isolated_first(x, metric, m)
        full = isolated_first(x, metric, m, full=True, monkeypatch=monkeypatch)
        ridx, _ = reference.kcenter(x, 1, metric=metric, first="isolated", mask=m)
        assert_same_isolated(x, metric, m, fast, ridx[:, 0])
        assert_same_isolated(x, metric, m, full, ridx[:, 0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_bounded_search_ties_go_to_the_smaller_index(gen, metric):
    """Tokens 0..200 are duplicates (nn = 0); 201 and 202 are each other's nearest token,
    far from the rest: their nn tie exactly (the pair distance is symmetric bit for bit)
    and the smaller index wins. The reference's GEMM need not be symmetric: 201 or 202."""
    B, N, D = 2, 203, 40
    x = randn(gen, B, N, D)
    x[:, 100:200] = x[:, 0:100]
    x[:, 200] = x[:, 0]
    far = 50 * randn(gen, B, D)
    x[:, 201] = far
    x[:, 202] = far + 25 * randn(gen, B, D)
    ridx, _ = reference.kcenter(x, 1, metric=metric, first="isolated")
    assert bool(((ridx[:, 0] == 201) | (ridx[:, 0] == 202)).all())
    assert torch.equal(isolated_first(x, metric), torch.full((B,), 201))
    if metric == "cosine":
        return  # 1 - cos of a token with itself is only ~0 (rounding): no exact tie
    # all tokens duplicated: every l2 nn is exactly 0, the first eligible token wins
    y = torch.cat([x[:, :100], x[:, :100]], dim=1)
    mask = torch.ones(B, 200, dtype=torch.bool)
    mask[:, :7] = False
    assert torch.equal(isolated_first(y, metric, mask), torch.full((B,), 7))


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 9, 33])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_bounded_search_small_rows(gen, monkeypatch, metric, N):
    x = randn(gen, 3, N, 7)
    ridx, _ = reference.kcenter(x, 1, metric=metric, first="isolated")
    assert_same_isolated(x, metric, None, isolated_first(x, metric), ridx[:, 0])
    full = isolated_first(x, metric, full=True, monkeypatch=monkeypatch)
    assert_same_isolated(x, metric, None, full, ridx[:, 0])
    if N == 2:  # both tokens' nn is the one pair distance: an exact tie, the smaller index
        assert torch.equal(isolated_first(x, metric), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bounded_search_dtypes_and_threads(gen, dtype):
    x = clustered(gen, 2, 300, 96, groups=12).to(dtype)
    ridx, rmd = reference.kcenter(x, 20, first="isolated")
    with measure.threads(1):
        one = ops.kcenter(x, 20, first="isolated")
        single = [ops.kcenter(x[b:b + 1], 20, first="isolated") for b in range(2)]
    with measure.threads(2):
        two = ops.kcenter(x, 20, first="isolated")
        split = [ops.kcenter(x[b:b + 1], 20, first="isolated") for b in range(2)]  # B < threads
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for b in range(2):
        assert torch.equal(single[b][0][0], one[0][b]) and torch.equal(split[b][0][0], one[0][b])
    assert_same_kcenter(x, one[0], one[1], ridx, rmd, "cosine", tie_tol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("n_elig", [2, 4, 5, 8, 9, 12])
def test_pass_kernels_with_few_candidates(gen, metric, n_elig):
    """Few eligible tokens left: passes with 0..7 speculative candidates (both kernels)."""
    B, N, D = 3, 90, 50
    x = randn(gen, B, N, D)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=gen)[:n_elig]] = True
    first = mask.float().argmax(1)
    idx, md = ops.kcenter(x, n_elig, metric=metric, first=first, mask=mask)
    ridx, rmd = reference.kcenter(x, n_elig, metric=metric, first=first, mask=mask)
    assert_same_kcenter(x, idx, md, ridx, rmd, metric, tie_tol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_pass_kernels_duplicates_tie_to_smaller_index(gen, metric):
    """Duplicates in passes of both kernels (2-row and 4-row blocks, odd N): ties by index."""
    B, N, D = 2, 131, 70
    x = randn(gen, B, N, D)
    x[:, 101:131] = x[:, 1:31]
    idx, md = ops.kcenter(x, 60, metric=metric)
    ridx, rmd = reference.kcenter(x, 60, metric=metric)
    assert torch.equal(idx, ridx)
    assert_same_kcenter(x, idx, md, ridx, rmd, metric, tie_tol=0)
