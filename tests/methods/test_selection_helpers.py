"""The cheaper selection helpers (`top_positions`, `gather_rows`, `keep_positions`) give exactly
what the plain ones give, on both sides of `top_positions`' sort / int64-key switch, with ties,
signed zeros, NaN and -inf; and pool's exact-window Reduction equals `assemble`'s."""
from __future__ import annotations

import pytest
import torch

from tokenreduce.methods import Context, build, helpers


def _scores(B, N, seed=0):
    s = torch.randn(B, N, generator=torch.Generator().manual_seed(seed))
    s[:, ::7] = 0.25                      # ties
    s[:, 1::9] = -0.0                     # signed zeros tie with +0.0
    s[:, 2::9] = 0.0
    s[:, 6] = -float("inf")
    s[0, 3] = float("nan")
    s[-1, 5] = -float("nan")
    return s


@pytest.mark.parametrize("B,N", [(1, 10), (3, 577), (16, 576)])
@pytest.mark.parametrize("sort_max", [0, 10 ** 9, None])    # key path, sort path, the default switch
def test_top_positions_is_the_sorted_topk_set(B, N, sort_max):
    s = _scores(B, N)
    for k in (1, N // 3, N):
        ref = helpers.topk_indices(s, k).sort(dim=1).values
        assert torch.equal(helpers.top_positions(s, k, sort_max=sort_max), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_top_positions_low_precision(dtype):
    s = _scores(4, 600, seed=1).to(dtype)
    ref = helpers.topk_indices(s.float(), 50).sort(dim=1).values
    assert torch.equal(helpers.top_positions(s, 50, sort_max=0), ref)
    assert torch.equal(helpers.top_positions(s.float(), 50, sort_max=0), ref)


@pytest.mark.parametrize("B", [1, 3])
def test_gather_rows_equals_gather_tokens(B):
    h = torch.randn(B, 40, 8)
    views = [h, h[:, 5:30], h[:, 5:30, :4], h.transpose(0, 1)[:, :B], h[:, ::2], h.expand(2, -1, -1, -1)[1]]
    for x in views:
        idx = torch.randint(0, x.shape[1], (x.shape[0], 6))
        assert torch.equal(helpers.gather_rows(x, idx), helpers.gather_tokens(x, idx))


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_keep_positions_equals_keep_indices(cls, with_size, sort):
    B, N = 3, 30
    h = torch.randn(B, N + 4, 8)
    x = h[:, 2:2 + N]                                           # a strided slice, as the LLM stages pass
    size = torch.rand(B, N) + 0.5 if with_size else None
    ctx = Context(x=x, has_cls=cls, size=size)
    idx = torch.randn(B, N - int(cls)).argsort(dim=1)[:, :7]
    a = helpers.keep_indices(ctx, idx, sort=sort)
    b = helpers.keep_positions(ctx, idx, sort=sort)
    for f in ("tokens", "index", "source", "size"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert getattr(a, f).dtype == getattr(b, f).dtype, f


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_pool_exact_windows_equal_assemble(cls, B):
    x = torch.randn(B, 576 + int(cls), 16)
    ctx = Context(x=x, has_cls=cls)
    red = build("pool", keep=64)(ctx)
    cell = ((torch.arange(24) * 8 // 24)[:, None] * 8 + (torch.arange(24) * 8 // 24)[None, :]).reshape(-1)
    img = x[:, int(cls):].transpose(1, 2).reshape(B, 16, 24, 24).contiguous()
    pooled = torch.nn.functional.avg_pool2d(img, 3).reshape(B, 16, 64).transpose(1, 2)
    ref = helpers.assemble(ctx, pooled, torch.full((B, 64), -1), cell.expand(B, 576))
    for f in ("tokens", "index", "source", "size"):
        assert torch.equal(getattr(red, f), getattr(ref, f)), f
        assert getattr(red, f).dtype == getattr(ref, f).dtype, f


@pytest.mark.parametrize("helper", ["keep_positions", "keep_indices"])
@pytest.mark.parametrize("cls", [False, True])
def test_lazy_pruning_reduction_gathers_on_first_read(helper, cls):
    """Under Context.lazy_tokens a pruning Reduction holds no tokens until they are read, then
    the same tokens as the eager one; both say kept_rows. Assigning tokens clears kept_rows."""
    g = torch.Generator().manual_seed(3)
    B, N, D, K = 3, 37 + int(cls), 11, 9
    x = torch.randn(B, N, D, generator=g)
    idx = torch.rand(B, N - int(cls), generator=g).argsort(dim=1)[:, :K]
    fn = getattr(helpers, helper)
    eager = fn(Context(x=x, has_cls=cls), idx)
    lazy = fn(Context(x=x, has_cls=cls, lazy_tokens=True), idx)
    assert eager.kept_rows and lazy.kept_rows
    assert eager._tokens is not None and lazy._tokens is None
    assert torch.equal(lazy.index, eager.index) and torch.equal(lazy.source, eager.source)
    assert torch.equal(lazy.tokens, eager.tokens)
    assert torch.equal(lazy.tokens, helpers.gather_tokens(x, lazy.index))
    lazy.tokens = lazy.tokens * 2
    assert not lazy.kept_rows

