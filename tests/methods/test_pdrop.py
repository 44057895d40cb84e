import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.pdrop import make_stages, pdrop_authors, pdrop_ours
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap

RATIOS = [1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors_stage_by_stage(B):
    stages = make_stages(B, 576, 256, 8, 32, seed=11 + B)
    ours = pdrop_ours(stages)
    auth = pdrop_authors(stages, RATIOS)
    assert [o.shape[1] for o in ours] == [288, 144, 72]
    for o, a in zip(ours, auth):
        assert torch.equal(o, a)


def test_batch_equals_per_sample():
    stages = make_stages(3, 576, 128, 4, 32, seed=2)
    full = pdrop_ours(stages)
    for b in range(3):
        one = pdrop_ours([{k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in d.items()} for d in stages])
        for o, f in zip(one, full):
            assert torch.equal(o, f[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    stages = make_stages(2, 576, 128, 4, 32, seed=4)
    ref = pdrop_ours(stages)
    lo = [{k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()} for d in stages]
    got = pdrop_ours(lo)
    assert overlap(got[0], ref[0]) >= 0.9


def test_reduction_and_declarations():
    m = methods.build("pdrop")
    assert m.reduce_layers(32) == [7, 15, 23] and m.attention_layers(32) == [8, 16, 24]
    assert m.stage_counts(576) == [288, 144, 72] and m.keep_tokens(576) == 72
    assert methods.Need.LOOKAHEAD in m.needs
    assert methods.build("pdrop", keep=64).keep_tokens(576) == 64
    x = torch.randn(2, 576, 32)
    red = m(methods.Context(x=x, query_attn={8: torch.rand(2, 576)}, layer=7, state={}))
    check_reduction(red, 2, 576, 288, 32)
    with pytest.raises(ValueError, match="pdrop"):
        methods.build("pdrop", layers=(16, 8))
    with pytest.raises(ValueError, match="pdrop"):
        m.reduce_layers(20)


def test_errors():
    x = torch.randn(1, 576, 16)
    check_errors("pdrop", lambda: methods.Context(x=x, layer=7, state={}))
    m = methods.build("pdrop")
    with pytest.raises(ValueError, match="pdrop.*layer"):
        m(methods.Context(x=x, query_attn={8: torch.rand(1, 576)}))          # ctx.layer missing
    with pytest.raises(ValueError, match="pdrop"):
        m(methods.Context(x=x[:, :288], query_attn={16: torch.rand(1, 288)}, layer=15, state={}))  # lost state
