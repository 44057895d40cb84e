import pytest
import torch

from tokenreduce.testing.authors.pool import pool_tokens
from tokenreduce.methods import Context, build


def _x(B=2, n=576, D=64, seed=0):
    return torch.randn(B, 1 + n, D, generator=torch.Generator().manual_seed(seed))


def test_random_is_seeded_and_batched():
    x = _x(3)
    a = build("random", keep=64, seed=1)(Context(x=x, has_cls=True))
    b = build("random", keep=64, seed=1)(Context(x=x, has_cls=True))
    c = build("random", keep=64, seed=2)(Context(x=x, has_cls=True))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert not torch.equal(a.index[0], a.index[1])             # independent rows
    assert (a.index[:, 1:].diff(dim=1) > 0).all() and (a.index[:, 0] == 0).all()
    assert a.tokens.shape == (3, 65, 64)


def test_uniform_grid():
    x = _x(2)
    red = build("uniform", keep=64)(Context(x=x, has_cls=True, grid=(24, 24)))
    pos = red.index[0, 1:] - 1
    rows, cols = pos // 24, pos % 24
    assert sorted(set(rows.tolist())) == [1, 4, 7, 10, 13, 16, 19, 22] == sorted(set(cols.tolist()))
    r2 = build("uniform", keep=100)(Context(x=x[:, 1:]))   # not a square: raster spacing
    assert r2.index.shape == (2, 100) and (r2.index.diff(dim=1) > 0).all()
    with pytest.raises(ValueError, match="uniform.*grid"):
        build("uniform", keep=4)(Context(x=x[:, :50]))


@pytest.mark.parametrize("keep,stride", [(144, 2), (64, 3), (36, 4), (9, 8), (1, 24)])
def test_pool_matches_avg_pool(keep, stride):
    x = _x(2, D=32)
    red = build("pool", keep=keep)(Context(x=x, has_cls=True, grid=(24, 24)))
    torch.testing.assert_close(red.tokens[:, 1:], pool_tokens(x[:, 1:], 24, 24, stride))
    assert (red.index[:, 1:] == -1).all() and (red.index[:, 0] == 0).all()
    assert (red.size[:, 1:] == stride * stride).all()
    cell = red.source[0, 1:].view(24, 24)
    assert cell[0, 0] == 1 and cell[-1, -1] == keep


def test_pool_rect_grid_and_errors():
    x = _x(1, D=16)
    red = build("pool", out_grid=(12, 16))(Context(x=x[:, 1:], grid=(24, 24)))
    assert red.tokens.shape == (1, 192, 16)
    # a non-square keep pools to the most square factorisation: 128 -> 8 x 16
    red = build("pool", keep=128)(Context(x=x[:, 1:]))
    want = torch.nn.functional.adaptive_avg_pool2d(x[:, 1:].transpose(1, 2).reshape(1, 16, 24, 24), (8, 16))
    torch.testing.assert_close(red.tokens, want.reshape(1, 16, 128).transpose(1, 2))
    assert build("pool", keep=28).keep_tokens(576) == 28
    with pytest.raises(ValueError, match="pool.*square grid"):   # 575 tokens have no grid
        build("pool", keep=64)(Context(x=x[:, 2:]))
    low = build("pool", keep=64)(Context(x=x.bfloat16(), has_cls=True))
    assert low.tokens.dtype == torch.bfloat16


@pytest.mark.parametrize("budget,grid,out", [(dict(ratio=0.9), (4, 4), (3, 4)), (dict(keep=192), (24, 24), (12, 16)),
                                             (dict(keep=8), (4, 4), (2, 4)), (dict(keep=28), (24, 24), (4, 7))])
def test_pool_takes_the_most_square_grid_that_fits(budget, grid, out):
    m = build("pool", **budget)
    n = grid[0] * grid[1]
    red = m(Context(x=torch.randn(2, n + 1, 8), has_cls=True, grid=grid))
    assert m._out_grid(n, grid) == out and red.tokens.shape[1] == 1 + out[0] * out[1]


def test_pool_keep_without_a_fitting_grid_is_refused():
    with pytest.raises(ValueError, match="keep=14 has no factorisation"):
        build("pool", keep=14)(Context(x=torch.randn(1, 17, 8), has_cls=True, grid=(4, 4)))
