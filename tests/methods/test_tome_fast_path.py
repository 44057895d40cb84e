"""ToMe's own sizes skip `ops.bipartite_merge`'s value check: same result as the checked call,
and a caller's sizes are still checked."""
import pytest
import torch

from tokenreduce import methods
from tokenreduce.methods.base import Budget, Context


def _ctx(x, keys, size, state):
    return Context(x=x, has_cls=True, layer=3, num_layers=12, size=size, state=state, keys=keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_sizes_fast_path_equals_checked_path(dtype):
    torch.manual_seed(0)
    B, N, D = 2, 23, 16
    m = methods.build("tome", r=4)
    x, keys = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, 8, dtype=dtype)
    first = m(_ctx(x, keys, None, state := {}))           # block 1: no sizes yet
    assert state["tome.size_out"] is first.size and first.size.dtype == torch.float32
    x2, k2 = first.tokens, torch.randn(B, N - 4, 8, dtype=dtype)
    fast = m(_ctx(x2, k2, first.size, state))              # the sizes it returned: unchecked call
    checked = m(_ctx(x2, k2, first.size.clone(), {}))      # an equal copy: the checked call
    for a, b in zip((fast.tokens, fast.index, fast.source, fast.size),
                    (checked.tokens, checked.index, checked.source, checked.size)):
        assert torch.equal(a, b)
    assert state["tome.size_out"] is fast.size


def test_caller_sizes_still_checked():
    m = methods.build("tome", r=2)
    x, keys = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    bad = torch.ones(1, 9)
    bad[0, 3] = 0.0
    with pytest.raises(ValueError, match="size must be positive and finite"):
        m(_ctx(x, keys, bad, {"tome.size_out": torch.ones(1, 9)}))   # not the object it returned


def test_vit_runner_tome_unchanged_by_fast_path():
    """run_vision with ToMe: the fast path gives what the checked path gives every block."""
    from tokenreduce.models import presets, vit
    from tokenreduce.ops import bipartite_merge as checked_merge
    torch.manual_seed(0)
    model = vit.prepare(presets.build("tiny-dinov2"))
    px = torch.randn(2, 3, *([presets.PRESETS["tiny-dinov2"].image_size] * 2))
    m = methods.build("tome", budget=Budget(ratio=0.25))
    fast = vit.run_vision(model, px, m)
    orig = torch.ops.tokenreduce.bipartite_merge
    calls = []

    class Forced:   # every call through the checked wrapper
        def __getattr__(self, name):
            return getattr(torch.ops.tokenreduce, name)

        @staticmethod
        def bipartite_merge(x, r, metric, size, protect, order):
            calls.append(1)
            return checked_merge(x, r, metric=metric, size=size, protect=protect, order=order)
    import tokenreduce.methods.tome as tome_mod
    saved = tome_mod.torch
    try:
        class T:   # tome's `torch` with ops.tokenreduce redirected
            def __getattr__(self, name):
                return getattr(saved, name)
        t = T()
        t.ops = type("O", (), {"tokenreduce": Forced()})()
        tome_mod.torch = t
        slow = vit.run_vision(model, px, methods.build("tome", budget=Budget(ratio=0.25)))
    finally:
        tome_mod.torch = saved
    assert calls, "the fast path was not taken"
    assert orig is torch.ops.tokenreduce.bipartite_merge
    assert torch.equal(fast.last_hidden_state, slow.last_hidden_state)
    assert torch.equal(fast.tracker.source, slow.tracker.source)
