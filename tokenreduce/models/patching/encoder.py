"""The patched forward of a vision encoder (CLIP, SigLIP, DINOv2): ``model(pixel_values)``
runs `tokenreduce.models.vit.run_vision` with the method and returns the reduced features.

The output is a `ReducedVisionOutput` (a transformers ``BaseModelOutputWithPooling``):
``last_hidden_state`` ``[B, K, D]`` (the reduced tokens, [CLS] first where the encoder has
one), ``pooler_output``, and the un-merge map of the original patches: ``source`` int64
``[B, N0]`` (each patch's slot among the kept patch tokens, -1 when dropped), ``size``
``[B, K']`` and ``unmerge(y)`` (per-token features back to the ``N0`` patches). The same
`Tracker` is ``handle.last.tracker``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...errors import fail
from ...methods.base import Method
from ..vit import Tracker, run_vision, vision_parts
from .handle import CallStats, PatchHandle

__all__ = ["PatchedEncoder", "ReducedVisionOutput"]

UNSUPPORTED = ("output_attentions", "output_hidden_states", "bool_masked_pos", "head_mask")


@dataclass
class ReducedVisionOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` with the un-merge map of the reduction (see the module)."""
    source: Optional[Tensor] = None
    size: Optional[Tensor] = None
    tracker: Any = None
    steps: Optional[List[Dict[str, Any]]] = None

    def unmerge(self, y: Tensor, fill: str = "zeros") -> Tensor:
        """Per-patch-token features ``y`` ``[B, K', C]`` (no [CLS]) -> ``[B, N0, C]``."""
        return self.tracker.unmerge(y, fill)


class PatchedEncoder:
    """The forward installed on a vision encoder by `tokenreduce.patch`."""

    def __init__(self, model: nn.Module, method: Optional[Method], handle: PatchHandle,
                 vision_nominal_layers: Optional[int] = None):
        self.model, self.method, self.handle = model, method, handle
        self.nominal = vision_nominal_layers
        self.has_cls = vision_parts(model).has_cls

    def hooks(self):
        return []

    def __call__(self, pixel_values: Optional[Tensor] = None, *args, **kwargs):
        if pixel_values is None:
            pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            fail("patch", "a patched vision encoder takes pixel_values")
        if args:
            fail("patch", "a patched vision encoder takes pixel_values and keyword arguments only")
        bad = [k for k in UNSUPPORTED if kwargs.get(k)]
        if bad:
            fail("patch", f"{', '.join(bad)} are not available from a patched encoder (the token set changes "
                          "between layers); unpatch the model for them")
        return_dict = kwargs.pop("return_dict", True)
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            vis = run_vision(self.model, pixel_values.to(dtype), self.method, nominal_layers=self.nominal)
        self.handle.last = vis
        tr: Tracker = vis.tracker
        B, n0 = pixel_values.shape[0], tr.n0
        st = CallStats(self.method.stage.value if self.method is not None else None,
                       self.method.name if self.method is not None else None, B, _in=n0,
                       _out=vis.last_hidden_state.shape[1] - int(self.has_cls),
                       steps=[dict(s) for s in vis.steps], fallbacks=dict(vis.recorder.fallbacks))
        self.handle.record(st)
        out = ReducedVisionOutput(last_hidden_state=vis.last_hidden_state, pooler_output=vis.pooled,
                                  source=tr.source, size=tr.size, tracker=tr, steps=vis.steps)
        return out if return_dict else (out.last_hidden_state, out.pooler_output)
