import os
import sys
import math

import pytest
import torch

from tokenreduce import methods, ops
from tokenreduce.testing.authors.eager_attention import eager_vit_probs
from tokenreduce.testing.authors.vflowopt import (patch_entropy_authors, vflowopt_importance_authors,
                                                  vflowopt_merge_authors)
from tokenreduce.testing.synthetic import vit_layer_qkv
from tokenreduce.methods.vflowopt import patch_entropy
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap

A = 17.386981849158786


def run(B, N, D, keep=None, ratio=None, a=A, seed=0, dtype=torch.float32, H=8, Dh=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    q, k, v = vit_layer_qkv(B, N, H, Dh, seed + 1, dtype=dtype)
    _, rec = ops.attention_with_scores(q, k, v)
    m = methods.build("vflowopt", keep=keep, ratio=ratio, a=a)
    red = m(methods.Context(x=x, attn_received={-2: rec}))
    h = w = int(math.isqrt(N))
    kept, L, C = m.counts(N, h, w)
    imp = vflowopt_importance_authors(eager_vit_probs(q, k))
    return red, vflowopt_merge_authors(x, imp, h, w, a, L), (kept, L, C)


def compare(red, auth):
    for b, (toks, pos) in enumerate(auth):
        valid = red.index[b] >= 0
        assert torch.equal(red.index[b][valid], pos)
        torch.testing.assert_close(red.tokens[b][valid].float(), toks, atol=1e-5, rtol=1e-5)
        assert (red.tokens[b][~valid] == 0).all() and (red.size[b][~valid] == 0).all()


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", [192, 64])
def test_matches_authors(B, keep):
    red, auth, (kept, L, C) = run(B, 576, 256, keep=keep, seed=B + keep)
    assert C == 4 and red.tokens.shape == (B, keep, 256)
    check_reduction(red, B, 576, keep, 256)
    compare(red, auth)
    assert torch.allclose(red.size.sum(1), torch.full((B,), 576.0))     # every token accounted for


def test_authors_ratio_budget_and_small_cells():
    red, auth, (kept, L, C) = run(2, 576, 64, ratio=0.11661529508161146, a=5.0, seed=3)
    assert L == round(576 * (1 - 0.11661529508161146)) + int(576 / 25) and C == 25
    compare(red, auth)


def test_empty_cells_are_padding():
    red, auth, (kept, L, C) = run(2, 576, 32, keep=560, a=3.0, seed=4)  # 80 pruned tokens, 64 cells
    assert any(len(p) < red.index.shape[1] for _, p in auth)
    compare(red, auth)


def test_clip_width_and_cls():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 577, 1024, generator=g)
    q, k, v = vit_layer_qkv(1, 577, 16, 64, 8)
    _, rec = ops.attention_with_scores(q, k, v)
    red = methods.build("vflowopt", keep=128)(methods.Context(x=x, has_cls=True, attn_received={-2: rec}))
    imp = vflowopt_importance_authors(eager_vit_probs(q, k))[:, 1:]
    kept, L, C = methods.build("vflowopt", keep=128).counts(576, 24, 24)
    (toks, pos), = vflowopt_merge_authors(x[:, 1:], imp, 24, 24, A, L)
    assert red.index[0, 0] == 0 and torch.equal(red.tokens[0, 0], x[0, 0])
    valid = red.index[0, 1:] >= 0
    assert torch.equal(red.index[0, 1:][valid] - 1, pos)
    torch.testing.assert_close(red.tokens[0, 1:][valid], toks, atol=1e-5, rtol=1e-5)


def test_entropy_matches_authors():
    g = torch.Generator().manual_seed(1)
    px = torch.rand(2, 3, 336, 336, generator=g)
    assert torch.allclose(patch_entropy(px, 14), patch_entropy_authors(px, 14), atol=1e-5)
    x = torch.randn(2, 576, 16)
    rec = torch.softmax(torch.randn(2, 576), -1)
    m = methods.build("vflowopt", keep=64, alpha_v=0.5)
    red = m(methods.Context(x=x, attn_received={-2: rec}, pixels=px))
    imp = rec + 0.5 * torch.softmax(patch_entropy_authors(px, 14), -1)
    kept, L, C = m.counts(576, 24, 24)
    compare(red, vflowopt_merge_authors(x, imp, 24, 24, A, L))
    with pytest.raises(ValueError, match="vflowopt.*pixels"):
        m(methods.Context(x=x, attn_received={-2: rec}))


def test_batch_equals_per_sample():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 576, 32, generator=g)
    rec = torch.softmax(torch.randn(3, 576, generator=g) * 2, -1)
    m = methods.build("vflowopt", keep=64)
    full = m(methods.Context(x=x, attn_received={-2: rec}))
    for b in range(3):
        one = m(methods.Context(x=x[b:b + 1], attn_received={-2: rec[b:b + 1]}))
        assert torch.equal(one.index, full.index[b:b + 1])
        torch.testing.assert_close(one.tokens, full.tokens[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    ref, _, _ = run(2, 576, 64, keep=128, seed=5)
    red, _, _ = run(2, 576, 64, keep=128, seed=5, dtype=dtype)
    assert red.tokens.dtype == dtype and overlap(red.index, ref.index) >= 0.9


def test_errors():
    x = torch.randn(1, 576, 16)
    check_errors("vflowopt", lambda: methods.Context(x=x))
    with pytest.raises(ValueError, match="vflowopt.*cells"):
        methods.build("vflowopt", keep=4).keep_tokens(576)
