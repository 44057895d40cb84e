"""NaN / inf / empty-input behaviour of the ops, as the README's table states it."""
import math

import pytest
import torch

from tokenreduce import ops, reference


@pytest.mark.parametrize("Nk", [7, 5000], ids=["single-pass", "two-pass"])
@pytest.mark.parametrize("where", ["q", "scale"])
def test_attention_nan_propagates_to_out_and_scores(Nk, where):
    g = torch.Generator().manual_seed(Nk)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, Nk, 8, generator=g),
               torch.randn(1, 2, Nk, 8, generator=g))
    scale = None
    if where == "q":
        q[0, 0, 1, 3] = math.nan          # one row of one head is NaN
    else:
        scale = math.nan                   # every row is NaN
    out, scores = ops.attention_with_scores(q, k, v, scale=scale)
    ref_out, ref_scores = reference.attention_with_scores(q, k, v, scale=scale)
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out))
    assert bool(torch.isnan(scores).all()) and bool(torch.isnan(ref_scores).all())
    if where == "q":   # the other rows are untouched
        assert not bool(torch.isnan(out[0, 0, 0]).any()) and bool(torch.isnan(out[0, 0, 1]).all())
        torch.testing.assert_close(out[0, 1], ref_out[0, 1], atol=1e-5, rtol=1e-4)


def test_attention_rows_without_keys_are_zero_not_nan():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    bias = torch.full((1, 3), -math.inf)
    out, scores = ops.attention_with_scores(q, k, v, key_bias=bias)
    assert bool((out == 0).all()) and bool((scores == 0).all())
    out, _ = ops.attention_with_scores(q, k, v, causal=True)   # Nq > Nk: the first row sees nothing
    assert bool((out[0, 0, 0] == 0).all()) and not bool(torch.isnan(out).any())
