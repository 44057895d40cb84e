import pytest
import torch

from _inputs import clip1, clip3, ctx_of, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.vtc_cls import vtc_cls
from tokenreduce.methods import Context, build


@pytest.mark.parametrize("start", [12, 0, 20, -6])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(clip1, clip3, B, start):
    d = clip1 if B == 1 else clip3
    red = build("vtc-cls", keep=64, start_layer=start)(ctx_of(d))
    ref = vtc_cls(d.x, d.cls_heads, 24, start, 64)
    torch.testing.assert_close(red.tokens[:, 1:], ref, rtol=0, atol=0)


def test_declarations_batch_and_errors(clip3):
    m = build("vtc-cls", keep=32, start_layer=20)
    assert m.attention_layers(24) == [20, 21, 22]
    full = m(ctx_of(clip3))
    for b in range(3):
        assert torch.equal(m(ctx_of(per_sample(clip3, b))).index[0], full.index[b])
    assert torch.equal(m(ctx_of(clip3, torch.bfloat16)).index, full.index)
    with pytest.raises(ValueError, match="vtc-cls.*start_layer"):
        build("vtc-cls", keep=8, start_layer=23)(ctx_of(clip3))
    with pytest.raises(ValueError, match="vtc-cls.*num_layers"):
        m(Context(x=clip3.x, has_cls=True, cls_attn=clip3.cls_attn))
    with pytest.raises(ValueError, match=r"vtc-cls.*cls_attn\[20\]"):
        m(Context(x=clip3.x, has_cls=True, num_layers=24, cls_attn={21: clip3.cls_attn[21]}))
