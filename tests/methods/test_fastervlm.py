import pytest
import torch

from _inputs import clip1, clip3, ctx_of, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.fastervlm import fastervlm
from tokenreduce.methods import build


@pytest.mark.parametrize("keep", [64, 128, 192])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(clip1, clip3, B, keep):
    d = clip1 if B == 1 else clip3
    red = build("fastervlm", keep=keep)(ctx_of(d))
    ref = fastervlm(d.x[:, 1:], d.cls_heads[22][:, :, 1:], keep)
    assert red.tokens.shape == (B, 1 + keep, 1024)
    torch.testing.assert_close(red.tokens[:, 1:], ref, rtol=0, atol=0)
    torch.testing.assert_close(red.tokens[:, 0], d.x[:, 0], rtol=0, atol=0)
    # index: spatial order, [CLS] first
    assert (red.index[:, 0] == 0).all() and (red.index[:, 1:].diff(dim=1) > 0).all()


def test_batch_equals_per_sample_and_low_precision(clip3):
    m = build("fastervlm", keep=64)
    full = m(ctx_of(clip3))
    for b in range(3):
        one = m(ctx_of(per_sample(clip3, b)))
        assert torch.equal(one.index[0], full.index[b])
    for dt in (torch.float16, torch.bfloat16):
        low = m(ctx_of(clip3, dt))
        assert low.tokens.dtype == dt
        assert torch.equal(low.index, full.index)  # scores stay float32: same picks


def test_layer_option_and_errors(clip1):
    red = build("fastervlm", keep=8, layer=-1)(ctx_of(clip1))
    ref = fastervlm(clip1.x[:, 1:], clip1.cls_heads[23][:, :, 1:], 8)
    torch.testing.assert_close(red.tokens[:, 1:], ref)
    with pytest.raises(ValueError, match="fastervlm.*cls_attn"):
        build("fastervlm", keep=8)(ctx_of(clip1).__class__(x=clip1.x, has_cls=True))
    with pytest.raises(ValueError, match="fastervlm.*CLS"):
        build("fastervlm", keep=8)(ctx_of(clip1).__class__(x=clip1.x[:, 1:]))
    with pytest.raises(ValueError, match="fastervlm.*keep"):
        build("fastervlm", keep=0)
