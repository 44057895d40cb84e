"""tokenreduce: fused kernels and published methods for visual token reduction.

`tokenreduce.ops` holds the public ops (also reachable as `torch.ops.tokenreduce.*`),
`tokenreduce.reference` their plain-PyTorch references. Importing the package also
registers the run-time CUDA fallback (`tokenreduce.nvrtc`) for ops the build has no CUDA
kernel for, when torch sees a GPU and CuPy is installed.

`tokenreduce.patch(model, method, keep=...)` / `unpatch(model)` / ``with patched(...)``: a
transformers model's own ``generate`` / ``forward`` run the reduction
(`tokenreduce.models.patching`, imported on first use: ``import tokenreduce`` stays light).
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401
from . import nvrtc  # noqa: E402  (after ops: its CUDA implementations reuse the ops' checks)

try:  # CUDA kernels compiled at run time (NVRTC via CuPy) when the build has none
    nvrtc.register_fallbacks()
except Exception:  # pragma: no cover - a broken CuPy must not break import
    pass


_PATCHING = ("patch", "unpatch", "patched")


def __getattr__(name):   # lazy: transformers is imported only when patch is first used
    if name in _PATCHING:
        from .models import patching
        return getattr(patching, name)
    raise AttributeError(f"module 'tokenreduce' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PATCHING))
