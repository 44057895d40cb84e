import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.fastv import fastv_authors, fastv_ours
from tokenreduce.testing.synthetic import llm_inputs
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("keep", [192, 64])
def test_matches_authors(B, keep):
    d = llm_inputs(B, 576, D=256, H=8, Dh=32, seed=B * 7 + keep)
    red = fastv_ours(d["hidden"], d["q"], d["k"], d["v"], d["start"], 576, keep)
    idx, toks = fastv_authors(d["hidden"], d["q"], d["k"], d["start"], 576, keep)
    check_reduction(red, B, 576, keep, 256)
    assert torch.equal(red.index, idx)
    assert torch.equal(red.tokens, toks)


def test_batch_equals_per_sample():
    d = llm_inputs(3, 576, seed=3)
    full = fastv_ours(d["hidden"], d["q"], d["k"], d["v"], d["start"], 576, 128)
    for b in range(3):
        one = fastv_ours(d["hidden"][b:b + 1], d["q"][b:b + 1], d["k"][b:b + 1], d["v"][b:b + 1], d["start"], 576, 128)
        assert torch.equal(one.index, full.index[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    d = llm_inputs(2, 576, seed=5)
    ref = fastv_ours(d["hidden"], d["q"], d["k"], d["v"], d["start"], 576, 192)
    lo = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}
    red = fastv_ours(lo["hidden"], lo["q"], lo["k"], lo["v"], d["start"], 576, 192)
    assert red.tokens.dtype == dtype
    assert overlap(red.index, ref.index) >= 0.9


def test_options_and_declarations():
    m = methods.build("fastv")                        # paper default: K=2, R=0.5
    assert m.keep_tokens(576) == 288 and m.reduce_layers(32) == [1] and m.attention_layers(32) == [1]
    assert methods.build("fastv", R=0.75, layer=3).keep_tokens(576) == 144
    assert methods.build("fastv", layer=3).reduce_layers(32) == [2]
    with pytest.raises(ValueError, match="fastv"):
        methods.build("fastv", keep=64, R=0.5)
    with pytest.raises(ValueError, match="fastv"):
        methods.build("fastv", layer=0)
    with pytest.raises(ValueError, match="fastv"):
        methods.build("fastv", layer=40).reduce_layers(32)


def test_errors():
    x = torch.randn(1, 576, 16)
    check_errors("fastv", lambda: methods.Context(x=x, layer=1))
    m = methods.build("fastv", keep=8)
    with pytest.raises(ValueError, match="fastv.*shape"):
        m(methods.Context(x=x, query_attn={1: torch.rand(1, 575)}))
