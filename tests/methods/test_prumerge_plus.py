import numpy as np
import pytest
import torch

from _inputs import clip1, clip3, ctx_of, per_sample  # noqa: F401 (fixtures)
from tokenreduce.testing.authors.prumerge_plus import outlier_ratio, prumerge_plus_one
from tokenreduce.methods import Context, build
from tokenreduce.methods.prumerge_plus import iqr_outliers


def test_iqr_outliers_match_numpy(clip3):
    a = clip3.cls_attn[23][:, 1:]
    mask = iqr_outliers(a)
    for b in range(3):
        assert mask[b].sum().item() / 576 == outlier_ratio(a[b])


@pytest.mark.parametrize("b", [0, 1, 2])
def test_equals_authors_at_their_count(clip3, b):
    """With keep = the authors' adaptive count (+ the extra token), the batched
    selection and merge are theirs."""
    d = per_sample(clip3, b)
    ref, kept = prumerge_plus_one(d.x[0, 1:], d.keys[0, 1:], d.cls_attn[23][0, 1:])
    red = build("prumerge+", keep=ref.shape[0])(ctx_of(d))
    assert torch.equal(red.index[0, 1:-1] - 1, kept)
    torch.testing.assert_close(red.tokens[0, 1:], ref, rtol=1e-4, atol=1e-4)
    assert red.index[0, -1] == -1


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_static_budget_batched(clip3, keep):
    m = build("prumerge+", keep=keep)
    full = m(ctx_of(clip3))
    assert full.tokens.shape == (3, 1 + keep, 1024)
    out_mask = iqr_outliers(clip3.cls_attn[23][:, 1:])
    for b in range(3):
        one = m(ctx_of(per_sample(clip3, b)))
        assert torch.equal(one.index[0], full.index[b])
        torch.testing.assert_close(one.tokens[0], full.tokens[b])
        kept = set((full.index[b, 1:-1] - 1).tolist())
        outl = set(torch.where(out_mask[b])[0].tolist())
        assert outl <= kept or len(kept) == keep - 1 and kept <= outl  # outliers come first
    assert (full.source[:, 1:] >= 1).all()          # every image token went somewhere
    assert torch.isfinite(full.tokens).all()
    low = m(ctx_of(clip3, torch.bfloat16))
    assert torch.equal(low.index, full.index)        # selection uses float32 attention
    assert low.tokens.dtype == torch.bfloat16


def test_errors(clip1):
    with pytest.raises(ValueError, match=r"prumerge\+.*>= 2"):
        build("prumerge+", keep=1)(ctx_of(clip1))
    with pytest.raises(ValueError, match=r"prumerge\+.*keys"):
        build("prumerge+", keep=8)(Context(x=clip1.x, has_cls=True, cls_attn=clip1.cls_attn, num_layers=24))


def test_keep_1_is_refused_when_built():
    import pytest
    from tokenreduce.methods import build

    with pytest.raises(ValueError, match="keep must be >= 2"):
        build("prumerge+", keep=1)
