import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.eager_attention import eager_vit_probs
from tokenreduce.testing.authors.hiprune import hiprune_authors, hiprune_ours
from tokenreduce.testing.synthetic import vit_layer_qkv
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap


def inputs(B, seed, N=577, D=1024, H=16, Dh=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    return x, vit_layer_qkv(B, N, H, Dh, seed + 1, dtype=dtype), vit_layer_qkv(B, N, H, Dh, seed + 2, dtype=dtype)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep,alpha", [(192, 0.1), (64, 0.1), (128, 0.5)])
def test_matches_authors(B, keep, alpha):
    x, sh, dp = inputs(B, seed=B * 100 + keep, D=64, H=8, Dh=32)
    red = hiprune_ours(x, sh, dp, keep, alpha)
    auth = hiprune_authors(x[:, 1:], eager_vit_probs(sh[0], sh[1]), eager_vit_probs(dp[0], dp[1]), keep, alpha)
    check_reduction(red, B, 577, keep + 1, 64)
    assert torch.equal(red.index[:, 0], torch.zeros(B, dtype=torch.long))        # [CLS] first
    assert torch.equal(red.index[:, 1:] - 1, auth)
    assert torch.equal(red.tokens[:, 1:], torch.gather(x[:, 1:], 1, auth[..., None].expand(-1, -1, 64)))


def test_full_width_clip_shapes():
    x, sh, dp = inputs(1, seed=3)                                   # 577 x 1024, 16 heads
    red = hiprune_ours(x, sh, dp, 128)
    auth = hiprune_authors(x[:, 1:], eager_vit_probs(sh[0], sh[1]), eager_vit_probs(dp[0], dp[1]), 128)
    assert torch.equal(red.index[:, 1:] - 1, auth)


def test_batch_equals_per_sample():
    x, sh, dp = inputs(3, seed=5, D=32, H=4, Dh=16)
    full = hiprune_ours(x, sh, dp, 64)
    for b in range(3):
        one = hiprune_ours(x[b:b + 1], tuple(t[b:b + 1] for t in sh), tuple(t[b:b + 1] for t in dp), 64)
        assert torch.equal(one.index, full.index[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    x, sh, dp = inputs(2, seed=6, D=32, H=4, Dh=16)
    ref = hiprune_ours(x, sh, dp, 192)
    red = hiprune_ours(x.to(dtype), tuple(t.to(dtype) for t in sh), tuple(t.to(dtype) for t in dp), 192)
    assert red.tokens.dtype == dtype and overlap(red.index, ref.index) >= 0.9


def test_no_cls_and_declarations():
    m = methods.build("hiprune", keep=64)
    assert m.attention_layers(24) == [8, -2] and m.stage == methods.Stage.PROJECTOR
    x = torch.randn(2, 576, 16)
    red = m(methods.Context(x=x, attn_received={8: torch.rand(2, 576), -2: torch.rand(2, 576)}))
    check_reduction(red, 2, 576, 64, 16)
    with pytest.raises(ValueError, match="hiprune.*alpha"):
        methods.build("hiprune", keep=8, alpha=1.0)(methods.Context(x=x, attn_received={8: torch.rand(2, 576), -2: torch.rand(2, 576)}))
    with pytest.raises(ValueError, match="hiprune"):
        methods.build("hiprune", keep=8, object_layer=0)


def test_errors():
    x = torch.randn(1, 577, 16)
    check_errors("hiprune", lambda: methods.Context(x=x, has_cls=True, attn_received={8: torch.rand(1, 577)}))
    with pytest.raises(ValueError, match="hiprune.*grid"):
        methods.build("hiprune", keep=8)(methods.Context(x=x, has_cls=True, grid=(20, 20),
                                            attn_received={8: torch.rand(1, 577), -2: torch.rand(1, 577)}))
