"""Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

The vision tower (windowed, packed ``[sum N, D]``, 2x2 patch merger) gives features only:
PROJECTOR methods run on the merged image features (no [CLS], no attention statistics) and
VIT methods are refused. The 3D (t, h, w) M-RoPE position ids are computed by the model's
``get_rope_index`` on the full input; a PROJECTOR reduction keeps the kept tokens' *original*
positions (gathered before the image-token runs are cut) and the next decoding position is
recomputed for the shorter sequence (`next_position`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...methods.base import Context, Need, Stage
from ..positions import gather_positions
from ..stages import check_needs, check_reduction
from .base import ModelParts, Prepared, VLMAdapter

__all__ = ["Qwen2VLAdapter", "next_position"]


def next_position(pos: Tensor, attention_mask: Tensor) -> Tensor:
    """M-RoPE positions ``[3, B, L]`` -> ``[B]`` the position of the next token."""
    p = pos.masked_fill(~attention_mask.bool().unsqueeze(0), -1)
    return p.amax(dim=(0, 2)) + 1


class Qwen2VLAdapter(VLMAdapter):
    kind = "qwen2-vl"
    class_prefixes = ("Qwen2VL", "Qwen2_5_VL")

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        inner, cfg = model.model, model.config
        return ModelParts(cls.kind, inner.visual.blocks, cfg.vision_config, cfg.vision_config.patch_size,
                          False, projector=getattr(inner.visual, "merger", None), lm=inner.language_model,
                          lm_head=model.lm_head, text_config=cfg.get_text_config())

    def check_method(self) -> None:
        method, name = self.method, type(self.model).__name__
        if method is not None and method.stage == Stage.PROJECTOR:
            check_needs(method, {
                Need.CLS_ATTN: f"{name}'s vision tower has no [CLS] token (no cls_attn to give); run it on "
                               "LLaVA-1.5 / LLaVA-NeXT or a CLIP / DINOv2 encoder",
                Need.ATTN_RECEIVED: f"attention statistics of {name}'s vision tower (windowed, pre-merge patches) "
                                    "are not collected; only features / grid / text are given",
                Need.VALUES: f"attention values of {name}'s vision tower are not collected",
                Need.KEYS: f"attention keys of {name}'s vision tower are not collected"})
        if method is not None and method.stage == Stage.VIT:
            raise NotImplementedError(f"tokenreduce.models.vlm: Stage.VIT methods run in the CLIP towers of "
                                      f"LLaVA-1.5 / LLaVA-NeXT (per tile) and in vision encoders; not in {name}'s "
                                      "windowed vision tower")

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                mm_token_type_ids: Optional[Tensor] = None, **_) -> Prepared:
        m = self.model
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token).int()
        pos, _deltas = m.model.get_rope_index(input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None,
                                              attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
        out = m.model.get_image_features(pixel_values, image_grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        merge = self.cfg.vision_config.spatial_merge_size
        thw = image_grid_thw.tolist()                     # host metadata from the processor
        counts = [t * (h // merge) * (w // merge) for t, h, w in thw]
        if len(feats) == 1 and len(counts) > 1:
            feats = list(torch.split(feats[0], counts))
        is_img = input_ids == self.image_token
        steps: List[Dict[str, Any]] = []
        equal = len(set(counts)) == 1
        t, h, w = thw[0]
        grid = (h // merge, w // merge) if equal and t == 1 else None
        size = None
        if self.stage_method(Stage.PROJECTOR) is not None:
            keep = self.method.keep_tokens(min(counts))
            tokens, index, size = self._reduce(feats, counts, grid, input_ids, is_img, keep)
            steps.append({"stage": "projector", "layer": None, "tokens_in": counts, "tokens_out": keep})
            input_ids, attention_mask, pos, is_img, feats_cat, size = self._cut(
                input_ids, attention_mask, pos, is_img, max(counts), tokens, index, size, min(counts))
            n_img = keep
        elif equal:
            n_img = self.count_image_tokens(is_img)
            feats_cat = torch.stack(feats)
        else:   # different grids, no reduction: the model's own packed insertion
            emb = m.get_input_embeddings()(input_ids)
            emb = emb.masked_scatter(is_img.unsqueeze(-1), torch.cat(feats).to(emb.dtype))
            return Prepared(emb, attention_mask, is_img, -1, pos, next_position(pos, attention_mask), None, steps)
        emb, attention_mask, is_img = self.insert_image_features(input_ids, attention_mask, is_img, n_img, feats_cat,
                                                                 size)
        return Prepared(emb, attention_mask, is_img, n_img, pos, next_position(pos, attention_mask), grid, steps)

    def _reduce(self, feats: List[Tensor], counts: List[int], grid, input_ids: Tensor, is_img: Tensor, keep: int):
        """The PROJECTOR method on each image's merged features ``[N_i, D]`` -> (tokens
        ``[B, keep, D]``, index ``[B, keep]`` (-1: padding slot), size ``[B, keep]``)."""
        if len(set(counts)) == 1:
            x = torch.stack(feats)
            red = self.reduce_projected(x, "on the merged image features", grid=grid,
                                        text=self.text_embeddings(input_ids, is_img, counts[0]))
            tokens, index, size = red.tokens, red.index, red.size
        else:
            # different grids: one method call per distinct size keeps the method batched
            tokens = feats[0].new_empty(len(feats), keep, feats[0].shape[-1])
            index = torch.empty(len(feats), keep, dtype=torch.long, device=feats[0].device)
            size = torch.ones(len(feats), keep, device=feats[0].device)
            for n in sorted(set(counts)):
                rows = [i for i, c in enumerate(counts) if c == n]
                x = torch.stack([feats[i] for i in rows])
                r = self.method.__class__(keep=keep, **self.method.opts)(Context(x=x, has_cls=False))
                check_reduction(self.method, x, r, "on the merged image features")
                tokens[rows] = r.tokens
                index[rows] = r.index
                size[rows] = r.size.float()
        if tokens.shape[1] != keep:
            raise ValueError(f"tokenreduce.models.vlm: {self.method.name} returned {tokens.shape[1]} tokens, "
                             f"expected {keep}")
        return tokens, index, size

    def _cut(self, input_ids, attention_mask, pos, is_img, n_max: int, tokens, index, size, n_min: int):
        """Cut each row to its text and kept image tokens, keeping their own (t, h, w)
        positions: returns (input_ids, attention_mask, pos, is_img, tokens, size), the kept
        tokens in sequence order."""
        B = input_ids.shape[0]
        # image positions per sample (padded with the last one for smaller images)
        order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices[:, :n_max]
        # padding slots (index -1) take distinct unused image positions (then masked)
        valid = index >= 0
        used = torch.zeros(B, n_max + 1, dtype=torch.int8, device=index.device).scatter(
            1, torch.where(valid, index, torch.full_like(index, n_max)), 1)[:, :n_max]
        free = torch.sort(used, dim=1, stable=True).indices
        pad_rank = ((~valid).long().cumsum(1) - 1).clamp(0, n_max - 1)
        index = torch.where(valid, index, free.gather(1, pad_rank))
        srt = index.sort(dim=1)
        kept_img_pos = order.gather(1, srt.values)
        tokens = tokens.gather(1, srt.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        size = size.float().gather(1, srt.indices)
        keep_mask = (~is_img).scatter(1, kept_img_pos, torch.ones_like(kept_img_pos, dtype=torch.bool))
        # kept length per row = L - (its image tokens) + keep: the longest from the host counts,
        # with no read-back from the device (equal per row unless image sizes differ: then pad)
        Lp = input_ids.shape[1] - n_min + tokens.shape[1]
        key = (~keep_mask).to(torch.int8)
        sel = torch.sort(key, dim=1, stable=True).indices[:, :Lp].sort(dim=1).values
        # rows with fewer kept tokens (smaller text) are left-padded by rolling pads in front
        input_ids = input_ids.gather(1, sel)
        attention_mask = attention_mask.gather(1, sel) & keep_mask.gather(1, sel).to(attention_mask.dtype)
        pos = gather_positions(pos, sel, 2)
        is_img = keep_mask.gather(1, sel) & (input_ids == self.image_token)
        return input_ids, attention_mask, pos, is_img, tokens, size
