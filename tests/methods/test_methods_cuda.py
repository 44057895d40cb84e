"""Every registered method on CUDA (skipped without a GPU): fp32 / bf16 / fp16 against its CPU
result, with no host sync (``torch.cuda.set_sync_debug_mode("error")``) and inside CUDA-graph
capture (replay equals the eager call). Inputs: `make_ctx` of test_all_methods (one reduce call
at the method's first reduce layer, every Need populated)."""
from __future__ import annotations

import pytest
import torch

import tokenreduce.methods as M
from tokenreduce.methods import Context, Stage
from test_all_methods import KEEP, N_IMG, NAMES, check_reduction, make_ctx, model_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# kept-index agreement with the CPU run: fp32 differs only on near-ties, half precision on more
MIN_AGREEMENT = {"fp32": 0.98, "bf16": 0.75, "fp16": 0.75}


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, dict):
        return {k: _to(t, device) for k, t in v.items()}
    return v


def _ctx(name, dtype, device):
    m = M.build(name, keep=KEEP)
    L = model_layers(m)
    has_cls = m.stage != Stage.LLM
    layer = (m.reduce_layers(L) or [None])[0]
    ctx = make_ctx(m, N_IMG + has_cls, has_cls=has_cls, dtype=dtype, layer=layer, L=L)
    return m, Context(**{f: _to(getattr(ctx, f), device) for f in ctx.__dataclass_fields__})


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of each row's kept indices that the other run kept too."""
    hits = (a.cpu()[:, :, None] == b.cpu()[:, None, :]).any(-1).float()
    return hits.mean().item()


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_method_cuda_matches_cpu_without_sync(name, dt):
    dtype = DTYPES[dt]
    m_cpu, ctx_cpu = _ctx(name, torch.float32 if dt == "fp16" else dtype, "cpu")   # CPU half: bf16 / fp32
    ref = m_cpu(ctx_cpu)
    m, ctx = _ctx(name, dtype, "cuda")
    m(ctx)                                   # warm-up: kernel loading, NVRTC compiles, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        red = m(ctx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check_reduction(name, ctx, red)
    assert red.tokens.device.type == "cuda" and red.tokens.dtype == dtype, name
    assert torch.isfinite(red.tokens.float()).all(), name
    assert red.tokens.shape == ref.tokens.shape, (name, red.tokens.shape, ref.tokens.shape)
    agree = _agreement(red.index, ref.index)
    assert agree >= MIN_AGREEMENT[dt], (name, dt, agree)
    if dt == "fp32" and torch.equal(red.index.cpu(), ref.index):
        torch.testing.assert_close(red.tokens.cpu(), ref.tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_method_cuda_graph_capture(name):
    m, ctx = _ctx(name, torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = m(ctx)                       # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = m(ctx)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.index, eager.index), name
    torch.testing.assert_close(captured.tokens, eager.tokens)
