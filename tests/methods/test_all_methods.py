"""Every registered method (whoever wrote it) on synthetic but consistent inputs: the
Reduction invariants, fp32 / bf16, no host sync (FakeTensorMode, torch.compile for one),
and the registry / describe / markdown output."""
from __future__ import annotations

import re

import pytest
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tokenreduce.methods as M
from tokenreduce.methods import Context, Need, Stage

B, N_IMG, D, DK, T = 2, 576, 64, 32, 16
KEEP = 64
NAMES = M.available()


def model_layers(method) -> int:
    return 32 if method.stage == Stage.LLM else 24


def make_ctx(method, n_tokens: int, *, has_cls: bool, dtype, layer, L, seed=0, size=None, state=None):
    """A Context with every Need populated, consistent with ``n_tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    N = n_tokens

    def attn_row():
        return torch.softmax(torch.randn(B, N, generator=g) * 2, dim=-1)

    layers = {l + L if l < 0 else l for l in method.attention_layers(L)}
    if layer is not None:
        layers.add(layer)
    side = int(round((N - has_cls) ** 0.5))
    grid = (side, side) if side * side == N - has_cls else None
    return Context(
        x=torch.randn(B, N, D, generator=g).to(dtype), has_cls=has_cls, grid=grid,
        keys=torch.randn(B, N, DK, generator=g).to(dtype),
        cls_attn={l: attn_row() for l in layers}, attn_received={l: attn_row() for l in layers},
        query_attn={l: attn_row() for l in layers},
        visual_attn={l: attn_row() for l in layers},
        query_attn_norope={l: attn_row() for l in layers},
        rater_attn={l: attn_row() for l in layers},
        values={l: torch.randn(B, N, DK, generator=g).to(dtype) for l in layers},
        text=torch.randn(B, T, D, generator=g).to(dtype),
        pixels=torch.rand(B, 3, 48, 48, generator=g).to(dtype),
        size=size, layer=layer, num_layers=L, state={} if state is None else state)


def check_reduction(name, ctx, red, K=None):
    x = ctx.x
    Bx, N, Dx = x.shape
    assert red.tokens.dim() == 3 and red.tokens.shape[0] == Bx and red.tokens.shape[2] == Dx, name
    assert red.tokens.dtype == x.dtype, name
    Kout = red.tokens.shape[1]
    if K is not None:
        assert Kout == K, (name, Kout, K)
    assert red.index.shape == (Bx, Kout) and red.index.dtype == torch.long, name
    assert red.source.shape == (Bx, N) and red.source.dtype == torch.long, name
    assert red.size.shape == (Bx, Kout), name
    assert ((red.index >= -1) & (red.index < N)).all(), name
    assert ((red.source >= -1) & (red.source < Kout)).all(), name
    kept = red.index >= 0
    back = red.source.gather(1, red.index.clamp_min(0))
    slots = torch.arange(Kout).expand(Bx, Kout)
    assert (back[kept] == slots[kept]).all(), f"{name}: source disagrees with index"
    assert (red.size > 0).all(), name
    assert not torch.isnan(red.tokens.float()).any(), name
    if ctx.has_cls:
        assert (red.index[:, 0] == 0).all() and (red.source[:, 0] == 0).all(), f"{name}: [CLS] first"
        torch.testing.assert_close(red.tokens[:, 0], x[:, 0])


def run_method(name, dtype):
    """All reduce calls of a method over a model, feeding each output to the next call."""
    m = M.build(name, keep=KEEP)
    L = model_layers(m)
    has_cls = m.stage != Stage.LLM
    layers = m.reduce_layers(L) or [None]
    n, size, state = N_IMG + has_cls, None, {}
    red = None
    for i, layer in enumerate(layers):
        ctx = make_ctx(m, n, has_cls=has_cls, dtype=dtype, layer=layer, L=L, seed=i, size=size,
                       state=state)
        if red is not None:
            ctx.x = red.tokens
        red = m(ctx)
        last = i == len(layers) - 1
        check_reduction(name, ctx, red, KEEP_OUT(m, has_cls) if last else None)
        n, size = red.tokens.shape[1], red.size
    return m, red


def method_and_ctx(name, keep=KEEP, dtype=torch.float32):
    """The method built with ``keep`` and a Context for its first reduce call."""
    m = M.build(name, keep=keep)
    L = model_layers(m)
    has_cls = m.stage != Stage.LLM
    layer = (m.reduce_layers(L) or [None])[0]
    return m, make_ctx(m, N_IMG + has_cls, has_cls=has_cls, dtype=dtype, layer=layer, L=L)


def KEEP_OUT(m, has_cls):
    return m.keep_tokens(N_IMG) + int(has_cls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_reduction_invariants(name, dtype):
    run_method(name, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_under_fake_tensors(name):
    """Fake tensors have no data: .item(), .tolist(), nonzero or a data-dependent shape
    raise, so a method that runs here is sync-free."""
    m = M.build(name, keep=KEEP)
    L = model_layers(m)
    has_cls = m.stage != Stage.LLM
    layers = m.reduce_layers(L) or [None]
    ctx = make_ctx(m, N_IMG + has_cls, has_cls=has_cls, dtype=torch.float32, layer=layers[0], L=L)
    mode = FakeTensorMode(allow_non_fake_inputs=False)

    def fake(v):
        if isinstance(v, torch.Tensor):
            return mode.from_tensor(v)
        if isinstance(v, dict):
            return {k: fake(t) for k, t in v.items()}
        return v

    fctx = Context(**{f: fake(getattr(ctx, f)) for f in ctx.__dataclass_fields__})
    with mode:
        red = m(fctx)
    assert red.tokens.shape[0] == B


def test_torch_compile_fullgraph():
    """One method end to end under torch.compile(fullgraph=True): no graph break."""
    torch._dynamo.reset()
    m = M.build("visionzip", keep=KEEP)
    ctx = make_ctx(m, 1 + N_IMG, has_cls=True, dtype=torch.float32, layer=None, L=24)

    def f(x, keys, attn):
        r = m(Context(x=x, keys=keys, has_cls=True, cls_attn={22: attn}, num_layers=24))
        return r.tokens, r.index, r.source, r.size

    got = torch.compile(f, fullgraph=True, dynamic=False)(ctx.x, ctx.keys, ctx.cls_attn[22])
    want = f(ctx.x, ctx.keys, ctx.cls_attn[22])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_registry_and_describe():
    assert len(NAMES) == len(set(NAMES)) and NAMES == sorted(NAMES)
    mine = {"tome", "visionzip", "fastervlm", "vtc-cls", "divprune", "todre", "todre-llm",
            "prumerge+", "dart", "turbo", "random", "uniform", "pool"}
    assert mine <= set(NAMES)
    fields = {"name", "paper", "code", "stage", "needs", "options", "budgets", "faithful_to",
              "deviations", "doc"}
    for d in M.describe_all():
        if not M.get(d["name"]).__module__.startswith("tokenreduce.methods."):
            continue  # a method registered by another test (e.g. tests/models), not shipped
        assert fields <= set(d), d["name"]
        assert d["paper"] and d["budgets"] and d["faithful_to"] and d["doc"], d["name"]
        assert d["stage"] in {s.value for s in Stage}
        assert set(d["needs"]) <= {n.value for n in Need}
        cls = M.get(d["name"])
        # the algorithm in a few lines, in the class docstring or its module's
        mod_doc = sys.modules[cls.__module__].__doc__ or ""
        assert cls.__doc__ and len((cls.__doc__ + "\n" + mod_doc).strip().splitlines()) >= 3, d["name"]
    table = M.markdown_table(NAMES)
    assert table.count("\n") == len(NAMES) + 2
    for n in NAMES:
        assert f"| `{n}` |" in table
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        M.build("nope", keep=4)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_with_the_method_named(name):
    """A 2-D or integer ctx.x, a string ratio and keep > N raise errors naming the method."""
    m, ctx = method_and_ctx(name)
    for bad, exc in ((ctx.x[0], ValueError), ((ctx.x * 10).long(), TypeError)):
        c = Context(**{f: getattr(ctx, f) for f in ctx.__dataclass_fields__})
        c.x = bad
        with pytest.raises(exc, match=re.escape(f"tokenreduce.methods.{name}: ctx.x must be")):
            m(c)
    with pytest.raises(ValueError, match=re.escape(f"tokenreduce.methods.{name}: ratio must be")):
        M.build(name, ratio="0.5")
    big, big_ctx = method_and_ctx(name, keep=N_IMG + 1)
    with pytest.raises(ValueError, match=f"keep={N_IMG + 1} exceeds the {N_IMG} image tokens"):
        big(big_ctx)
