import pytest
import torch

from _inputs import clip1, clip3, ctx_of, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.visionzip import clip_encoder_forward, visionzip
from tokenreduce.methods import Context, build
from tokenreduce.methods.visionzip import split_budget


def test_split_presets():
    assert [split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(96) == (81, 15) and split_budget(1) == (1, 0)


@pytest.mark.parametrize("keep", [64, 128, 192])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(clip1, clip3, B, keep):
    d = clip1 if B == 1 else clip3
    red = build("visionzip", keep=keep)(ctx_of(d))
    dom, con = split_budget(keep)
    ref = visionzip(d.x, d.cls_heads[22], d.keys, dom, con)
    assert red.tokens.shape == ref.shape == (B, keep, 1024)      # [CLS] counts in keep
    torch.testing.assert_close(red.tokens, ref, rtol=1e-5, atol=1e-5)
    # provenance: every image token is in exactly one output slot; sizes add up
    assert (red.source >= 0).all() and red.size.sum(1).eq(577).all()
    assert (red.size[:, :dom] == 1).all()


def test_entry_point_budget(clip1):
    """visionzip(model, dominant=54, contextual=10): main.py passes 54 - 1 to the encoder, which
    keeps [CLS] + 53 + 10; all 64 go into the projector (issue 14)."""
    m = build("visionzip", keep=64)
    assert m.projects_cls and m.keep_tokens(576) == 63
    red = m(ctx_of(clip1))
    assert red.tokens.shape[1] == 64 and (red.index[0, 0] == 0) and (red.index[0, 1:54] > 0).all()
    assert (red.size[:, 54:] > 1).any()                      # the 10 contextual tokens merge the rest
    ref = clip_encoder_forward(clip1.x, clip1.cls_heads[22], clip1.keys, 53, 10)
    torch.testing.assert_close(red.tokens, ref, rtol=1e-5, atol=1e-5)
    explicit = build("visionzip", dominant=54, contextual=10)(ctx_of(clip1))
    assert torch.equal(explicit.tokens, red.tokens)
    with pytest.raises(ValueError, match="visionzip.*keep=1 counts"):
        build("visionzip", keep=1).keep_tokens(576)
    with pytest.raises(ValueError, match="visionzip.*dominant"):
        build("visionzip", dominant=0, contextual=10)


def test_explicit_split_and_other_layer(clip1):
    red = build("visionzip", dominant=20, contextual=7, layer=-1)(ctx_of(clip1))
    ref = visionzip(clip1.x, clip1.cls_heads[23], clip1.keys, 20, 7)
    torch.testing.assert_close(red.tokens, ref, rtol=1e-5, atol=1e-5)


def test_batch_equals_per_sample_and_low_precision(clip3):
    m = build("visionzip", keep=64)
    full = m(ctx_of(clip3))
    for b in range(3):
        one = m(ctx_of(per_sample(clip3, b)))
        assert torch.equal(one.index[0], full.index[b]) and torch.equal(one.source[0], full.source[b])
        torch.testing.assert_close(one.tokens[0], full.tokens[b])
    for dt, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        low = m(ctx_of(clip3, dt))
        assert low.tokens.dtype == dt
        assert torch.equal(low.index[:, :54], full.index[:, :54])  # dominant picks: float32 scores
        # contextual assignment may flip on near-ties of key similarity in low precision
        agree = (low.source == full.source).float().mean()
        assert agree > 0.97, agree
        same = (low.source == full.source).all(dim=1)
        if same.any():
            torch.testing.assert_close(low.tokens[same].float(), full.tokens[same], atol=tol * 10, rtol=tol)


def test_errors(clip1):
    with pytest.raises(ValueError, match="visionzip.*together"):
        build("visionzip", dominant=10)
    with pytest.raises(ValueError, match="visionzip.*keys"):
        build("visionzip", keep=64)(Context(x=clip1.x, has_cls=True, cls_attn=clip1.cls_attn, num_layers=24))
    with pytest.raises(ValueError, match="visionzip.*CLS"):
        build("visionzip", keep=64)(Context(x=clip1.x[:, 1:], keys=clip1.keys[:, 1:]))
    with pytest.raises(ValueError, match="visionzip.*exceeds"):
        build("visionzip", dominant=570, contextual=10)(ctx_of(clip1))
