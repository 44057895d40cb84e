"""The core ops of tokenreduce.

Each op is a real torch op (`torch.ops.tokenreduce.<name>`) with a C++ CPU kernel and a
CUDA kernel (compiled, or the NVRTC fallback of `tokenreduce.nvrtc`) chosen by the torch
dispatcher from the inputs' device. This package adds the Python-friendly signatures, the
fake (meta) kernels that `torch.compile` and `torch.library.opcheck` use, and autograd
where an op is differentiable. Plain-PyTorch references of the same contracts are in
`tokenreduce.reference`.

Layout (one module per op, as pytorch3d's ``ops/`` and extension-cpp's ``ops.py``):
  * ``attention_with_scores.py``, ``kcenter.py``, ``bipartite_merge.py``, ``recycle.py``,
    ``region_attention.py``, ``dpp_select.py``:
    the public wrapper (arguments and shapes documented), the fake-kernel registration and
    the autograd registration of that op;
  * ``checks.py``: the Python argument checks (``need_float``, ``same_device``, ...);
  * ``fake.py``: the fake kernels (also the NVRTC fallback's shape checks);
  * ``registry.py``: `OPS`, the op list, and the kernel-introspection table.

Conventions shared by every op:
  * batched inputs; float32, float16 and bfloat16 (and float64, for gradcheck), any
    strides; accumulation in float32 (float64 for float64 inputs);
  * sizes (k, r) are Python ints, so output shapes are static;
  * ties go to the smallest index;
  * bad arguments raise a ValueError / TypeError / IndexError whose message starts with
    "tokenreduce.<op>:" and names the argument.
"""
import torch  # noqa: F401  (libtorch first: the extension links against it)

from .. import _C  # noqa: F401  (loads the native library and registers the ops)
from .attention_with_scores import attention_with_scores
from .bipartite_merge import bipartite_merge
from .dpp_select import dpp_select
from .kcenter import kcenter
from .recycle import recycle
from .region_attention import region_attention

__all__ = ["attention_with_scores", "kcenter", "bipartite_merge", "recycle", "region_attention", "dpp_select"]
