import pytest
import torch

from tokenreduce.testing.authors.divprune import divprune, min_dist_objective
from tokenreduce.testing.synthetic import clip_like
from tokenreduce.methods import Context, build


@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(B):
    x = clip_like(B, 576, 1024, seed=21, layers=()).x
    red = build("divprune", keep=64)(Context(x=x, has_cls=True))
    picks = divprune(x[:, 1:], 64)
    # same set of picks (kept in spatial order here, in pick order by the authors)
    assert torch.equal(red.index[:, 1:] - 1, picks.sort(dim=1).values)
    torch.testing.assert_close(min_dist_objective(x[:, 1:], red.index[:, 1:] - 1),
                               min_dist_objective(x[:, 1:], picks))
    torch.testing.assert_close(red.tokens[:, 1:], x[:, 1:].gather(
        1, picks.sort(dim=1).values[..., None].expand(-1, -1, 1024)))


def test_batch_low_precision_and_no_cls():
    x = clip_like(3, 576, 1024, seed=22, layers=()).x[:, 1:]
    m = build("divprune", ratio=0.25)
    full = m(Context(x=x))
    assert full.tokens.shape == (3, 144, 1024)
    for b in range(3):
        assert torch.equal(m(Context(x=x[b:b + 1])).index[0], full.index[b])
    ref_obj = min_dist_objective(x, full.index)
    for dt in (torch.float16, torch.bfloat16):
        low = m(Context(x=x.to(dt)))
        # low precision may swap near-ties: compare the k-center objective
        torch.testing.assert_close(min_dist_objective(x, low.index), ref_obj, atol=0.02, rtol=0.02)


def test_errors():
    with pytest.raises(ValueError, match="divprune.*budget"):
        build("divprune")
    with pytest.raises(TypeError, match="divprune.*unknown option"):
        build("divprune", keep=4, colour="red")
    with pytest.raises(ValueError, match="divprune.*ctx.x"):
        build("divprune", keep=4)(Context(x=torch.zeros(4, 8)))
