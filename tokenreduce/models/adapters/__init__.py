"""Per-architecture VLM adapters, and `model_parts`: where any supported model's parts are.

* `llava.LlavaAdapter`: LLaVA-1.5; `llava_next.LlavaNextAdapter`: LLaVA-NeXT (anyres tiles);
  `qwen2_vl.Qwen2VLAdapter`: Qwen2-VL / Qwen2.5-VL; `qwen3_vl.Qwen3VLAdapter`: Qwen3-VL (DeepStack);
* `base`: what they share (`VLMAdapter.insert_image_features`, `Prepared`, `ModelParts`).

A new architecture is a `VLMAdapter` subclass in its own file, listed in `ADAPTERS`.
"""
from __future__ import annotations

from typing import Optional, Type

from torch import nn

from ..vit import vision_parts
from .base import ModelParts, Prepared, VLMAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

__all__ = ["ADAPTERS", "adapter_class", "model_parts", "ModelParts", "Prepared", "VLMAdapter", "LlavaAdapter",
           "LlavaNextAdapter", "Qwen2VLAdapter", "Qwen3VLAdapter"]

# first match wins: LLaVA-NeXT's class names also start with "Llava"
ADAPTERS = (LlavaNextAdapter, LlavaAdapter, Qwen2VLAdapter, Qwen3VLAdapter)


def adapter_class(model: nn.Module) -> Optional[Type[VLMAdapter]]:
    """The adapter for ``model``'s class, or None for a model no adapter serves."""
    return next((cls for cls in ADAPTERS if cls.matches(model)), None)


def model_parts(model: nn.Module) -> ModelParts:
    """Where ``model``'s parts are: a VLM (through its adapter) or a vision encoder
    (`tokenreduce.models.vit.vision_parts`: DINOv2, CLIP, SigLIP; TypeError otherwise)."""
    cls = adapter_class(model)
    if cls is not None:
        return cls.parts(model)
    v = vision_parts(model)
    return ModelParts(v.family, v.layers, v.config, v.patch, v.has_cls)
