"""tokenreduce: fused kernels and published methods for visual token reduction.

`tokenreduce.ops` holds the public ops (also reachable as `torch.ops.tokenreduce.*`),
`tokenreduce.reference` their plain-PyTorch references.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401
