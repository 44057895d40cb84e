"""`Budget`: one value from the caller to the method, validated once (on creation), resolved by
one `resolve(n)`; `build` takes keep= / ratio= or budget=."""
import pytest
import torch

from tokenreduce import methods
from tokenreduce.methods import Budget, Context


def test_resolve():
    assert Budget(keep=64).resolve(576) == 64
    assert Budget(keep=576).resolve(576) == 576
    with pytest.raises(ValueError, match="keep=1000 exceeds the 576 image tokens"):
        Budget(keep=1000).resolve(576)                           # never clamped silently
    assert Budget(ratio=0.25).resolve(576) == 144
    assert Budget(ratio=0.11).resolve(576) == round(576 * 0.11)
    assert Budget(ratio=0.001).resolve(576) == 1                 # at least one token
    assert Budget(ratio=1).resolve(576) == 576 and isinstance(Budget(ratio=1).ratio, float)
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods: a budget is needed"):
        Budget().resolve(576)
    assert not Budget().given and Budget(keep=3).given and Budget(ratio=0.5).given
    assert [Budget(keep=64).label(), Budget(ratio=0.25).label(), Budget().label()] == ["keep=64", "ratio=0.25", "-"]


def test_validated_on_creation():
    for kw, msg in (({"keep": 4, "ratio": 0.5}, "give keep or ratio, not both"),
                    ({"keep": 0}, "keep must be a positive int, got 0"),
                    ({"keep": True}, "keep must be a positive int, got True"),
                    ({"keep": 4.0}, "keep must be a positive int, got 4.0"),
                    ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),
                    ({"ratio": 1.5}, r"ratio must be in \(0, 1\], got 1.5"),
                    ({"ratio": "0.5"}, r"ratio must be in \(0, 1\], got '0.5'")):
        with pytest.raises(ValueError, match=r"^tokenreduce\.methods: " + msg):
            Budget(**kw)
        with pytest.raises(ValueError, match=r"^tokenreduce\.profile: " + msg):
            Budget(**kw, where="profile")
    # where only names the caller in errors: not part of the value
    assert Budget(keep=4, where="profile") == Budget(keep=4) and hash(Budget(keep=4, where="x")) == hash(Budget(keep=4))
    assert repr(Budget(keep=4, where="profile")) == "Budget(keep=4, ratio=None)"


def test_validated_once(monkeypatch):
    """Building a method and using it (keep_tokens, reduce) validates its budget exactly once;
    a ready Budget passed as budget= is used as it is (no second validation)."""
    calls = []
    check = Budget.__post_init__
    monkeypatch.setattr(Budget, "__post_init__", lambda self: (calls.append(self), check(self))[1])
    m = methods.build("divprune", keep=4)
    x = torch.randn(2, 16, 8)
    for _ in range(3):
        assert m.keep_tokens(16) == 4 and m(Context(x=x)).tokens.shape == (2, 4, 8)
    assert len(calls) == 1
    b = Budget(ratio=0.5)
    calls.clear()
    m2 = methods.build("divprune", budget=b)
    assert m2.budget is b and m2.keep_tokens(16) == 8 and m2(Context(x=x)).tokens.shape == (2, 8, 8)
    assert calls == []


def test_build_budget_forms():
    b = Budget(keep=8)
    assert methods.build("visionzip", budget=b).budget is b
    assert methods.build("visionzip", keep=8).budget == b
    assert methods.build("fastv", ratio=0.25).keep_tokens(576) == methods.build("fastv", budget=Budget(ratio=0.25)).keep_tokens(576) == 144
    assert methods.build("tome", budget=Budget(keep=64)).keep_tokens(576) == 64
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.divprune: give budget= or keep=/ratio=, not both"):
        methods.build("divprune", keep=4, budget=b)
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.divprune: keep must be a positive int, got 0"):
        methods.build("divprune", keep=0)      # errors from keep= / ratio= name the method
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.divprune: a budget is needed"):
        methods.build("divprune", budget=Budget())
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.tome: give r= .* not both"):
        methods.build("tome", r=4, budget=b)
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.fastv: give keep/ratio or R, not both"):
        methods.build("fastv", R=0.5, budget=b)
    # methods with their own default take an empty budget
    assert methods.build("fastv").budget == Budget(ratio=0.5)
    assert methods.build("pdrop", budget=Budget()).keep_tokens(576) == 72
