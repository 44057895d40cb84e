"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images (a base image + crops,
packed with spatial unpadding and row-newline tokens by the model's own feature path).

* no method, an LLM method, or a PROJECTOR method on features only: the model's own
  ``get_image_features``; a PROJECTOR method then reduces each image's packed features
  (tiles + newline tokens) to its budget;
* a VIT method, or a PROJECTOR method that needs the vision tower ([CLS] attention,
  attention received, values, keys, the patch grid, pixels): it runs on every tile (budget
  per tile, see `LlavaNextAdapter.prepare_tiles`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...methods.base import Need, Stage
from ..stages import check_needs
from .base import Prepared
from .llava import TOWER_STATISTICS, LlavaAdapter

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(LlavaAdapter):
    kind = "llava-next"
    class_prefixes = ("LlavaNext",)

    def check_method(self) -> None:
        if self.method is not None and self.method.stage == Stage.LLM:
            check_needs(self.method, {Need.GRID: "LLaVA-NeXT's packed anyres image tokens (tiles, unpadding, row "
                                                 "newline tokens) have no single patch grid"})

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **extra) -> Prepared:
        m, cfg = self.model, self.cfg
        meth = self.stage_method(Stage.VIT, Stage.PROJECTOR)
        if meth is not None and (meth.stage == Stage.VIT or meth.needs & (TOWER_STATISTICS | {Need.GRID,
                                                                                              Need.PIXELS})):
            return self.prepare_tiles(input_ids, attention_mask, pixel_values, extra["image_sizes"])
        feats = m.model.get_image_features(pixel_values=pixel_values, image_sizes=extra["image_sizes"],
                                           vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        projector = self.stage_method(Stage.PROJECTOR)
        if isinstance(feats, (list, tuple)):
            n = {f.shape[0] for f in feats}
            if len(n) != 1 and projector is not None:
                raise ValueError("tokenreduce.models.vlm: images with different tile counts: the PROJECTOR "
                                 f"budget is applied per image, got feature counts {sorted(n)}; they must be equal "
                                 "per batch here (batch equal tile counts)")
            feats = torch.stack(list(feats)) if len(n) == 1 else feats
        steps = []
        size = None
        is_img = input_ids == self.image_token
        n_img = self.count_image_tokens(is_img)
        if projector is not None:
            red = self.reduce_projected(feats, "on the projected image features",
                                        text=self.text_embeddings(input_ids, is_img, n_img))
            steps.append({"stage": "projector", "layer": None, "tokens_in": feats.shape[1],
                          "tokens_out": red.tokens.shape[1]})
            feats, size = red.tokens, red.size
        emb, attention_mask, is_img = self.insert_image_features(input_ids, attention_mask, is_img, n_img, feats,
                                                                 size)
        return Prepared(emb, attention_mask, is_img, feats.shape[1], steps=steps)

    def prepare_tiles(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                      image_sizes: Tensor) -> Prepared:
        """A VIT / PROJECTOR method that needs the vision tower: the method runs on every
        anyres tile (base image + crops, batched as ``B * tiles`` images, each a full patch grid
        with [CLS]), with its budget per tile; the kept tokens of the tiles are concatenated in
        tile order (the spatial unpadding and row-newline tokens of the full path do not apply
        to a reduced set, as in VisionZip's LLaVA-NeXT integration)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        cfg = self.cfg
        tiles = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for s in image_sizes.tolist()]
        if len(set(tiles)) != 1:
            raise ValueError(f"tokenreduce.models.vlm: images with different tile counts {tiles}: batch equal "
                             "tile counts for a per-tile method")
        t = tiles[0]
        B = pixel_values.shape[0]
        px = pixel_values[:, :t].reshape(B * t, *pixel_values.shape[2:])
        is_img = input_ids == self.image_token
        n_img = self.count_image_tokens(is_img)
        text = self.text_embeddings(input_ids, is_img, n_img)
        vis = self.run_tower(px, text.repeat_interleave(t, dim=0) if text is not None else None)
        feats, size = self.project(vis)
        feats = feats.reshape(B, -1, feats.shape[-1])
        size = size.reshape(B, -1) if size is not None else None
        emb, attention_mask, is_img = self.insert_image_features(input_ids, attention_mask, is_img, n_img, feats,
                                                                 size)
        steps = [dict(st, tiles=t) for st in vis.steps]
        return Prepared(emb, attention_mask, is_img, feats.shape[1], steps=steps, vision=vis)
