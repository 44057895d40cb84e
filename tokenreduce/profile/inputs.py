"""Inputs for a profile run: shipped (or given) images, preprocessed per model family, and for
VLMs a prompt around the image tokens.

No tokenizer is available offline for random-weight presets, so a prompt is turned into ids
byte by byte (``3 + byte``: clear of pad 0, BOS 1, EOS 2 and of every image / vision special
token of the presets). Every sample of a batch gets the same prompt, so no padding is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import images as _images

__all__ = ["VisionInputs", "VLMInputs", "load_batch", "vision_inputs", "vlm_inputs", "prompt_ids"]

DEFAULT_PROMPT = "Describe the image in one sentence."


def load_batch(batch: int, paths: Optional[Sequence[str]] = None) -> List[Tuple[str, Any]]:
    """``batch`` images: the given files (or the shipped ones), cycled when there are fewer."""
    if batch < 1:
        raise ValueError(f"tokenreduce.profile: --batch must be >= 1, got {batch}")
    ims = _images.load_images(paths, n=None if paths else batch)
    return [ims[i % len(ims)] for i in range(batch)]


def prompt_ids(text: str) -> List[int]:
    return [3 + b for b in text.encode("utf-8")]


@dataclass
class VisionInputs:
    pixel_values: Tensor
    names: List[str]

    def to(self, device, dtype) -> "VisionInputs":
        return VisionInputs(self.pixel_values.to(device, dtype), self.names)


@dataclass
class VLMInputs:
    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor
    extra: Dict[str, Any] = field(default_factory=dict)
    names: List[str] = field(default_factory=list)
    n_image_tokens: int = 0

    def to(self, device, dtype) -> "VLMInputs":
        ex = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        return VLMInputs(self.input_ids.to(device), self.attention_mask.to(device),
                         self.pixel_values.to(device, dtype), ex, self.names, self.n_image_tokens)

    def kwargs(self) -> Dict[str, Any]:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    pixel_values=self.pixel_values, **self.extra)


def vision_inputs(family: str, image_size: int, ims) -> VisionInputs:
    kind = {"dinov2": "dinov2", "clip": "clip", "siglip": "siglip"}[family]
    return VisionInputs(_images.preprocess(ims, kind, image_size), [n for n, _ in ims])


def _ids(before: List[int], n_img: int, image_token: int, after: List[int], batch: int) -> Tuple[Tensor, Tensor]:
    row = before + [image_token] * n_img + after
    ids = torch.tensor(row, dtype=torch.long).expand(batch, -1).contiguous()
    return ids, torch.ones_like(ids)


def vlm_inputs(model, kind: str, image_size: int, ims, prompt: str = DEFAULT_PROMPT) -> VLMInputs:
    """Inputs for a LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL model (CPU tensors, float32 pixels)."""
    cfg = model.config
    names = [n for n, _ in ims]
    pil = [im for _, im in ims]
    B = len(pil)
    text = prompt_ids("\n" + prompt + " ASSISTANT:")
    if kind == "llava":
        px = _images.preprocess(ims, "clip", image_size)
        patch = cfg.vision_config.patch_size
        n = (image_size // patch) ** 2
        ids, am = _ids([1] + prompt_ids("USER: "), n, cfg.image_token_id, text, B)
        return VLMInputs(ids, am, px, {}, names, n)
    if kind == "llava-next":
        from transformers import LlavaNextImageProcessorPil
        s = image_size
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                          image_grid_pinpoints=cfg.image_grid_pinpoints,
                                          image_mean=_images.CLIP_MEAN, image_std=_images.CLIP_STD)
        # one size for every image: the same tile count per sample (a rectangular batch)
        pil = [im.resize((2 * s, s)) for im in pil]
        o = proc(images=pil, return_tensors="pt")
        px, sizes = o["pixel_values"], o["image_sizes"]
        with torch.no_grad():
            f = model.model.get_image_features(pixel_values=px.to(model.device, model.dtype), image_sizes=sizes,
                                               vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        f = f.pooler_output if hasattr(f, "pooler_output") else f
        n = int(f[0].shape[0])
        ids, am = _ids([1] + prompt_ids("USER: "), n, cfg.image_token_id, text, B)
        return VLMInputs(ids, am, px, {"image_sizes": sizes}, names, n)
    if kind in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        from transformers import Qwen2VLImageProcessorPil
        vc = cfg.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        s = max(unit, image_size // unit * unit)
        proc = Qwen2VLImageProcessorPil(min_pixels=s * s, max_pixels=s * s, patch_size=vc.patch_size,
                                        merge_size=vc.spatial_merge_size,
                                        temporal_patch_size=vc.temporal_patch_size)
        o = proc(images=[im.resize((s, s)) for im in pil], return_tensors="pt")
        thw = o["image_grid_thw"]
        t, h, w = (int(v) for v in thw[0])
        n = t * (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
        ids, am = _ids(prompt_ids("USER: ") + [cfg.vision_start_token_id], n, cfg.image_token_id,
                       [cfg.vision_end_token_id] + text, B)
        return VLMInputs(ids, am, o["pixel_values"], {"image_grid_thw": thw}, names, n)
    raise ValueError(f"tokenreduce.profile: no input builder for model kind {kind!r}")
