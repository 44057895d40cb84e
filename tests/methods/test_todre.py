import pytest
import torch

from _inputs import clip1, clip3, ctx_of  # noqa: F401 (fixtures)
from tokenreduce import ops
from tokenreduce.testing.authors.divprune import divprune
from tokenreduce.methods import Context, build


def test_stage1_is_greedy_kcenter(clip3):
    red = build("todre", keep=58)(ctx_of(clip3))
    picks = divprune(clip3.x[:, 1:], 58)
    assert torch.equal(red.index[:, 1:] - 1, picks.sort(dim=1).values)


def test_stage1_cls_start(clip3):
    red = build("todre", keep=32, first="cls")(ctx_of(clip3))
    start = clip3.cls_attn[22][:, 1:].argmax(dim=1)
    idx, _ = ops.kcenter(clip3.x[:, 1:], 32, first=start)
    assert torch.equal(red.index[:, 1:] - 1, idx.sort(dim=1).values)
    assert build("todre", keep=4, first="cls").attention_layers(24) == [-2]
    with pytest.raises(ValueError, match="todre.*first"):
        build("todre", keep=4, first="middle")(ctx_of(clip3))


def test_stage2_relevance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 256, generator=g)
    rel = torch.softmax(torch.randn(2, 64, generator=g), dim=1)
    m = build("todre-llm", ratio=0.5, layer=3)
    assert m.stage.value == "llm" and m.reduce_layers(32) == [2] and m.attention_layers(32) == [2]
    red = m(Context(x=x, query_attn={2: rel}))
    want = rel.topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(red.index, want)
    with pytest.raises(ValueError, match=r"todre-llm.*query_attn\[2\]"):
        m(Context(x=x))


def test_stage2_matches_loop():
    from tokenreduce.testing.authors.todre import todre_stage2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 576, 128, generator=g)
    rel = torch.softmax(torch.randn(3, 576, generator=g), dim=1)
    red = build("todre-llm", keep=100)(Context(x=x, query_attn={1: rel}))
    torch.testing.assert_close(red.tokens, todre_stage2(x, rel, 100), rtol=0, atol=0)
