"""The ops are real torch ops: schema, fake kernels, autograd registration and
torch.compile all check out."""
import pytest
import torch

import tokenreduce
from tokenreduce import ops
from conftest import randn


def cases(g):
    x = randn(g, 2, 21, 8)
    tgt = torch.tensor([[0, 5, 9], [1, 2, 20]])
    src = torch.tensor([[1, 2, 3, 4, 6, 7], [0, 3, 4, 5, 6, 19]])
    q, k, v = randn(g, 2, 4, 9, 8), randn(g, 2, 2, 11, 8), randn(g, 2, 2, 11, 6)
    xg = x.double().requires_grad_()
    mask = torch.rand(2, 21, generator=g) > 0.2
    mask[0, 3] = mask[1, 4] = True  # the given first picks must be eligible
    return [
        (torch.ops.tokenreduce.attention_with_scores.default, (q, k, v, 0.35, False, None, None)),
        (torch.ops.tokenreduce.attention_with_scores.default, (q, k, v, 0.35, True, randn(g, 2, 11), torch.tensor([0, -1]))),
        (torch.ops.tokenreduce.kcenter.default, (x, 5, "cosine", 0, None, False, None)),
        (torch.ops.tokenreduce.kcenter.default, (x, 5, "l2", 0, torch.tensor([3, 4]), False, mask)),
        (torch.ops.tokenreduce.kcenter.default, (x, 4, "cosine", 0, None, True, None)),
        (torch.ops.tokenreduce.bipartite_merge.default, (x, 7, None, None, 1, "tome")),
        (torch.ops.tokenreduce.bipartite_merge.default, (xg, 6, randn(g, 2, 21, 5), torch.rand(2, 21, generator=g) + 1, 0, "spatial")),
        (torch.ops.tokenreduce.recycle.default, (x, tgt, src, None, None, None, "cosine", True)),
        (torch.ops.tokenreduce.recycle.default, (xg, tgt, src, torch.rand(2, 21, generator=g), None, randn(g, 2, 21, 3), "cosine", False)),
        (torch.ops.tokenreduce.recycle.default, (xg, tgt, src, None, torch.randint(-1, 3, (2, 6), generator=g), None, "cosine", True)),
        (torch.ops.tokenreduce.dpp_select.default, (x, 5, None, None)),
        (torch.ops.tokenreduce.dpp_select.default, (x, 6, torch.rand(2, 21, generator=g), mask)),
    ]


def test_opcheck_every_op(gen):
    for op, args in cases(gen):
        torch.library.opcheck(op, args)


def test_registered_for_cpu():
    for name in ("attention_with_scores", "kcenter", "bipartite_merge", "recycle", "dpp_select"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenreduce::{name}", "CPU")
        assert hasattr(tokenreduce.ops, name)


def test_meta_tensors_give_shapes():
    x = torch.empty(3, 577, 64, device="meta")
    m, s, src = ops.bipartite_merge(x, 100, protect=1)
    assert m.shape == (3, 477, 64) and s.shape == (3, 477) and src.shape == (3, 577)
    idx, md = ops.kcenter(x, 64)
    assert idx.shape == (3, 64) and idx.dtype == torch.long and md.dtype == torch.float32


def pipeline(x, q, k, v):
    out, scores = ops.attention_with_scores(q, k, v, score_rows=torch.tensor([0]))
    keep, _ = ops.kcenter(x, 6, first="isolated")
    merged, size, source = ops.bipartite_merge(x, 5, protect=1)
    order = torch.argsort(scores, dim=1, descending=True)
    recycled, count = ops.recycle(x, order[:, :4], order[:, 4:], weight=scores)
    return out, keep, merged, size, source, recycled, count


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    x = randn(gen, 2, 17, 8)
    q, k, v = randn(gen, 2, 2, 17, 8), randn(gen, 2, 2, 17, 8), randn(gen, 2, 2, 17, 8)
    compiled = torch.compile(pipeline, fullgraph=True, backend="inductor")
    got = compiled(x, q, k, v)
    want = pipeline(x, q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    x2 = randn(gen, 3, 17, 8)  # a new batch size recompiles or runs dynamic; both are fine
    q2, k2, v2 = (randn(gen, 3, 2, 17, 8) for _ in range(3))
    for a, b in zip(compiled(x2, q2, k2, v2), pipeline(x2, q2, k2, v2)):
        torch.testing.assert_close(a, b)


def test_compile_training_step_through_merge_and_recycle(gen):
    torch._dynamo.reset()
    x = randn(gen, 2, 21, 8).requires_grad_()

    def loss(x):
        m, _, _ = ops.bipartite_merge(x, 6, protect=1)
        out, _ = ops.recycle(m, torch.tensor([[0, 3], [1, 4]]), torch.tensor([[5, 6, 7], [8, 9, 10]]))
        return m.square().sum() + out.sum()

    g_eager = torch.autograd.grad(loss(x), x)[0]
    g_comp = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x), x)[0]
    torch.testing.assert_close(g_eager, g_comp)


def test_op_list_is_the_librarys():
    """tokenreduce.ops.registry.OPS (the one Python op list) = the schemas of
    csrc/registration.cpp, as the dispatcher sees them; the CLI, the bench and nvrtc use it."""
    from tokenreduce import bench, cli, nvrtc
    from tokenreduce.ops import registry

    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("tokenreduce::")}
    assert set(registry.OPS) == registered
    assert len(registry.OPS) == len(set(registry.OPS))
    assert cli.OPS is registry.OPS and nvrtc.OPS is registry.OPS
    assert tuple(bench.CASE_BUILDERS) == registry.OPS          # every op has bench cases, in order
    for op in registry.OPS:
        assert registry.has_kernel(op, "CPU") and registry.has_fake(op)
        assert hasattr(torch.ops.tokenreduce, op) and hasattr(ops, op)
    assert not registry.has_kernel("no_such_op", "CPU")


def test_ops_package_exports_exactly_the_ops():
    from tokenreduce.ops import (attention_with_scores, bipartite_merge, dpp_select, kcenter,  # noqa: F401
                                 recycle, region_attention)

    assert ops.__all__ == ["attention_with_scores", "kcenter", "bipartite_merge", "recycle", "region_attention",
                           "dpp_select"]
    assert all(callable(getattr(ops, n)) for n in ops.__all__)
    assert callable(tokenreduce.ops.kcenter)


def test_recycle_return_slot_eager_fake_and_autograd(gen):
    x = randn(gen, 2, 21, 8).double().requires_grad_()
    tgt = torch.tensor([[0, 5, 9], [1, 2, 20]])
    src = torch.tensor([[1, 2, 3, 4, 6, 7], [0, 3, 4, 5, 6, 19]])
    out2, count2 = ops.recycle(x, tgt, src)
    out, count, slot = ops.recycle(x, tgt, src, return_slot=True)
    raw = torch.ops.tokenreduce.recycle(x, tgt, src, None, None, None, "cosine", True)
    torch.testing.assert_close(out, out2)
    assert torch.equal(count, count2) and torch.equal(slot, raw[2])
    assert slot.dtype == torch.long and slot.shape == (2, 6) and int(slot.min()) >= 0 and int(slot.max()) < 3
    # the slot is the one each source joined: count = 1 (target) + sources per slot
    assert torch.equal(count, 1 + torch.nn.functional.one_hot(slot, 3).sum(1))
    assign = torch.tensor([[0, -1, 1, 2, -1, 0], [2, 2, -1, 0, 1, 1]])
    _, _, slot_a = ops.recycle(x, tgt, src, assign=assign, return_slot=True)
    assert torch.equal(slot_a, assign)
    g1 = torch.autograd.grad(out.sum(), x)[0]
    g2 = torch.autograd.grad(out2.sum(), x)[0]
    torch.testing.assert_close(g1, g2)
    assert torch.autograd.gradcheck(lambda x: ops.recycle(x, tgt, src, return_slot=True)[0], (x,))
    m = torch.empty(3, 50, 16, device="meta")
    o, c, s = ops.recycle(m, torch.zeros(3, 4, dtype=torch.long, device="meta"),
                          torch.zeros(3, 7, dtype=torch.long, device="meta"), return_slot=True)
    assert o.shape == (3, 4, 16) and c.shape == (3, 4) and s.shape == (3, 7) and s.dtype == torch.long


def test_recycle_return_slot_compiles_fullgraph(gen):
    torch._dynamo.reset()
    x = randn(gen, 2, 21, 8).requires_grad_()
    tgt = torch.tensor([[0, 5, 9], [1, 2, 20]])
    src = torch.tensor([[1, 2, 3, 4, 6, 7], [0, 3, 4, 5, 6, 19]])

    def step(x):
        out, count, slot = ops.recycle(x, tgt, src, include_target=False, return_slot=True)
        return out.square().sum(), count, slot

    loss_e, count_e, slot_e = step(x)
    loss_c, count_c, slot_c = torch.compile(step, fullgraph=True)(x)
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(count_c, count_e) and torch.equal(slot_c, slot_e)
    torch.testing.assert_close(torch.autograd.grad(loss_c, x)[0], torch.autograd.grad(loss_e, x)[0])
