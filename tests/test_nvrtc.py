"""The NVRTC fallback's host side, testable without a GPU: source discovery and inlining,
name expressions, argument conversion, registration guards, constants shared with the C++
launchers, argument checks of the Python CUDA implementations, `tokenreduce info`."""
import os
import re

import numpy as np
import pytest
import torch

from tokenreduce import nvrtc
from tokenreduce.nvrtc import _names
from tokenreduce.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def test_sources_are_found_and_listed():
    root = nvrtc.source_root()
    assert os.path.isfile(os.path.join(root, "common", "cuda_common.cuh"))
    srcs = nvrtc.kernel_sources()
    for rel in _names.SOURCES:
        assert rel in srcs, rel
    assert all(s.endswith("_kernels.cuh") for s in srcs)


@pytest.mark.parametrize("rel", sorted(_names.SOURCES))
def test_source_inlines_local_includes_once(rel):
    text = nvrtc.load_source(rel)
    assert '#include "' not in text
    with open(os.path.join(nvrtc.source_root(), rel)) as fh:
        raw = fh.read()
    if "cuda_common.cuh" in raw or "struct WmmaSmem {" in text:
        assert text.count("namespace tokenreduce") >= 2  # common + the op's own code
        assert text.count("struct WmmaSmem {") == 1  # cuda_common.cuh inlined exactly once
    else:  # a self-contained source (attention_with_scores keeps its helpers local)
        assert text.count("namespace tokenreduce") >= 1
    angle = set(re.findall(r"#\s*include\s*<([^>]+)>", text))
    assert angle <= {"cuda_fp16.h", "cuda_bf16.h", "mma.h"}, angle
    assert "torch" not in re.sub(r"//.*", "", text)


@pytest.mark.parametrize("rel", sorted(_names.SOURCES))
def test_every_name_expression_names_a_kernel(rel):
    text = nvrtc.load_source(rel)
    kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    assert kernels, rel
    exprs = _names.NAME_EXPRESSIONS[rel]
    for e in exprs:
        base = re.sub(r"<.*", "", e).split("::")[-1]
        assert base in kernels, (e, kernels)
    used = {re.sub(r"<.*", "", e).split("::")[-1] for e in exprs}
    assert used == kernels, f"kernels without a name expression: {kernels - used}"


def test_load_source_of_unknown_file_raises():
    with pytest.raises(FileNotFoundError, match="tokenreduce.nvrtc"):
        nvrtc.load_source("nope/nope_kernels.cuh")


def test_launch_argument_conversion():
    t = torch.zeros(3)
    assert nvrtc._arg(t) == np.uint64(t.data_ptr()) and isinstance(nvrtc._arg(t), np.uint64)
    assert nvrtc._arg(None) == np.uint64(0)
    assert nvrtc._arg(np.int32(5)).dtype == np.int32
    for bad in (5, 2.0, True):
        with pytest.raises(TypeError, match="NumPy scalars"):
            nvrtc._arg(bad)


def test_no_registration_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    status = nvrtc.register_fallbacks()
    assert set(status) == set(registry.OPS)
    assert all(v.startswith("unavailable") for v in status.values())
    info = nvrtc.backend_info()
    assert set(info) == set(registry.OPS)
    for op, v in info.items():
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenreduce::{op}", "CUDA")
        assert v == ("cuda (compiled)" if has else "cpu only")


def test_constants_match_the_cpp_launchers():
    """The NVRTC side has no copy of the launchers' constants: it reads the plans of
    csrc/<op>/<op>_plan.h from the compiled library (tests/test_launch_plans.py has more)."""
    from tokenreduce import _C

    h = open(os.path.join(CSRC, "kcenter", "kcenter_plan.h")).read()
    assert re.search(r"kKcenterGramBudget\s*=\s*1LL << 30;", h)
    assert _C.plans.constants()["kcenter"]["KcenterGramBudget"] == 1 << 30
    assert "return (long long)N * acc_size + (stream ? (long long)D * acc_size : 0) + N;" in h
    assert _C.plans.kcenter(65, 2048, 7, 4, True).select.smem == 2048 * 4 + 7 * 4 + 2048  # stream mode
    assert _C.plans.kcenter(1, 100, 7, 4, True).select.smem == 100 * 4 + 100  # Gram mode: no pick row
    bm = open(os.path.join(CSRC, "bipartite_merge", "bipartite_merge_plan.h")).read()
    assert "return Na * acc_size + 2 * Na * 4 + (Nb + 1) * 4 + 16;" in bm
    assert _C.plans.bipartite_merge(1, 11, 1, 8).plan.smem == 6 * 8 + 2 * 6 * 4 + 6 * 4 + 16
    assert "if (stream) return 1024;" in h and _C.plans.kcenter(64, 5000, 8, 4, False).select.block == 1024
    assert _C.plans.kcenter(1, 10, 8, 4, False).select.block == 64
    assert _C.plans.kcenter(1, 577, 8, 4, False).select.block == 608
    assert _C.plans.kcenter(1, 5000, 8, 4, False).select.block == 1024
    for name in ("kcenter.py", "bipartite_merge.py", "recycle.py", "attention_with_scores.py"):
        src = open(os.path.join(ROOT, "tokenreduce", "nvrtc", name)).read()
        assert "_C.plans." in src and not re.search(r"^[A-Z_]+ = \d", src, re.M), name


def test_python_implementations_check_arguments_first():
    """Argument errors raise (op-named) before anything touches a GPU."""
    from tokenreduce.nvrtc.bipartite_merge import bipartite_merge_cuda
    from tokenreduce.nvrtc.kcenter import kcenter_cuda
    from tokenreduce.nvrtc.recycle import recycle_cuda

    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="tokenreduce.kcenter: metric"):
        kcenter_cuda(x, 3, "dot", 0, None, False, None)
    with pytest.raises(IndexError, match="tokenreduce.kcenter: first=10 is out of range"):
        kcenter_cuda(x, 3, "cosine", 10, None, False, None)
    with pytest.raises(ValueError, match=r"tokenreduce.kcenter: first must be .* shape \[B\]"):
        kcenter_cuda(x, 3, "cosine", 0, torch.zeros(3, dtype=torch.long), False, None)
    with pytest.raises(ValueError, match="tokenreduce.bipartite_merge: r=6"):
        bipartite_merge_cuda(x, 6, None, None, 0, "tome")
    with pytest.raises(TypeError, match="tokenreduce.bipartite_merge: metric"):
        bipartite_merge_cuda(x, 2, torch.ones(2, 10, 3, dtype=torch.long), None, 0, "tome")
    t = torch.zeros(2, 0, dtype=torch.long)
    s = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="tokenreduce.recycle: sources need at least one target"):
        recycle_cuda(x, t, s, None, None, None, "cosine", True)
    with pytest.raises(TypeError, match="tokenreduce.recycle: target"):
        recycle_cuda(x, t.int(), s, None, None, None, "cosine", True)


def test_info_shows_cuda_backend_column(capsys):
    from tokenreduce.cli import kernel_table, main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA backend" in out
    rows = kernel_table()
    assert all(r["backend"] in ("cuda (compiled)", "cuda (nvrtc via cupy)", "cpu only") for r in rows)
    if not torch.cuda.is_available():   # no GPU: "cpu only", unless the extension was built with CUDA
        compiled = torch._C._dispatch_has_kernel_for_dispatch_key("tokenreduce::kcenter", "CUDA")
        assert ("cuda (compiled)" if compiled else "cpu only") in out


def test_compile_check_script_is_wired():
    """tools/cuda_compile_check.sh globs every csrc/*/*.cu and reads the name expressions."""
    script = open(os.path.join(ROOT, "tools", "cuda_compile_check.sh")).read()
    assert "csrc/*/*.cu" in script and "_names.py" in script and "cuda_spill_allowlist.txt" in script
    assert os.access(os.path.join(ROOT, "tools", "cuda_compile_check.sh"), os.X_OK)


def test_registration_path_in_a_subprocess():
    """register_fallbacks() registers the Python CUDA kernels with the dispatcher (simulated
    GPU: `available` patched; a subprocess keeps the registration out of this process)."""
    import subprocess
    import sys

    script = r'''
import torch
import tokenreduce.nvrtc as nvrtc
nvrtc.available = lambda: True
st = nvrtc.register_fallbacks()
for op in ("kcenter", "bipartite_merge", "recycle"):
    assert st[op] == "registered", st
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenreduce::{op}", "CUDA")
assert st["attention_with_scores"] in ("registered", "no NVRTC implementation", "compiled kernel present"), st
assert nvrtc.backend_info()["kcenter"] == "cuda (nvrtc via cupy)"
assert nvrtc.register_fallbacks()["kcenter"] == "registered"  # idempotent
from tokenreduce.cli import kernel_table
rows = {r["op"]: r for r in kernel_table()}
assert rows["recycle"]["CUDA"] and rows["recycle"]["backend"] == "cuda (nvrtc via cupy)"
print("OK")
'''
    if torch.cuda.is_available():
        pytest.skip("a real GPU process registers for real")
    if torch._C._dispatch_has_kernel_for_dispatch_key("tokenreduce::kcenter", "CUDA"):
        pytest.skip("the extension has compiled CUDA kernels (the GPU machine's prebuilt one): no fallback to register")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
