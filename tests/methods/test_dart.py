import pytest
import torch

from tokenreduce.testing.authors.dart import dart
from tokenreduce.methods import Context, build
from tokenreduce.methods.dart import pivot_quota


def _inputs(B, n=576, T=40, D=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, D, generator=g), torch.randn(B, n, 128, generator=g),
            torch.randn(B, T, D, generator=g))


@pytest.mark.parametrize("topk", [7, 15, 23])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(B, topk):
    x, k, text = _inputs(B, seed=topk)
    keep = 4 + 8 * topk
    red = build("dart", keep=keep)(Context(x=x, keys=k, text=text))
    ref = dart(x, k, text, text, 4, 4, topk, order="sorted")
    assert torch.equal(red.index, ref)
    assert red.tokens.shape == (B, keep, 1024)
    # the authors' own (set) pivot order only moves contested tokens between pivots
    ref_set = dart(x, k, text, text, 4, 4, topk, order="set")
    for b in range(B):
        common = len(set(ref_set[b].tolist()) & set(red.index[b].tolist()))
        assert common >= 0.85 * keep, (common, keep)


def test_quota_sums_to_keep_and_options():
    for keep in (64, 128, 192, 5, 3):
        p, q = pivot_quota(keep, 4, 4)
        assert p + sum(q) == keep
    x, k, text = _inputs(2, seed=3)
    m = build("dart", keep=64, text_pivots=0, layer=3)
    assert m.reduce_layers(32) == [2]
    red = m(Context(x=x, keys=k))                      # no text needed
    assert red.tokens.shape == (2, 64, 1024)
    assert torch.equal(red.index, dart(x, k, text[:, :0], text[:, :0], 4, 0, 15, order="sorted"))
    low = build("dart", keep=64)(Context(x=x.bfloat16(), keys=k.bfloat16(), text=text.bfloat16()))
    ref = build("dart", keep=64)(Context(x=x, keys=k, text=text))
    overlap = (low.index[..., None] == ref.index[:, None, :]).any(-1).float().mean()
    assert overlap > 0.9


def test_errors():
    x, k, text = _inputs(1, seed=4)
    with pytest.raises(ValueError, match="dart.*ctx.text"):
        build("dart", keep=64)(Context(x=x, keys=k))
    with pytest.raises(ValueError, match="dart.*keys"):
        build("dart", keep=64)(Context(x=x, text=text))
    with pytest.raises(ValueError, match="dart.*layer"):
        build("dart", keep=64, layer=0).reduce_layers(32)
