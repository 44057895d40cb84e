"""Checks shared by the method tests: kept-set agreement with an oracle, a Reduction's
shapes and slot mapping, a method's errors on bad budgets, options and inputs."""
import pytest
import torch

from tokenreduce.methods import Reduction, build

LOW = [torch.float16, torch.bfloat16]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-row share of b's entries found in a (kept-set agreement)."""
    fr = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        fr.append(len(set(ra) & set(rb)) / max(1, len(rb)))
    return sum(fr) / len(fr)


def check_reduction(red: Reduction, B: int, N: int, K: int, D: int):
    assert red.tokens.shape == (B, K, D)
    assert red.index.shape == (B, K) and red.index.dtype == torch.long
    assert red.source.shape == (B, N) and red.source.dtype == torch.long
    assert red.size.shape == (B, K) and red.size.dtype == torch.float32
    # every kept position maps back to its slot
    valid = red.index >= 0
    slots = torch.arange(K).expand(B, K)
    got = torch.gather(red.source, 1, red.index.clamp_min(0))
    assert torch.equal(got[valid], slots[valid])


def check_errors(name: str, ctx_fn, **good):
    with pytest.raises(ValueError, match=name):
        build(name, keep=0, **good).keep_tokens(576)
    with pytest.raises(ValueError, match=name):
        build(name, ratio=1.5, **good).keep_tokens(576)
    with pytest.raises(TypeError, match=name):
        build(name, keep=8, not_an_option=1)
    m = build(name, keep=8, **good)
    with pytest.raises(ValueError, match=name):
        m(ctx_fn())
