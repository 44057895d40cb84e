import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.holov import holov_authors, holov_ours
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap


def inputs(B, N, D, seed, hot=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    logits = torch.randn(B, N, generator=g) * 2
    if hot is not None:
        logits[:, hot] += 6.0                      # one crop takes most of the attention
    return x, torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("B,keep,D", [(1, 192, 1024), (3, 128, 256), (3, 64, 256)])
def test_matches_authors(B, keep, D):
    x, a = inputs(B, 576, D, seed=B + keep)
    red = holov_ours(x, a, 16, keep)
    toks, pos = holov_authors(x, a, 16, keep)
    check_reduction(red, B, 576, keep, D)
    assert torch.equal(red.index, pos)             # same order: crop order, top-k order inside
    torch.testing.assert_close(red.tokens, toks)


def test_full_crop_and_padding_match_authors():
    x, a = inputs(2, 576, 64, seed=3, hot=slice(0, 36))
    red = holov_ours(x, a, 16, 192)
    toks, pos = holov_authors(x, a, 16, 192)
    assert (pos == -1).any()                       # the authors zero-pad: crop 0 overflowed
    assert torch.equal(red.index, pos)
    torch.testing.assert_close(red.tokens, toks)
    assert torch.equal(red.size == 0, pos == -1)


def test_uneven_crops_with_cls():
    x, a = inputs(2, 100, 32, seed=4)              # 100 = 7 crops of 15 and 14
    xc = torch.cat([torch.randn(2, 1, 32), x], 1)
    ac = torch.cat([torch.rand(2, 1), a], 1)
    red = methods.build("holov", keep=30, crops=7)(methods.Context(x=xc, has_cls=True, cls_attn={-2: ac}))
    toks, pos = holov_authors(x, a, 7, 30)
    check_reduction(red, 2, 101, 31, 32)
    assert torch.equal(red.index[:, 1:], torch.where(pos >= 0, pos + 1, pos))


def test_batch_equals_per_sample():
    x, a = inputs(3, 576, 64, seed=5)
    full = holov_ours(x, a, 16, 64)
    for b in range(3):
        one = holov_ours(x[b:b + 1], a[b:b + 1], 16, 64)
        assert torch.equal(one.index, full.index[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    x, a = inputs(2, 576, 256, seed=6)
    ref = holov_ours(x, a, 16, 128)
    red = holov_ours(x.to(dtype), a.to(dtype), 16, 128)
    assert red.tokens.dtype == dtype and overlap(red.index, ref.index) >= 0.9


def test_errors():
    x = torch.randn(1, 576, 16)
    check_errors("holov", lambda: methods.Context(x=x))
    with pytest.raises(ValueError, match="holov"):
        methods.build("holov", keep=8, crops=0)
