import pytest
import torch

from tokenreduce.methods import Context, build
from tokenreduce.methods.sparsevlm import SCHEDULES, dpc_knn, stage_counts
from tokenreduce.testing.authors.sparsevlm import (cluster_and_merge, prune_stage, relation_from_weights,
                                                    select_raters)

PRE, V0, TXT, D, H = 7, 576, 40, 256, 4


def _inputs(B, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = PRE + V0 + TXT
    h = torch.randn(B, L, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.softmax(torch.randn(B, H, L, L, generator=g, dtype=torch.float64) * 3
                      + torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1), dim=-1).to(dtype)
    return h, w


@pytest.mark.parametrize("keep", sorted(SCHEDULES))
def test_stage_matches_authors(keep):
    """Layer 2's prune + recycle equals the authors' (float64; their density noise left out)."""
    h, w = _inputs(2, seed=keep, dtype=torch.float64)
    m = build("sparsevlm", keep=keep)
    for b in range(2):
        raters = select_raters(h[b:b + 1], PRE, V0)
        ref, v_next = prune_stage(h[b:b + 1], w[b:b + 1], PRE, V0, raters, 2, keep, noise=False)
        rel = relation_from_weights(w[b:b + 1], PRE, V0, raters)
        red = m(Context(x=h[b:b + 1, PRE:PRE + V0], rater_attn={2: rel}, layer=2, num_layers=32, state={}))
        k, _, c = stage_counts(V0, SCHEDULES[keep])[0]
        assert red.tokens.shape[1] == v_next == k + c
        torch.testing.assert_close(red.tokens, ref[:, PRE:PRE + v_next], rtol=1e-5, atol=1e-6)
        # provenance: kept tokens in order, merged ones at their centre (a pruned token)
        assert (red.index[:, :k].diff(dim=1) > 0).all() and red.index.unique().numel() == k + c
        assert (red.size[:, :k] == 1).all() and (red.size[:, k:] >= 1).all()


def test_batch_equals_per_sample_and_three_stages():
    h, w = _inputs(3, seed=1)
    rel = torch.cat([relation_from_weights(w[b:b + 1], PRE, V0, select_raters(h[b:b + 1], PRE, V0))
                     for b in range(3)])
    m = build("sparsevlm", keep=64)
    state = {}
    full = m(Context(x=h[:, PRE:PRE + V0], rater_attn={2: rel}, layer=2, num_layers=32, state=state))
    for b in range(3):
        one = m(Context(x=h[b:b + 1, PRE:PRE + V0], rater_attn={2: rel[b:b + 1]}, layer=2, num_layers=32, state={}))
        assert torch.equal(one.index[0], full.index[b])
        torch.testing.assert_close(one.tokens[0], full.tokens[b])
    x, size = full.tokens, full.size
    for layer in (6, 15):
        r = torch.softmax(torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(layer)), -1)
        red = m(Context(x=x, rater_attn={layer: r}, layer=layer, num_layers=32, state=state, size=size))
        x, size = red.tokens, red.size
    assert x.shape[1] == m.keep_tokens(V0) == 17 + 1
    assert (size >= 1).all() and (size.sum(1) <= V0).all()     # dropped tokens (not recycled) count nowhere


def test_counts_schedule():
    assert [k for k, _, _ in stage_counts(576, (66, 30, 17))] == [66, 30, 17]
    assert stage_counts(576, (66, 30, 17))[0] == (66, 154, 16)        # int(510 * .3) + 1, int(154 / 10) + 1
    assert build("sparsevlm", keep=64).keep_tokens(576) == 18
    assert build("sparsevlm", counts=(9, 4, 2)).schedule(16) == (9, 4, 2)
    assert build("sparsevlm", keep=32).schedule(576) == (33, 15, 8)   # the 64 schedule scaled


def test_dpc_knn_equals_authors_clusters():
    x = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    centres, cluster = dpc_knn(x, 7)
    ref = cluster_and_merge(x, 7, noise=False)
    members = torch.zeros(2, 7, 60, dtype=x.dtype).scatter(1, cluster[:, None, :], 1.0)
    torch.testing.assert_close(members @ x / members.sum(-1, keepdim=True), ref, rtol=1e-5, atol=1e-6)
    assert (cluster.gather(1, centres) == torch.arange(7)).all()


def test_errors():
    x = torch.randn(1, 20, 8)
    with pytest.raises(ValueError, match="sparsevlm.*rater_attn"):
        build("sparsevlm", keep=9)(Context(x=x, layer=2, num_layers=32))
    with pytest.raises(ValueError, match="sparsevlm.*called after layer 3"):
        build("sparsevlm", keep=9)(Context(x=x, layer=3, num_layers=32, rater_attn={3: torch.rand(1, 20)}))
    with pytest.raises(ValueError, match="sparsevlm.*counts"):
        build("sparsevlm", counts=(1, 2))
    with pytest.raises(ValueError, match="sparsevlm.*not both"):
        build("sparsevlm", keep=64, counts=(3, 2, 1))
