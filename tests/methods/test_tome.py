import pytest
import torch

from _inputs import clip1, clip3, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.tome import tome_merge
from tokenreduce.methods import Context, build


def _ctx(d, dtype=torch.float32, **kw):
    return Context(x=d.x.to(dtype), keys=d.keys.to(dtype), has_cls=True, **kw)


@pytest.mark.parametrize("r", [1, 16, 100, 288])
@pytest.mark.parametrize("B", [1, 3])
def test_one_block_matches_authors(clip1, clip3, B, r):
    d = clip1 if B == 1 else clip3
    red = build("tome", r=r)(_ctx(d))
    ref, ref_size = tome_merge(d.x, d.keys, r, class_token=True)
    torch.testing.assert_close(red.tokens, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(red.size, ref_size[..., 0])
    assert red.tokens.shape == (B, 577 - r, 1024)
    # index: the representative of each slot is one of its members; [CLS] stays first
    assert (red.index[:, 0] == 0).all()
    assert torch.equal(red.source.gather(1, red.index), torch.arange(577 - r).expand(B, -1))
    single = red.size == 1
    torch.testing.assert_close(red.tokens[single], d.x.gather(
        1, red.index[..., None].expand(-1, -1, 1024))[single])


def test_sizes_chain_over_blocks(clip1):
    """Two blocks with sizes carried on equal two ToMe blocks (merge_wavg with size)."""
    m = build("tome", r=50)
    first = m(_ctx(clip1))
    ref, ref_size = tome_merge(clip1.x, clip1.keys, 50)
    keys2 = torch.randn(1, 527, 64, generator=torch.Generator().manual_seed(3))
    second = m(Context(x=first.tokens, keys=keys2, has_cls=True, size=first.size))
    ref2, ref_size2 = tome_merge(ref, keys2, 50, size=ref_size)
    torch.testing.assert_close(second.tokens, ref2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.size, ref_size2[..., 0])
    torch.testing.assert_close(m.key_bias(second.size), second.size.log())
    assert m.proportional_attention


def test_keep_schedule_reaches_budget(clip1):
    m = build("tome", keep=64)
    assert m.reduce_layers(24) == list(range(24))
    x, keys, size, state = clip1.x, clip1.keys, None, {}
    g = torch.Generator().manual_seed(5)
    for layer in range(24):
        red = m(Context(x=x, keys=keys, has_cls=True, size=size, layer=layer, num_layers=24, state=state))
        x, size = red.tokens, red.size
        keys = torch.randn(1, x.shape[1], 64, generator=g)
    assert x.shape[1] == 1 + 64 == 1 + m.keep_tokens(576)
    assert size.sum() == 577
    assert build("tome", r=16).keep_tokens(576) == 576 - 16 * 24


def test_batch_low_precision(clip3):
    m = build("tome", r=16)
    full = m(_ctx(clip3))
    for b in range(3):
        torch.testing.assert_close(m(_ctx(per_sample(clip3, b))).tokens[0], full.tokens[b])
    for dt, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        low = m(_ctx(clip3, dt))
        same = (low.source == full.source).all(dim=1)
        assert same.any()  # tie-free inputs: the matching agrees
        torch.testing.assert_close(low.tokens[same].float(), full.tokens[same], atol=tol, rtol=tol)


def test_errors(clip1):
    with pytest.raises(ValueError, match="tome.*not both"):
        build("tome", r=4, keep=64)
    with pytest.raises(ValueError, match="tome.*r must"):
        build("tome", r=-1)
    with pytest.raises(ValueError, match="tome.*budget"):
        build("tome")
    with pytest.raises(ValueError, match="tome.*keys"):
        build("tome", r=4)(Context(x=clip1.x, has_cls=True))
