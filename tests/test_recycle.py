import pytest
import torch

from tokenreduce import measure, ops, reference
from conftest import DTYPES, TOL, randn


def split(gen, B, N, T, S):
    perm = torch.argsort(torch.rand(B, N, generator=gen), dim=1)
    return perm[:, :T].contiguous(), perm[:, T : T + S].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("include_target", [True, False])
@pytest.mark.parametrize("B,N,D,T,S", [(1, 1, 3, 1, 0), (2, 9, 5, 1, 8), (3, 57, 19, 7, 40), (2, 576, 64, 64, 448), (1, 2000, 16, 100, 1900)])
def test_matches_reference(gen, dtype, include_target, B, N, D, T, S):
    x = randn(gen, B, N, D, dtype=dtype)
    tgt, src = split(gen, B, N, T, S)
    w = torch.rand(B, N, generator=gen) + 0.1
    out, count = ops.recycle(x, tgt, src, weight=w, include_target=include_target)
    rout, rcount = reference.recycle(x, tgt, src, weight=w, include_target=include_target)
    assert out.shape == (B, T, D) and out.dtype == dtype and count.dtype == torch.long
    assert torch.equal(count, rcount)
    torch.testing.assert_close(out, rout, **TOL[dtype])
    assert int(count.sum()) == S * B + include_target * T * B


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_and_features(gen, dtype):
    B, N, D, T, S = 3, 80, 12, 9, 60
    x = randn(gen, B, N, D, dtype=dtype)
    keys = randn(gen, B, N, 7, dtype=dtype)
    tgt, src = split(gen, B, N, T, S)
    assign = torch.randint(-1, T, (B, S), generator=gen)
    for kw in ({"assign": assign}, {"features": keys}, {"assign": assign, "weight": torch.rand(B, N, generator=gen)}):
        out, count = ops.recycle(x, tgt, src, **kw)
        rout, rcount = reference.recycle(x, tgt, src, **kw)
        assert torch.equal(count, rcount)
        torch.testing.assert_close(out, rout, **TOL[dtype])


def test_visionzip_contextual_tokens(gen):
    """VisionZip: contextual = target + mean of the tokens assigned to it by key cosine."""
    B, N, D, T = 2, 40, 8, 5
    hidden, keys = randn(gen, B, N, D), randn(gen, B, N, 6)
    tgt = torch.arange(0, N, N // T)[:T].expand(B, T).contiguous()
    rest = torch.tensor([i for i in range(N) if i not in tgt[0].tolist()]).expand(B, -1).contiguous()
    agg, count = ops.recycle(hidden, tgt, rest, features=keys, include_target=False)
    contextual = hidden.gather(1, tgt[..., None].expand(-1, -1, D)) + agg
    # VisionZip's own formulation: one-hot assignment and a bmm
    kn = keys / keys.norm(dim=-1, keepdim=True)
    sim = kn.gather(1, rest[..., None].expand(-1, -1, 6)) @ kn.gather(1, tgt[..., None].expand(-1, -1, 6)).transpose(1, 2)
    onehot = torch.zeros(B, rest.shape[1], T).scatter_(2, sim.argmax(2, keepdim=True), 1)
    counts = onehot.sum(1).clamp(min=1)[..., None]
    vz = hidden.gather(1, tgt[..., None].expand(-1, -1, D)) + onehot.transpose(1, 2) @ hidden.gather(1, rest[..., None].expand(-1, -1, D)) / counts
    torch.testing.assert_close(contextual, vz)
    torch.testing.assert_close(count, onehot.sum(1).long())


def test_empty_slot_and_zero_weight_are_zero(gen):
    x = randn(gen, 1, 6, 3)
    tgt, src = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    out, count = ops.recycle(x, tgt, src, assign=torch.tensor([[0, 0]]), include_target=False)
    assert count.tolist() == [[2, 0]] and (out[0, 1] == 0).all()
    out, count = ops.recycle(x, tgt, src, assign=torch.tensor([[-1, -1]]), weight=torch.zeros(1, 6))
    assert count.tolist() == [[1, 1]] and (out == 0).all()


def test_ties_go_to_smaller_slot():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    out, count = ops.recycle(x, torch.tensor([[1, 0]]), torch.tensor([[2, 3]]))
    assert count.tolist() == [[3, 1]]  # token 2 ties between slots 0 and 1 -> slot 0; token 3 too
    rout, rcount = reference.recycle(x, torch.tensor([[1, 0]]), torch.tensor([[2, 3]]))
    assert torch.equal(count, rcount)


def test_non_contiguous(gen):
    x = randn(gen, 30, 2, 16).transpose(0, 1)
    tgt, src = split(gen, 2, 30, 4, 20)
    a = ops.recycle(x, tgt, src)
    b = ops.recycle(x.contiguous(), tgt, src)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    a = ops.recycle(x, tgt.t().contiguous().t(), src[:, ::1], features=randn(gen, 2, 30, 8)[..., ::2])
    assert a[0].shape == (2, 4, 16)


@pytest.mark.parametrize("include_target", [True, False])
def test_gradcheck(gen, include_target):
    B, N, D = 2, 15, 4
    x = randn(gen, B, N, D, dtype=torch.float64).requires_grad_()
    tgt, src = split(gen, B, N, 3, 10)
    w = torch.rand(B, N, generator=gen, dtype=torch.float64) + 0.2
    assign = torch.randint(-1, 3, (B, 10), generator=gen)
    f = lambda x: ops.recycle(x, tgt, src, weight=w, include_target=include_target)[0]
    assert torch.autograd.gradcheck(f, (x,))
    g = lambda x: ops.recycle(x, tgt, src, assign=assign, include_target=include_target)[0]
    assert torch.autograd.gradcheck(g, (x,))
    # a token listed twice (as target and source) accumulates both gradients
    h = lambda x: ops.recycle(x, tgt, torch.cat([src, tgt[:, :1]], 1), weight=w)[0]
    assert torch.autograd.gradcheck(h, (x,))


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda x, t, s: ops.recycle(x[0], t, s), ValueError, "x must have shape"),
        (lambda x, t, s: ops.recycle(x, t[0], s), ValueError, "target"),
        (lambda x, t, s: ops.recycle(x, t, s[:1]), ValueError, "source"),
        (lambda x, t, s: ops.recycle(x, t.int(), s), TypeError, "target"),
        (lambda x, t, s: ops.recycle(x, t + 10, s), IndexError, "target"),
        (lambda x, t, s: ops.recycle(x, t, s - 20), IndexError, "source"),
        (lambda x, t, s: ops.recycle(x.long(), t, s), TypeError, "floating"),
        (lambda x, t, s: ops.recycle(x, t, s, weight=torch.ones(2, 3)), ValueError, "weight"),
        (lambda x, t, s: ops.recycle(x, t, s, assign=torch.zeros(2, 3, dtype=torch.long)), ValueError, "assign"),
        (lambda x, t, s: ops.recycle(x, t, s, assign=torch.full((2, 5), 2)), IndexError, "assign"),
        (lambda x, t, s: ops.recycle(x, t, s, assign=torch.full((2, 5), -2)), IndexError, "assign"),
        (lambda x, t, s: ops.recycle(x, t, s, features=torch.randn(2, 9, 3)), ValueError, "features"),
        (lambda x, t, s: ops.recycle(x, t, s, metric="l2"), ValueError, "metric"),
        (lambda x, t, s: ops.recycle(x, t[:, :0], s), ValueError, "at least one target"),
        (lambda x, t, s: ops.recycle(torch.where(torch.arange(10)[None, :, None] == s[0, 0], float("nan"), x), t, s), ValueError, "non-finite"),
        (lambda x, t, s: ops.recycle(x, t, s, weight=torch.ones(2, 10, device="meta")), ValueError, "weight is on meta"),
    ],
)
def test_bad_input_raises(call, exc, needle):
    x = torch.randn(2, 10, 4)
    t = torch.tensor([[0, 1], [2, 3]])
    s = torch.tensor([[4, 5, 6, 7, 8], [0, 1, 5, 6, 9]])
    with pytest.raises(exc, match="tokenreduce.recycle") as info:
        call(x, t, s)
    assert needle in str(info.value)


# Wide features (Df >= 128, T >= 32) take the bf16-screened assignment where the bf16 GEMM is
# the faster (forced on and off here: `bf16_screen`): a bf16 GEMM picks candidate targets,
# rescored in float32; its slots must be the float32 ones. Inputs are
# redrawn until every source's float64 top-2 gap is far above float32 rounding. B=1 runs
# blocks of sources, B=5 (2 threads) one task per batch row; "clustered" (cosines ~0.96,
# every target a candidate) takes the float32 GEMM fallback.
def _slot_margins_ok(x, tgt, src, margin=1e-6):
    u = x.double() / x.double().norm(dim=-1, keepdim=True)
    D = x.shape[-1]
    sim = u.gather(1, src[..., None].expand(-1, -1, D)) @ u.gather(1, tgt[..., None].expand(-1, -1, D)).transpose(1, 2)
    top2 = sim.topk(2, dim=-1).values
    return bool((top2[..., 0] - top2[..., 1]).min() > margin), sim.argmax(-1)


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_wide_features_screening(gen, bf16_screen, B, kind):
    N, D, T, S = 160, 256, 32, 100
    for _ in range(40):
        x = randn(gen, B, N, D) if kind == "random" else randn(gen, B, 1, D) + 0.2 * randn(gen, B, N, D)
        tgt, src = split(gen, B, N, T, S)
        ok, want = _slot_margins_ok(x, tgt, src)
        if ok:
            break
    assert ok, "could not draw inputs with clear margins"
    w = torch.rand(B, N, generator=gen) + 0.1
    with measure.threads(2):
        out, count, slot = ops.recycle(x, tgt, src, weight=w, return_slot=True)
    assert torch.equal(slot, want)
    rout, rcount = reference.recycle(x, tgt, src, weight=w)
    assert torch.equal(count, rcount)
    torch.testing.assert_close(out, rout)


# recycle_cpu's two schedules: with B >= 2 x threads one task per batch row runs the targets,
# the assignment, the grouping and the means back to back (recycle_by_rows); otherwise each
# step runs over (batch row, block) tasks. Same slots, counts and means (the means bit for bit:
# the same members in the same order), on odd sizes, every dtype, weights, empty sources and
# wide (screened) features.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("include_target", [True, False])
@pytest.mark.parametrize("B,N,D,T,S", [(4, 57, 19, 7, 40), (6, 300, 160, 40, 200), (4, 9, 3, 5, 0)])
def test_row_schedule_equals_block_schedule(gen, bf16_screen, dtype, include_target, B, N, D, T, S):
    x = randn(gen, B, N, D, dtype=dtype)
    tgt, src = split(gen, B, N, T, S)
    w = torch.rand(B, N, generator=gen) + 0.1
    kw = dict(weight=w, include_target=include_target, return_slot=True)
    with measure.threads(1):                      # B >= 2: one task per batch row
        rows = ops.recycle(x, tgt, src, **kw)
    with measure.threads(2 * B):                  # B < 2 x threads: (batch row, block) tasks
        blocks = ops.recycle(x, tgt, src, **kw)
    for a, b in zip(rows, blocks):
        assert torch.equal(a, b)
    rout, rcount = reference.recycle(x, tgt, src, weight=w, include_target=include_target)
    assert torch.equal(rows[1], rcount)
    torch.testing.assert_close(rows[0], rout, **TOL[dtype])
