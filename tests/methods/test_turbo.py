import pytest
import torch

from _inputs import clip1, clip3, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.turbo import turbo_one
from tokenreduce.methods import Context, build


def _ctx(d, layer=5, dtype=torch.float32, **kw):
    return Context(x=d.x.to(dtype), keys=d.keys.to(dtype), has_cls=True, cls_attn=d.cls_attn,
                   layer=layer, num_layers=24, **kw)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_paper_loop(clip1, clip3, B, alpha):
    d = clip1 if B == 1 else clip3
    red = build("turbo", r=16, alpha=alpha)(_ctx(d))
    for b in range(B):
        ref, size = turbo_one(d.x[b], d.keys[b], d.cls_attn[5][b], 16, alpha)
        torch.testing.assert_close(red.tokens[b], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(red.size[b], size)
    assert (red.index[:, 0] == 0).all()


def test_alpha_zero_is_tome(clip1):
    """Without the semantic term the ranking is ToMe's redundancy."""
    a = build("turbo", r=40, alpha=0.0)(_ctx(clip1))
    b = build("tome", r=40)(Context(x=clip1.x, keys=clip1.keys, has_cls=True))
    torch.testing.assert_close(a.tokens, b.tokens)


def test_batch_and_errors(clip3):
    m = build("turbo", keep=64)
    full = m(_ctx(clip3, layer=20, state={}))
    n = full.tokens.shape[1] - 1
    assert n == 576 - (576 - 64 + 3) // 4   # ceil((576 - 64) / (24 - 20))
    for b in range(3):
        torch.testing.assert_close(m(_ctx(per_sample(clip3, b), layer=20, state={})).tokens[0], full.tokens[b])
    low = m(_ctx(clip3, layer=20, dtype=torch.bfloat16, state={}))
    assert low.tokens.dtype == torch.bfloat16 and torch.isfinite(low.tokens.float()).all()
    with pytest.raises(ValueError, match=r"turbo.*cls_attn\[7\]"):
        m(Context(x=clip3.x, keys=clip3.keys, has_cls=True, layer=7, num_layers=24))
    with pytest.raises(ValueError, match="turbo.*CLS"):
        m(Context(x=clip3.x[:, 1:], keys=clip3.keys[:, 1:], layer=5))
