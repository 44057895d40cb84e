"""No host <-> device traffic (syncs, copies, Python data made into device tensors) in any
method or in the fused attention path. See tests/host_traffic.py for how it is detected on a
machine without a GPU; on a GPU, tools/gpu_validate.sh runs the methods under
``torch.cuda.set_sync_debug_mode("error")`` and inside CUDA-graph capture."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_traffic import DEVICE, HostTraffic, no_host_traffic, to_device  # noqa: E402

import tokenreduce.methods as methods  # noqa: E402
from tokenreduce import ops  # noqa: E402
from tokenreduce.methods import Context  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods"))
from test_all_methods import method_and_ctx  # noqa: E402


@pytest.mark.parametrize("pattern", ["list", "to", "item", "nonzero", "equal", "index"])
def test_the_watcher_sees_each_kind_of_traffic(pattern):
    x = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(HostTraffic):
        with no_host_traffic():
            if pattern == "list":
                torch.tensor([0, 1], device=x.device)
            elif pattern == "to":
                torch.arange(3).to(x.device)
            elif pattern == "item":
                try:
                    x.sum().item()
                except (RuntimeError, NotImplementedError):
                    pass
            elif pattern == "nonzero":
                try:
                    x.nonzero()
                except (RuntimeError, NotImplementedError):
                    pass
            elif pattern == "equal":
                try:
                    torch.equal(x, x)
                except (RuntimeError, NotImplementedError):
                    pass
            else:
                x[:, torch.tensor([0, 1])]


def test_the_watcher_allows_device_work():
    x = torch.randn(2, 5, device=DEVICE)
    with no_host_traffic():
        i = torch.arange(5, device=x.device)
        (x * 2.0 + torch.tensor(1.0)).gather(1, i[None, :3].expand(2, 3)).softmax(-1).topk(2)


@pytest.mark.parametrize("name", methods.available())
def test_method_has_no_host_traffic(name):
    m, ctx = method_and_ctx(name)
    dctx = Context(**{f.name: to_device(getattr(ctx, f.name)) for f in dataclasses.fields(ctx)})
    with no_host_traffic():
        red = m(dctx)
    assert red.tokens.device == DEVICE and red.tokens.shape[0] == ctx.x.shape[0]


@pytest.mark.parametrize("rows", [None, 0, [0], [-1], [0, -1]], ids=["all", "int", "cls", "last", "two"])
def test_fused_attention_has_no_host_traffic(rows):
    q = torch.randn(2, 4, 17, 8, device=DEVICE)
    with no_host_traffic():
        out, scores = ops.attention_with_scores(q, q, q, score_rows=rows, backend="native")
    assert out.shape == q.shape and scores.shape == (2, 17)
