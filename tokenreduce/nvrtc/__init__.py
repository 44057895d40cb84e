"""Run-time CUDA fallback: the same device sources as the compiled CUDA kernels, compiled
at run time with NVRTC through CuPy.

For machines where the extension was built without CUDA (CPU torch at build time, no
nvcc, ``TOKENREDUCE_CUDA=0``) but torch sees a GPU and CuPy is installed:
``register_fallbacks()`` (called when the ``tokenreduce`` package is imported) registers
Python CUDA implementations of the ops that have no compiled CUDA kernel with
``torch.library``; they launch the kernels of ``csrc/<op>/<op>_kernels.cuh`` on torch's
current stream. Outputs, checks and the CUDA error policy are the compiled glue's
(csrc/<op>/<op>_cuda.cpp); the argument checks are `tokenreduce.ops.fake`'s. The launch
geometry (mode, grids, blocks, shared memory) is not re-derived here: each op asks the
compiled library for the plan its CUDA launcher uses (``tokenreduce._C.plans.<op>``, from
csrc/<op>/<op>_plan.h), so <op>.py keeps only argument marshalling and launching.

Where the sources come from: a regular install ships them as package data in
``tokenreduce/nvrtc/_src/`` (copied by setup.py's build_py); an editable / in-place build
reads them from the source tree's ``csrc/``. ``source_root()`` returns the first of the two
that exists. Local ``#include "..."`` lines are inlined here (each file once), so NVRTC
needs no include path and the cache key (a hash of the inlined text) covers every file.

API (also used by the attention_with_scores fallback):
    get_kernel(source_relpath, name_expression, options=()) -> cupy.RawKernel
    launch(kernel, grid, block, args, shared_mem=0)
    launch_step(kernel, step, args)   (step: a _C.plans KernelLaunch)

``args`` may hold torch tensors (passed as their data pointers), ``None`` (a null
pointer) and NumPy scalars whose type matches the kernel parameter exactly
(``numpy.int32`` for ``int``, ``numpy.int64`` for ``long long``, ``numpy.float32`` for
``float``, ...). Plain Python ints / floats are refused: their width would be a guess.
Compiled modules are cached in-process by (source hash, arch, options) and on disk by
CuPy's own kernel cache.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Dict, List, Sequence, Tuple

from ..errors import fail
from ..ops.registry import OPS, has_kernel
from ._names import CTYPES, SOURCES

__all__ = [
    "source_root", "kernel_sources", "load_source", "available", "get_kernel", "launch", "launch_step",
    "max_shared_memory_optin", "register_fallbacks", "backend_info",
]
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_SEARCH = (
    os.path.join(_PKG_DIR, "_src"),
    os.path.normpath(os.path.join(_PKG_DIR, "..", "..", "csrc")),
)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_lock = threading.Lock()
_modules: Dict[tuple, object] = {}
_kernels: Dict[tuple, object] = {}  # (source, name expression, options, device) -> RawKernel
_streams: Dict[tuple, object] = {}
_registered: Dict[str, str] = {}  # op -> module that registered its CUDA kernel here
_lib = None  # torch.library.Library("tokenreduce", "IMPL"), kept alive


# ----------------------------------------------------------------------------- sources
def source_root() -> str:
    """Directory holding common/cuda_common.cuh and <op>/<op>_kernels.cuh."""
    for d in _SEARCH:
        if os.path.isfile(os.path.join(d, "common", "cuda_common.cuh")):
            return d
    fail("nvrtc", "no CUDA kernel sources found (looked in " + ", ".join(_SEARCH) + ")", FileNotFoundError)


def kernel_sources() -> List[str]:
    """Paths (relative to source_root()) of every <op>/<op>_kernels.cuh."""
    root = source_root()
    out = []
    for d in sorted(os.listdir(root)):
        full = os.path.join(root, d)
        if os.path.isdir(full):
            out += [f"{d}/{f}" for f in sorted(os.listdir(full)) if f.endswith("_kernels.cuh")]
    return out


def load_source(relpath: str) -> str:
    """The text of a device source with its local includes inlined (each file once)."""
    root = source_root()
    seen = set()

    def expand(path: str) -> str:
        path = os.path.normpath(path)
        if path in seen:
            return ""
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        here = os.path.dirname(path)
        return _INCLUDE.sub(lambda m: expand(os.path.join(here, m.group(1))), text)

    full = os.path.join(root, relpath)
    if not os.path.isfile(full):
        fail("nvrtc", f"no kernel source {relpath!r} under {root}", FileNotFoundError)
    return expand(full)


# ----------------------------------------------------------------------------- runtime
def available() -> bool:
    """torch sees a CUDA device and CuPy imports."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _arch() -> str:
    import cupy

    return cupy.cuda.Device().compute_capability  # e.g. "90" (of the device made current)


def _include_options() -> Tuple[str, ...]:
    """-I for the CUDA headers (cuda_fp16.h, cuda_bf16.h) when NVRTC lacks them built in."""
    try:
        import cupy

        path = cupy.cuda.get_cuda_path()
    except Exception:
        path = None
    import glob
    import sys

    bases = [path, os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for p in sys.path:  # pip's CUDA header wheels (nvidia-cuda-runtime): nvidia/cu13/include
        bases += sorted(glob.glob(os.path.join(p, "nvidia", "cu*")), reverse=True)
        bases.append(os.path.join(p, "nvidia", "cuda_runtime"))
    for base in bases:
        if base and os.path.isfile(os.path.join(base, "include", "cuda_fp16.h")):
            return ("-I" + os.path.join(base, "include"),)
    return ()  # NVRTC will report the missing header: set CUDA_PATH


def _module(relpath: str, name_expressions: Sequence[str], options: Tuple[str, ...]):
    import cupy

    code = load_source(relpath)
    key = (hashlib.sha256(code.encode()).hexdigest(), _arch(), tuple(options), tuple(name_expressions))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = cupy.RawModule(code=code, options=("-std=c++17",) + _include_options() + tuple(options),
                                 name_expressions=list(name_expressions))
            mod.compile()
            _modules[key] = mod
    return mod


def get_kernel(source_relpath: str, name_expression: str, options: tuple = ()):
    """The kernel `name_expression` (e.g. "ns::kern<float>") of a device source, compiled
    for the current device. All the source's known name expressions (tokenreduce.nvrtc._names)
    are compiled together, so each source compiles once per device arch and options; the
    kernel is then cached per device, so later calls cost a dict lookup."""
    import cupy
    import torch

    dev = torch.cuda.current_device()  # torch's device (the op wrappers make it the input's)
    fast_key = (source_relpath, name_expression, tuple(options), dev)
    kern = _kernels.get(fast_key)
    if kern is not None:  # the per-launch path: no file reads, no hashing
        return kern
    names: List[str] = []
    fn = SOURCES.get(source_relpath)
    if fn is not None:
        for t in CTYPES.values():
            for e in fn(t).values():
                if e not in names:
                    names.append(e)
    if name_expression not in names:
        names.append(name_expression)
    with cupy.cuda.Device(dev):
        mod = _module(source_relpath, names, tuple(options))
        kern = mod.get_function(name_expression)
    _kernels[fast_key] = kern
    return kern


def _arg(a):
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if a is None:
        return np.uint64(0)
    if isinstance(a, np.generic):
        return a
    fail("nvrtc.launch", "pass NumPy scalars (numpy.int32, numpy.int64, numpy.float32, ...) matching the "
                         f"kernel's parameter types, torch tensors or None; got {type(a).__name__}", TypeError)


def _current_stream():
    import cupy
    import torch

    s = torch.cuda.current_stream()
    key = (s.device_index, s.cuda_stream)
    st = _streams.get(key)
    if st is None:
        st = cupy.cuda.ExternalStream(s.cuda_stream, s.device_index)
        _streams[key] = st
    return st


def launch(kernel, grid, block, args: tuple, shared_mem: int = 0) -> None:
    """Launch `kernel` on torch's current stream and device (no host sync)."""
    import cupy
    import torch

    grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
    block = tuple(int(b) for b in (block if isinstance(block, (tuple, list)) else (block,)))
    if any(g <= 0 for g in grid):
        return  # nothing to do (an empty dimension)
    conv = tuple(_arg(a) for a in args)
    with cupy.cuda.Device(torch.cuda.current_device()):
        if shared_mem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = int(shared_mem)
        with _current_stream():
            kernel(grid, block, conv, shared_mem=int(shared_mem))


def launch_step(kernel, step, args: tuple) -> None:
    """Launch `kernel` as a planned step (a ``tokenreduce._C.plans.KernelLaunch``: grid,
    block, dynamic shared memory); a step with grid x == 0 is not launched."""
    launch(kernel, step.grid, (step.block,), args, shared_mem=step.smem)


def max_shared_memory_optin() -> int:
    """Opt-in shared memory per block of torch's current device (bytes)."""
    import cupy
    import torch

    try:
        dev = cupy.cuda.Device(torch.cuda.current_device())
        return int(dev.attributes["MaxSharedMemoryPerBlockOptin"])
    except Exception:
        return 48 * 1024


# ----------------------------------------------------------------------------- registration
def _impl_function(op: str):
    """The Python CUDA implementation of `op` from tokenreduce/nvrtc/<op>.py, or None."""
    import importlib

    try:
        mod = importlib.import_module(f"{__name__}.{op}")
    except ImportError:
        return None
    return getattr(mod, f"{op}_cuda", None)


def register_fallbacks() -> Dict[str, str]:
    """Register the NVRTC implementations for the CUDA dispatch key of every op that has no
    compiled CUDA kernel, when torch sees a GPU and CuPy imports. Idempotent; returns
    {op: "registered" | reason}."""
    global _lib
    status: Dict[str, str] = {}
    if not available():
        return {op: "unavailable (no CUDA device or no CuPy)" for op in OPS}
    import torch

    for op in OPS:
        if op in _registered:
            status[op] = "registered"
            continue
        if has_kernel(op, "CUDA"):
            status[op] = "compiled kernel present"
            continue
        fn = _impl_function(op)
        if fn is None:
            status[op] = "no NVRTC implementation"
            continue
        if _lib is None:
            _lib = torch.library.Library("tokenreduce", "IMPL")
        _lib.impl(op, fn, "CUDA")
        _registered[op] = fn.__module__
        status[op] = "registered"
    return status


def backend_info() -> Dict[str, str]:
    """Per op: "cuda (compiled)", "cuda (nvrtc via cupy)" or "cpu only"."""
    out = {}
    for op in OPS:
        if op in _registered:
            out[op] = "cuda (nvrtc via cupy)"
        elif has_kernel(op, "CUDA"):
            out[op] = "cuda (compiled)"
        else:
            out[op] = "cpu only"
    return out
