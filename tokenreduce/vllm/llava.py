"""LLaVA-1.5 in vLLM with a tokenreduce method (registered over vLLM's own
``LlavaForConditionalGeneration`` by `tokenreduce.vllm.register`).

Without a ``tokenreduce`` entry in the model's config the class is vLLM's, unchanged. With one
(``hf_overrides={"tokenreduce": {"method": "visionzip", "keep": 64}}``):

* the prompt holds K placeholders per image instead of N (`ReducedLlavaProcessingInfo.
  get_num_image_tokens`, which vLLM's prompt replacement, ``get_max_image_tokens``, the
  encoder budget and the dummy profiling inputs all read): K is fixed per config (the tower's
  shape-only run on the meta device, `tokenreduce.vllm.tower.kept_count`: ToMe's count depends
  on the depth); which tokens are kept depends on the image;
* `_process_image_input` runs vLLM's CLIP tower through `tokenreduce.vllm.tower.reduced_features`
  (ViT-stage methods between its blocks, projector-stage methods on its features, statistics
  from the fused ``attention_with_scores``), then LLaVA's projector: ``[B, K, D_llm]`` per batch
  of images, merged into the K placeholders by vLLM;
* the tower is built with all of its layers (vLLM stops at ``vision_feature_layer``) so that a
  method's layer numbers mean what they mean in transformers (`run_vision` still runs only the
  layers the features and the method's statistics need).
"""
from __future__ import annotations

import functools
import json
from typing import Optional

from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              PixtralHFMultiModalProcessor, PixtralHFProcessingInfo)
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from transformers import CLIPVisionConfig, PixtralVisionConfig

from ..methods.base import Method
from .config import method_of_spec, spec_of_config
from .tower import kept_count, reduced_features

__all__ = ["ReducedLlavaForConditionalGeneration", "ReducedLlavaProcessingInfo", "kept_tokens_of"]


@functools.lru_cache(maxsize=32)
def _method(spec_json: str) -> Method:
    return method_of_spec(json.loads(spec_json))


def method_of(hf_config) -> Optional[Method]:
    """The config's method (built once per distinct spec), or None."""
    spec = spec_of_config(hf_config)
    return None if spec is None else _method(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _kept(spec_json: str, vision_json: str, feature_layer: int, select_strategy: str) -> int:
    vision_config = CLIPVisionConfig.from_dict(json.loads(vision_json))
    return kept_count(vision_config, _method(spec_json), feature_layer, select_strategy)


def kept_tokens_of(hf_config) -> Optional[int]:
    """Placeholders per image with the config's method (None: no method), from a shape-only run
    of the tower (`tokenreduce.vllm.tower.kept_count`), once per config."""
    spec = spec_of_config(hf_config)
    if spec is None:
        return None
    return _kept(json.dumps(spec, sort_keys=True), hf_config.vision_config.to_json_string(),
                 hf_config.vision_feature_layer, hf_config.vision_feature_select_strategy)


class ReducedLlavaProcessingInfo(LlavaProcessingInfo):
    """K placeholders per image instead of N."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        k = kept_tokens_of(self.get_hf_config())
        return n if k is None else k


def _build_info(ctx):
    from vllm.model_executor.models.llava import LlavaConfig

    hf_config = ctx.get_hf_config(LlavaConfig)
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return ReducedLlavaProcessingInfo(ctx)


def use_full_clip_tower(model, vllm_config, prefix: str, full: bool = True) -> None:
    """Refuse a tower other than CLIP; with ``full``, give ``model`` (a vLLM LLaVA-style model
    with a reduction) vLLM's CLIP tower with all of its layers (vLLM builds it only up to the
    feature layer), so a method's layer numbers are transformers'."""
    config = model.config
    if not isinstance(config.vision_config, CLIPVisionConfig):
        raise NotImplementedError(f"tokenreduce.vllm: a {type(config.vision_config).__name__} tower is not "
                                  "supported (CLIP only)")
    if full and len(model.vision_tower.vision_model.encoder.layers) < config.vision_config.num_hidden_layers:
        with model._mark_tower_model(vllm_config, "image"):
            model.vision_tower = CLIPVisionModel(config.vision_config, quant_config=vllm_config.quant_config,
                                                 require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"))


def _build_processor(info, dummy_inputs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    return LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ReducedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the config's tokenreduce method (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = method_of(self.config)
        if self.tokenreduce_method is None:
            return
        use_full_clip_tower(self, vllm_config, prefix)

    def _process_image_input(self, image_input):
        method = self.tokenreduce_method
        if method is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        feats = reduced_features(self.vision_tower.vision_model, image_input["pixel_values"], method,
                                 self.config.vision_feature_layer, self.config.vision_feature_select_strategy)
        want = kept_tokens_of(self.config)
        if feats.shape[1] != want:
            raise RuntimeError(f"tokenreduce.vllm: {method.name} kept {feats.shape[1]} tokens per image but the "
                               f"prompt holds {want} placeholders")
        return self.multi_modal_projector(feats)
