"""CPU linear layers with their weights packed once for oneDNN, not on every call.

`torch.nn.functional.linear` on the CPU hands plain ``[out, in]`` weights to MKL / oneDNN,
which copy ("pack") the whole weight into their blocked layout on every call: a cost that
depends on the weight, not on the rows, so a call with few rows (a reduced LLM prefill, 118
instead of 630 tokens) pays relatively more of it. `PackedLinear` keeps the weight in
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, done once) and runs
``torch.ops.mkldnn._linear_pointwise`` on it: the same product (float32 to ~1e-6 relative;
bfloat16 bit-identical on the machines tested), any number of rows, no per-call packing.

    n = prepack_linears(lm.layers)   # every nn.Linear inside, in place; returns how many

Used by the profiler for the LLM decoder layers on the CPU, for the unreduced baseline and
every method alike (one model), so no side is made artificially slow or fast. Not for
training (no autograd through the packed weight) and not for CUDA (left untouched).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PackedLinear", "can_prepack", "prepack_linears"]

_DTYPES = (torch.float32, torch.bfloat16)


def can_prepack(linear: nn.Module) -> bool:
    """An ``nn.Linear`` on the CPU in float32 / bfloat16 with oneDNN available."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype in _DTYPES
            and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` pre-packed for oneDNN: ``x [..., in]`` -> ``[..., out]``
    (inference only). Built from an ``nn.Linear`` (`from_linear`); ``rows_hint``: the row
    count the blocked layout is chosen for (any row count runs)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], rows_hint: Optional[int] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows_hint: Optional[int] = None) -> "PackedLinear":
        return cls(linear.weight, linear.bias, rows_hint)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed=onednn"


def prepack_linears(module: nn.Module, rows_hint: Optional[int] = None) -> int:
    """Replace, in place, every ``nn.Linear`` under ``module`` that `can_prepack` by a
    `PackedLinear` (the plain weight is released); returns how many were replaced."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if can_prepack(child):
                setattr(parent, name, PackedLinear.from_linear(child, rows_hint))
                n += 1
    return n
