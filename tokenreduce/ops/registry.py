"""The op list and the kernel-introspection table of the ``tokenreduce`` torch library.

`OPS` is the one Python list of the ops; it must equal the schemas of
csrc/registration.cpp (tests/test_registration.py checks it against
``torch.ops.tokenreduce``). `kernel_table` says, per op, which dispatch keys have a kernel
(what ``tokenreduce info`` prints). Imports nothing of tokenreduce at module level, so the
NVRTC fallback and the benchmarks may use it freely.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

__all__ = ["OPS", "has_kernel", "has_fake", "kernel_table"]

#: the ops of the library, as ``torch.ops.tokenreduce.<name>``
OPS = ("kcenter", "bipartite_merge", "recycle", "attention_with_scores", "region_attention", "dpp_select")


def has_kernel(op: str, key: str) -> bool:
    """Whether ``tokenreduce::<op>`` has a kernel for dispatch key `key` ("CPU", "CUDA",
    "Autograd", "Meta", ...). `op` may also be given qualified (``"tokenreduce::kcenter"``)."""
    qualname = op if "::" in op else f"tokenreduce::{op}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    except Exception:
        return False


def has_fake(op: str) -> bool:
    """A fake (meta) kernel registered with torch.library.register_fake."""
    qualname = op if "::" in op else f"tokenreduce::{op}"
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # private API moved: register_fake also registers a Meta kernel
        return has_kernel(qualname, "Meta")


def kernel_table() -> List[Dict[str, Any]]:
    """Per op: whether the dispatcher has a CPU / CUDA kernel, a fake kernel (for
    torch.compile / opcheck), an autograd kernel, and where its CUDA kernel comes from
    ("cuda (compiled)", "cuda (nvrtc via cupy)" or "cpu only")."""
    try:
        from ..nvrtc import backend_info

        backends = backend_info()
    except Exception:  # the fallback package must never break `info`
        backends = {}
    rows = []
    for op in OPS:
        rows.append({
            "op": op,
            "CPU": has_kernel(op, "CPU"),
            "CUDA": has_kernel(op, "CUDA"),
            "fake": has_fake(op),
            "autograd": has_kernel(op, "Autograd"),
            "backend": backends.get(op, "cpu only"),
        })
    return rows
