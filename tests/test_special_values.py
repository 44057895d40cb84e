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


def test_huge_finite_rows_are_not_taken_for_non_finite():
    """|x| ~ 1e20 in float32: the squared norm overflows, the row is still finite (cosine is
    scale-free, so the decisions equal those on x / 1e20)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 16, generator=g)
    t, s = torch.tensor([[0, 1, 2]] * 2), torch.arange(3, 33).expand(2, 30).contiguous()
    big = x * 1e20
    assert torch.equal(ops.bipartite_merge(big, 8)[2], ops.bipartite_merge(x, 8)[2])
    assert torch.equal(ops.recycle(big, t, s)[1], ops.recycle(x, t, s)[1])


@pytest.mark.parametrize("which", ["bipartite_merge", "recycle"])
def test_nan_in_x_is_reported_as_x_when_no_metric_is_given(which):
    x = torch.randn(1, 9, 4)
    x[0, 3, 1] = math.nan
    with pytest.raises(ValueError, match=f"tokenreduce.{which}: x has a non-finite value"):
        if which == "bipartite_merge":
            ops.bipartite_merge(x, 2)
        else:
            ops.recycle(x, torch.tensor([[0, 1]]), torch.tensor([[3, 4]]))


def test_bipartite_merge_r0_is_the_identity_without_reading_metric():
    x, m = torch.randn(1, 6, 4), torch.full((1, 6, 4), math.nan)
    merged, size, source = ops.bipartite_merge(x, 0, metric=m)
    assert torch.equal(merged, x) and torch.equal(source, torch.arange(6)[None])


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bipartite_merge_size_must_be_positive_and_finite(bad):
    size = torch.ones(1, 6)
    size[0, 2] = bad
    with pytest.raises(ValueError, match="size must be positive and finite"):
        ops.bipartite_merge(torch.randn(1, 6, 4), 2, size=size)


def test_recycle_features_are_checked_with_assign_eagerly_as_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t, s = torch.randn(2, 9, 4), torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5, 6], [5, 6, 7]])
    kw = dict(assign=torch.zeros(2, 3, dtype=torch.long), features=torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="features must have shape"):
        ops.recycle(x, t, s, **kw)
    with FakeTensorMode() as mode:
        with pytest.raises(ValueError, match="features must have shape"):
            ops.recycle(*(mode.from_tensor(a) for a in (x, t, s)), **{k: mode.from_tensor(v) for k, v in kw.items()})


Q = torch.randn(1, 2, 5, 8)
BAD_ARGS = [
    (dict(score_rows=[1.7]), TypeError, "score_rows must hold ints"),
    (dict(score_rows=True), TypeError, "score_rows must be an int, a sequence"),
    (dict(score_rows=0.5), TypeError, "score_rows must be an int, a sequence"),
    (dict(score_rows="0"), TypeError, "score_rows must be an int, a sequence"),
    (dict(score_rows=[2**63]), IndexError, "score_rows.0. = 9223372036854775808 is out of range for Nq = 5"),
    (dict(score_rows=[5]), IndexError, "score_rows.0. = 5 is out of range for Nq = 5"),
    (dict(scale="x"), TypeError, "scale must be a real number"),
    (dict(scale=torch.ones(2)), TypeError, "scale must be a real number"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_ARGS, ids=[str(k) for k, _, _ in BAD_ARGS])
def test_attention_bad_arguments_name_the_op(kw, exc, msg):
    with pytest.raises(exc, match="tokenreduce.attention_with_scores: " + msg.replace("[", r"\[")):
        ops.attention_with_scores(Q, Q, Q, **kw)


def test_attention_zero_head_dim_needs_a_scale():
    q = torch.randn(1, 2, 5, 0)
    with pytest.raises(ValueError, match="tokenreduce.attention_with_scores: q has head dim Dh = 0"):
        ops.attention_with_scores(q, q, torch.randn(1, 2, 5, 3))


@pytest.mark.parametrize("call,name", [
    (lambda x: ops.kcenter(x, 2**63), "kcenter: k = "),
    (lambda x: ops.kcenter(x, 2, first=2**63), "kcenter: first = "),
    (lambda x: ops.bipartite_merge(x, 2**63), "bipartite_merge: r = "),
], ids=["k", "first", "r"])
def test_ints_beyond_int64_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"tokenreduce.{name}9223372036854775808 does not fit in int64"):
        call(torch.randn(2, 9, 4))


def test_kcenter_huge_finite_rows():
    """cosine is scale-free: rows ~1e20 (squared norm overflows float32) pick as the unscaled
    ones; l2 distances cannot be formed in float32 there: a clear error, not 'non-finite'."""
    x = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(1))
    big = x.clone()
    big[0, 3] *= 1e20
    assert torch.equal(ops.kcenter(big, 8)[0], ops.kcenter(x, 8)[0])
    assert torch.equal(ops.kcenter(x * 1e20, 8)[0], ops.kcenter(x, 8)[0])
    with pytest.raises(ValueError, match="too large for float32 l2 distances"):
        ops.kcenter(x * 1e20, 8, metric="l2")
