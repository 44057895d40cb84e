"""The CUDA launch plans (csrc/<op>/<op>_plan.h) are the one source of launch geometry:
the C++ launchers launch from them and the NVRTC fallback reads them from the compiled
library (`tokenreduce._C.plans`). No GPU needed:

* the plans give the documented geometry on a few shapes (modes, grids, blocks, shared memory);
* the binding returns exactly what the headers compute (the headers compiled here with g++);
* the NVRTC implementations launch what the library's plan says (launches recorded on CPU
  tensors), so a changed constant or formula in a header flows through to Python.
"""
import os
import re
import shutil
import subprocess
import types

import pytest
import torch

import tokenreduce.nvrtc
from tokenreduce import _C
from tokenreduce.nvrtc import attention_with_scores as nvrtc_attention
from tokenreduce.nvrtc import bipartite_merge as nvrtc_bipartite_merge
from tokenreduce.nvrtc import kcenter as nvrtc_kcenter
from tokenreduce.nvrtc import recycle as nvrtc_recycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
plans = _C.plans


def launch_of(step):
    return step.grid, step.block, step.smem


# ----------------------------------------------------------------------------- documented values
def test_kcenter_plan():
    p = plans.kcenter(2, 577, 1024, 4, False)  # ViT-L/336 tokens: Gram mode, one thread per token
    assert p.gram and launch_of(p.sqnorm) == ((73, 2, 1), 256, 0)
    assert launch_of(p.tiles) == ((10, 10, 2), 256, 0) and not p.nn.launched
    assert launch_of(p.select) == ((2, 1, 1), 608, 577 * 4 + 577)
    p = plans.kcenter(1, 10, 7, 8, True)  # few tokens: 2 warps at least; float64 accumulation
    assert p.select.block == 64 and p.select.smem == 10 * 8 + 10 and launch_of(p.nn) == launch_of(p.sqnorm)
    # B * N * N * acc over 1 GiB: stream mode (no distance matrix, all 1024 threads, pick row in smem)
    budget = plans.constants()["kcenter"]["KcenterGramBudget"]
    assert budget == 1 << 30
    p = plans.kcenter(65, 2048, 64, 4, True)
    assert 65 * 2048 * 2048 * 4 > budget and not p.gram and not p.tiles.launched
    assert p.select.block == 1024 and p.select.smem == 2048 * 4 + 64 * 4 + 2048 and p.nn.launched
    assert plans.kcenter(65, 2048, 64, 4, False).nn.launched is False
    assert plans.kcenter(64, 2048, 64, 4, True).gram  # exactly the budget: still Gram mode
    assert plans.kcenter(1, 5000, 8, 4, False).select.block == 1024  # Gram mode capped at 1024


def test_bipartite_merge_plan():
    p = plans.bipartite_merge(3, 577, 100, 4)
    assert (p.na, p.nb, p.no, p.members) == (289, 288, 477, 100)
    assert launch_of(p.inv_norm) == ((73, 3, 1), 256, 0) and launch_of(p.match) == ((5, 3, 1), 256, 0)
    assert launch_of(p.plan) == ((3, 1, 1), 512, 289 * 4 + 2 * 289 * 4 + 289 * 4 + 16)
    assert launch_of(p.merge) == ((477, 3, 1), 128, 0)
    p = plans.bipartite_merge(1, 11, 1, 8)
    assert p.members == 1 and p.plan.smem == 6 * 8 + 2 * 6 * 4 + 6 * 4 + 16


def test_recycle_plan():
    p = plans.recycle(2, 576, 10, 500, True)  # similarity assignment
    assert launch_of(p.inv_norm) == ((72, 2, 1), 256, 0) and launch_of(p.assign) == ((8, 2, 1), 256, 0)
    assert launch_of(p.plan) == ((2, 1, 1), 512, 11 * 4) and launch_of(p.aggregate) == ((10, 2, 1), 128, 0)
    assert p.members == 500
    p = plans.recycle(2, 576, 10, 500, False)  # assign given: no similarity kernels
    assert not p.inv_norm.launched and not p.assign.launched and p.plan.launched
    p = plans.recycle(2, 576, 0, 0, True)  # no target, no source
    assert p.inv_norm.launched and not p.assign.launched and not p.aggregate.launched and p.members == 1
    assert not plans.recycle(2, 0, 3, 4, True).inv_norm.launched  # N == 0: the plan kernel poisons


def test_attention_plan_reads_the_library():
    p = nvrtc_attention.attention_plan(torch.float16, 16, 577, 577, 64, 64, -1, 232448)
    q = plans.attention_with_scores(plans.DTYPE_CODES["float16"], 16, 577, 577, 64, 64, -1, 232448)
    assert p.kc == q.kc == 640 and p.fwd_smem == q.fwd_smem and p.threads == 256
    assert p.reduce_blocks == -(-577 // 256)
    consts = plans.constants()["attention_with_scores"]
    assert nvrtc_attention.MAX_HEAD_DIM == consts["MaxHeadDim"] and nvrtc_attention.BQ == consts["BQ"]


def test_constants_are_the_headers():
    def header(path):
        with open(os.path.join(CSRC, path)) as f:
            return f.read()

    consts = plans.constants()
    kc = header("kcenter/kcenter_plan.h")
    assert re.search(r"kKcenterGramBudget = 1LL << 30;", kc) and consts["kcenter"]["KcenterGramBudget"] == 1 << 30
    common = header("common/launch_plan.h")
    for name in ("TileRows", "TileBlock", "RowThreads"):
        m = re.search(rf"constexpr int k{name} = (\d+);", common)
        assert m and int(m.group(1)) == consts["common"][name], name
    for path, op, names in (("bipartite_merge/bipartite_merge_plan.h", "bipartite_merge", ("BmPlanThreads", "BmMergeThreads")),
                            ("recycle/recycle_plan.h", "recycle", ("RcPlanThreads", "RcAggregateThreads")),
                            ("dpp_select/dpp_select_plan.h", "dpp_select", ("DppGreedyThreads",))):
        text = header(path)
        for name in names:
            m = re.search(rf"constexpr int k{name} = (\d+);", text)
            assert m and int(m.group(1)) == consts[op][name], name
            # ... and it is the kernel's launch bound
            assert f"__launch_bounds__({m.group(1)})" in header(path.replace("_plan.h", "_kernels.cuh"))


# ----------------------------------------------------------------------------- binding = headers
_CASES = {
    "kcenter": [(2, 577, 1024, 4, 0), (1, 10, 7, 8, 1), (65, 2048, 64, 4, 1), (64, 2048, 64, 4, 1), (3, 33, 5, 4, 1)],
    "bipartite_merge": [(3, 577, 100, 4), (1, 11, 1, 8), (2, 2, 1, 4)],
    "recycle": [(2, 576, 10, 500, 1), (2, 576, 10, 500, 0), (2, 576, 0, 0, 1), (1, 0, 3, 4, 1)],
    "dpp_select": [(8, 576, 1024, 64, 4), (1, 1, 3, 1, 8), (3, 2000, 64, 500, 4)],
}
_STEPS = {"kcenter": ("sqnorm", "tiles", "nn", "select"),
          "bipartite_merge": ("inv_norm", "match", "plan", "merge"),
          "recycle": ("inv_norm", "assign", "plan", "aggregate"),
          "dpp_select": ("norms", "greedy")}
_MAKE = {"kcenter": "make_kcenter_plan", "bipartite_merge": "make_bipartite_merge_plan",
         "recycle": "make_recycle_plan", "dpp_select": "make_dpp_select_plan"}


def test_binding_returns_what_the_headers_compute(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not available")
    lines = ["#include <cstdio>", '#include "kcenter/kcenter_plan.h"', '#include "bipartite_merge/bipartite_merge_plan.h"',
             '#include "recycle/recycle_plan.h"', '#include "dpp_select/dpp_select_plan.h"',
             "using namespace tokenreduce::cuda;",
             "static void pr(const KernelLaunch& l) { printf(\"%lld %lld %lld %d %lld \", l.grid_x, l.grid_y, "
             "l.grid_z, l.block, l.smem); }", "int main() {"]
    for op, cases in _CASES.items():
        for args in cases:
            lines.append(f"  {{ auto p = {_MAKE[op]}({', '.join(map(str, args))});")
            lines += [f"    pr(p.{s});" for s in _STEPS[op]]
            lines.append('    printf("\\n"); }')
    lines.append("  return 0;\n}")
    (tmp_path / "plans.cpp").write_text("\n".join(lines))
    exe = tmp_path / "plans"
    subprocess.run([gxx, "-std=c++17", f"-I{CSRC}", str(tmp_path / "plans.cpp"), "-o", str(exe)], check=True)
    rows = [list(map(int, r.split())) for r in
            subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()]
    got = []
    for op, cases in _CASES.items():
        for args in cases:
            p = getattr(plans, op)(*args)
            got.append([v for s in _STEPS[op] for v in (*getattr(p, s).grid, getattr(p, s).block, getattr(p, s).smem)])
    assert got == rows


# ----------------------------------------------------------------------------- NVRTC launches the plan
class Recorder:
    def __init__(self):
        self.calls = []

    def kernel(self, source, name, options=()):
        return name

    def launch(self, kernel, grid, block, args, shared_mem=0):
        if any(g <= 0 for g in grid):
            return  # as tokenreduce.nvrtc.launch: an empty grid is not launched
        self.calls.append((kernel.split("::")[-1].split("<")[0], tuple(grid), tuple(block)[0], shared_mem))


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tokenreduce.nvrtc, "launch", rec.launch)  # what launch_step calls
    for mod in (nvrtc_kcenter, nvrtc_bipartite_merge, nvrtc_recycle, nvrtc_attention):
        monkeypatch.setattr(mod, "get_kernel", rec.kernel)
    monkeypatch.setattr(nvrtc_attention, "launch", rec.launch)
    monkeypatch.setattr(nvrtc_attention, "_smem_optin", lambda device: 232448)
    monkeypatch.setattr(tokenreduce.nvrtc, "max_shared_memory_optin", lambda: 232448)
    return rec


def steps(plan, names):
    return [(kernel, step.grid, step.block, step.smem) for kernel, step in
            ((k, getattr(plan, s)) for k, s in names) if step.launched]


def test_nvrtc_kcenter_launches_the_plan(recorder, monkeypatch):
    x = torch.randn(2, 37, 8)
    nvrtc_kcenter.kcenter_cuda(x, 5, "cosine", 0, None, True, None)
    p = plans.kcenter(2, 37, 8, 4, True)
    assert recorder.calls == steps(p, [("kcenter_sqnorm", "sqnorm"), ("kcenter_gram", "tiles"),
                                       ("kcenter_nn_gram", "nn"), ("kcenter_select", "select")])
    # a changed plan (e.g. a new budget or block size in kcenter_plan.h) is what Python launches
    real = plans.kcenter

    def changed(*args):
        p = real(*args)
        return types.SimpleNamespace(gram=False, sqnorm=p.sqnorm, tiles=p.tiles, nn=p.nn,
                                     select=types.SimpleNamespace(grid=p.select.grid, block=96, smem=1234,
                                                                  launched=True))

    monkeypatch.setattr(plans, "kcenter", changed)
    recorder.calls.clear()
    nvrtc_kcenter.kcenter_cuda(x, 5, "cosine", 0, None, True, None)
    assert [c[0] for c in recorder.calls] == ["kcenter_sqnorm", "kcenter_nn_stream", "kcenter_select"]
    assert recorder.calls[-1][2:] == (96, 1234)


def test_nvrtc_bipartite_merge_and_recycle_launch_the_plan(recorder):
    x = torch.randn(2, 21, 8)
    nvrtc_bipartite_merge.bipartite_merge_cuda(x, 6, None, None, 1, "tome")
    p = plans.bipartite_merge(2, 21, 6, 4)
    assert recorder.calls[:3] == steps(p, [("bm_inv_norm", "inv_norm"), ("bm_match", "match"), ("bm_plan", "plan")])
    assert recorder.calls[3][0] == "bm_merge" and recorder.calls[3][1:] == launch_of(p.merge)
    recorder.calls.clear()
    tgt = torch.tensor([[0, 5, 9], [1, 2, 20]])
    src = torch.tensor([[1, 2, 3, 4, 6, 7], [0, 3, 4, 5, 6, 19]])
    nvrtc_recycle.recycle_cuda(x, tgt, src, None, None, None, "cosine", True)
    p = plans.recycle(2, 21, 3, 6, True)
    assert recorder.calls[:3] == steps(p, [("rc_inv_norm", "inv_norm"), ("rc_assign", "assign"), ("rc_plan", "plan")])
    assert recorder.calls[3][0] == "rc_aggregate" and recorder.calls[3][1:] == launch_of(p.aggregate)


def test_nvrtc_attention_launches_the_plan(recorder):
    q, k, v = torch.randn(2, 4, 70, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    nvrtc_attention.attention_with_scores_cuda(q, k, v, 0.25, False, None, torch.tensor([0]))
    p = nvrtc_attention.attention_plan(torch.float32, 4, 70, 70, 16, 16, 1, 232448)
    assert p.colscore and not p.scores_in_fwd
    assert recorder.calls == [("attn_fwd_kernel", (p.nqb, 4, 2), p.threads, p.fwd_smem),
                              ("attn_colscore_kernel", (p.nkt, 4, 2), p.threads, p.colscore_smem),
                              ("attn_reduce_scores_kernel", (p.reduce_blocks, 2, 1), p.threads, 0)]


def test_kcenter_gram_budget_argument_forces_the_stream_mode():
    from tokenreduce import _C

    assert _C.plans.kcenter(2, 100, 8, 4, False).gram                  # the library's budget
    assert not _C.plans.kcenter(2, 100, 8, 4, False, 0).gram           # what the GPU tests force
    assert _C.plans.kcenter(2, 100, 8, 4, False, 2 * 100 * 100 * 4).gram
