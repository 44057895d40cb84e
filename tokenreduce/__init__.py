"""tokenreduce: fused kernels and published methods for visual token reduction.

`tokenreduce.ops` holds the public ops (also reachable as `torch.ops.tokenreduce.*`),
`tokenreduce.reference` their plain-PyTorch references. Importing the package also
registers the run-time CUDA fallback (`tokenreduce.nvrtc`) for ops the build has no CUDA
kernel for, when torch sees a GPU and CuPy is installed.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401
from . import nvrtc  # noqa: E402  (after ops: its CUDA implementations reuse the ops' checks)

try:  # CUDA kernels compiled at run time (NVRTC via CuPy) when the build has none
    nvrtc.register_fallbacks()
except Exception:  # pragma: no cover - a broken CuPy must not break import
    pass
