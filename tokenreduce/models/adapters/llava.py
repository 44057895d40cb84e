"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower run block by block
(`tokenreduce.models.vit.run_vision`, VIT / PROJECTOR methods with its [CLS] statistics),
LLaVA's feature select (``"default"`` drops [CLS]), the projector, then the image features
into the input embeddings (`VLMAdapter.insert_image_features`).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ...methods.base import Need, Stage
from .. import attention
from ..vit import VisionOutput, run_vision, vision_parts
from .base import ModelParts, Prepared, VLMAdapter

__all__ = ["LlavaAdapter"]

# statistics that only the "tokenreduce" attention of the vision tower records
TOWER_STATISTICS = frozenset({Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS})


class LlavaAdapter(VLMAdapter):
    kind = "llava"
    class_prefixes = ("Llava",)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        inner, cfg = model.model, model.config
        tower = vision_parts(inner.vision_tower)
        return ModelParts(cls.kind, tower.layers, cfg.vision_config, tower.patch, tower.has_cls,
                          projector=inner.multi_modal_projector, lm=inner.language_model, lm_head=model.lm_head,
                          text_config=cfg.get_text_config())

    def run_tower(self, pixel_values: Tensor, text: Optional[Tensor]) -> VisionOutput:
        """The CLIP tower up to ``vision_feature_layer`` with the VIT / PROJECTOR method."""
        m, vm = self.model, self.stage_method(Stage.VIT, Stage.PROJECTOR)
        if vm is not None and vm.needs & TOWER_STATISTICS:
            attention.register()
            m.model.vision_tower.set_attn_implementation(attention.NAME)
        return run_vision(m.model.vision_tower, pixel_values.to(m.dtype), vm,
                          feature_layer=self.cfg.vision_feature_layer, nominal_layers=self.vision_nominal, text=text)

    def project(self, vis: VisionOutput) -> Tuple[Tensor, Optional[Tensor]]:
        """The tower's (reduced) features through LLaVA's feature select and projector ->
        (features ``[B', K, D_llm]``, token sizes ``[B', K]`` or None without a reduction)."""
        feats = vis.features
        size = vis.reduction.size if vis.reduction is not None else None
        vm = self.stage_method(Stage.VIT, Stage.PROJECTOR)
        if self.cfg.vision_feature_select_strategy == "default" and not (vm is not None and vm.projects_cls):
            feats = feats[:, 1:]
            size = size[:, 1:] if size is not None else None
        return self.model.model.multi_modal_projector(feats), size

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **extra) -> Prepared:
        if not isinstance(self.cfg.vision_feature_layer, int):
            raise NotImplementedError("tokenreduce.models.vlm: a list of vision feature layers is not supported")
        is_img = input_ids == self.image_token
        n_img = self.count_image_tokens(is_img)
        vis = self.run_tower(pixel_values, self.text_embeddings(input_ids, is_img, n_img))
        feats, size = self.project(vis)
        emb, attention_mask, is_img = self.insert_image_features(input_ids, attention_mask, is_img, n_img, feats,
                                                                 size)
        K = feats.shape[1]
        return Prepared(emb, attention_mask, is_img, K, grid=vis.grid if K == vis.grid[0] * vis.grid[1] else None,
                        steps=vis.steps, vision=vis)
