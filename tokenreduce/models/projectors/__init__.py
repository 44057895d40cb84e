"""Visual projectors that replace a VLM's own (`tokenreduce profile --projector`).

* `tokenpacker`: TokenPacker's region-to-point projector (576 -> 144 or 64 tokens), on the
  `tokenreduce.ops.region_attention` op; `tokenpacker_for_llava` puts it in a LLaVA-1.5
  model's projector slot.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ...errors import fail
from ..adapters import model_parts
from .tokenpacker import LlavaTokenPacker, TokenPacker, level_layers

__all__ = ["PROJECTORS", "TokenPacker", "LlavaTokenPacker", "tokenpacker_region", "tokenpacker_for_llava"]

#: ``--projector`` choices: the model's own ("mlp" for LLaVA) and the replacements
PROJECTORS = ("mlp", "tokenpacker")


def tokenpacker_region(image_tokens: int, keep: int) -> int:
    """The window side s with ``(G / s)^2 = keep`` for a ``G x G`` grid of ``image_tokens``."""
    g = int(round(image_tokens ** 0.5))
    q = int(round(keep ** 0.5)) if keep > 0 else 0
    if g * g != image_tokens or q < 1 or q * q != keep or g % q:
        fail("profile", f"--projector tokenpacker keeps (G / s)^2 tokens of a G x G grid: --keep {keep} does not "
                        f"fit {image_tokens} image tokens (e.g. 576 -> 144 or 64)")
    return g // q


def tokenpacker_for_llava(model: nn.Module, image_tokens: int, keep: int,
                          weights: Optional[str] = None) -> LlavaTokenPacker:
    """A TokenPacker for a LLaVA-1.5 model (`LlavaForConditionalGeneration`) keeping ``keep``
    of its ``image_tokens``: from the released checkpoint folder ``weights``, else random
    weights of the model's widths (``.weights`` says which). Hooks the tower's layers."""
    parts = model_parts(model)
    if parts.kind != "llava":
        fail("profile", f"--projector tokenpacker needs a LLaVA-1.5 model, got a {parts.kind} model")
    region = tokenpacker_region(image_tokens, keep)
    cfg = model.config
    vision_dim, llm_dim = cfg.vision_config.hidden_size, cfg.get_text_config().hidden_size
    levels = level_layers(len(parts.vision_layers), cfg.vision_feature_layer)
    if weights is not None:
        packer = TokenPacker.from_released(weights, region=region)
    else:
        packer = TokenPacker(vision_dim, llm_dim, len(levels), region,
                             heads=max(1, vision_dim // 128) if vision_dim >= 128 else _small_heads(vision_dim))
    return LlavaTokenPacker(packer, parts.vision_layers, levels, parts.has_cls)


def _small_heads(dim: int) -> int:
    """Heads for a test-sized width (the release's 128 per head does not fit)."""
    for h in (4, 2, 1):
        if dim % h == 0:
            return h
    return 1
