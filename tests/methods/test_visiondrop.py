import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.visiondrop import visiondrop_ours, visiondrop_stage_authors
from tokenreduce.testing.synthetic import drop_image_tokens, llm_inputs
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap

SCHED = ((30, 5), (22, 4), (16, 3))


@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors_stage_by_stage(B):
    d = llm_inputs(B, 48, D=256, H=8, Dh=32, seed=20 + B)          # 42 + 6 tokens from the ViT stage
    m = methods.build("visiondrop")
    state: dict = {}
    for s, (layer, (dd, cc)) in enumerate(zip((8, 16, 24), SCHED)):
        red = visiondrop_ours(d, layer, m, state)
        toks, idx = visiondrop_stage_authors(d["hidden"], d["q"], d["k"], d["start"], d["n_img"], dd, cc)
        check_reduction(red, B, d["n_img"], dd + cc, 256)
        assert torch.equal(red.index, idx)
        torch.testing.assert_close(red.tokens.float(), toks, atol=1e-5, rtol=1e-5)
        # feed the next stage with what both kept (the tokens become the next hidden states)
        d = drop_image_tokens(d, red.index, seed=100 + s)
        st = d["start"]
        d["hidden"][:, st:st + d["n_img"]] = red.tokens


def test_large_budget_matches_authors():
    d = llm_inputs(2, 576, D=128, H=4, Dh=32, seed=5)
    m = methods.build("visiondrop", layers=(8,), schedule=((160, 32),))
    red = visiondrop_ours(d, 8, m, {})
    toks, idx = visiondrop_stage_authors(d["hidden"], d["q"], d["k"], d["start"], 576, 160, 32)
    assert torch.equal(red.index, idx)
    torch.testing.assert_close(red.tokens.float(), toks, atol=1e-5, rtol=1e-5)
    # provenance: every input token lands in a slot (merged, not dropped); sizes add up
    assert (red.source >= 0).all() and torch.allclose(red.size.sum(1), torch.full((2,), 576.0))


def test_batch_equals_per_sample():
    d = llm_inputs(3, 96, D=64, H=4, Dh=16, seed=8)
    m = methods.build("visiondrop", layers=(8,), schedule=((40, 8),))
    full = visiondrop_ours(d, 8, m, {})
    for b in range(3):
        one = visiondrop_ours({k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in d.items()}, 8, m, {})
        assert torch.equal(one.index, full.index[b:b + 1])
        torch.testing.assert_close(one.tokens, full.tokens[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    d = llm_inputs(2, 576, D=128, H=4, Dh=32, seed=9)
    m = methods.build("visiondrop", layers=(8,), schedule=((160, 32),))
    ref = visiondrop_ours(d, 8, m, {})
    lo = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}
    red = visiondrop_ours(lo, 8, m, {})
    assert red.tokens.dtype == dtype
    assert overlap(red.index[:, :160], ref.index[:, :160]) >= 0.9


def test_declarations_and_budgets():
    m = methods.build("visiondrop")
    assert m.reduce_layers(32) == [7, 15, 23] and m.attention_layers(32) == [8, 16, 24]
    assert m.keep_tokens(48) == 19
    assert {methods.Need.VISUAL_ATTN, methods.Need.KEYS, methods.Need.LOOKAHEAD} <= m.needs
    sched = methods.build("visiondrop", keep=64).schedule(576)
    assert sum(sched[-1]) == 64 and all(sum(a) > sum(b) for a, b in zip(sched, sched[1:]))
    with pytest.raises(ValueError, match="visiondrop"):
        methods.build("visiondrop", schedule=((30, 5),))


def test_errors():
    x = torch.randn(1, 48, 16)
    check_errors("visiondrop", lambda: methods.Context(x=x, layer=7, state={}))
    m = methods.build("visiondrop")
    with pytest.raises(ValueError, match="visiondrop.*keys"):
        m(methods.Context(x=x, visual_attn={8: torch.rand(1, 48)}, layer=7, state={}))
