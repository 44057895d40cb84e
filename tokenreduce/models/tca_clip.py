"""TCA zero-shot test-time adaptation around a transformers `CLIPModel` (the text side of TCA).

    clf = TCAClassifier(clip_model, class_embeds, methods.build("tca"))   # class_embeds [C, E]
    out = clf(pixel_values)          # out.logits [B, C] = CLIP logits + reservoir logits
    clf.reset()                      # a new test domain: empty the reservoir

Per batch: the vision tower runs with the `TCA` method (`vit.run_vision`, fused attention
scores; the reservoir's anchors of the state before the batch enter its drop layers), forward
hooks on the encoder blocks collect every sample's [CLS] token after each block ``[B, L, D]``,
the CLIP logits are ``100 * normalize(image_embeds) @ class_embeds.T`` (the authors' fixed 100),
pseudo-labels are their argmax and the prediction entropy their softmax entropy; then the
reservoir takes the samples in batch order and adds its logits (`TCAReservoir.update`).
`class_embeddings` builds ``class_embeds`` from prompts (mean of the normalised prompt
embeddings of each class, normalised, as the authors' ``clip_classifier``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.tca import TCA, TCAReservoir
from . import vit

__all__ = ["TCAClassifier", "TCAOutput", "class_embeddings"]


@dataclass
class TCAOutput:
    logits: Tensor          # [B, C] CLIP logits + reservoir logits
    clip_logits: Tensor     # [B, C]
    pred: Tensor            # [B] int64 pseudo-labels (argmax of clip_logits)
    entropy: Tensor         # [B] softmax entropy of clip_logits
    cls_layers: Tensor      # [B, L, D] the [CLS] token after every encoder block
    vision: vit.VisionOutput


@torch.no_grad()
def class_embeddings(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, per_class: int) -> Tensor:
    """``[C, E]``: prompts ``input_ids`` ``[C * per_class, T]`` (class-major) through the text tower;
    each class's normalised embeddings averaged and normalised again."""
    e = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    e = getattr(e, "pooler_output", e)
    e = F.normalize(e.float(), dim=-1).view(-1, per_class, e.shape[-1]).mean(1)
    return F.normalize(e, dim=-1)


class TCAClassifier:
    """Zero-shot CLIP classification with TCA (see the module docstring)."""

    def __init__(self, model: nn.Module, class_embeds: Tensor, method: TCA, *, size: int = 3, scale: float = 0.1,
                 lambd: float = 3.0, beta: float = 5.0, logit_scale: float = 100.0):
        if not isinstance(method, TCA):
            raise TypeError(f"tokenreduce.models.tca_clip: method must be a TCA, got {type(method).__name__}")
        self.model = vit.prepare(model)
        self.parts = vit.vision_parts(model)
        self.method = method
        self.class_embeds = F.normalize(class_embeds.float(), dim=-1)
        self.logit_scale = float(logit_scale)
        dim = self.parts.config.hidden_size
        method.reservoir = TCAReservoir(class_embeds.shape[0], len(self.parts.layers), dim, size=size,
                                        scale=scale, lambd=lambd, beta=beta, device=class_embeds.device)

    @property
    def reservoir(self) -> TCAReservoir:
        return self.method.reservoir

    def reset(self) -> None:
        """Empty the reservoir (its anchors become inactive)."""
        self.method.reset()

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor) -> TCAOutput:
        cls: List[Tensor] = []

        def grab(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            cls.append(h[:, 0].float())
        hooks = [layer.register_forward_hook(grab) for layer in self.parts.layers]
        try:
            out = vit.run_vision(self.model, pixel_values, self.method)
        finally:
            for h in hooks:
                h.remove()
        cls_layers = torch.stack(cls, dim=1)                            # [B, L, D]
        proj = getattr(self.model, "visual_projection", None)
        emb = out.pooled if proj is None else proj(out.pooled)
        feats = F.normalize(emb.float(), dim=-1)
        clip_logits = self.logit_scale * feats @ self.class_embeds.t()
        entropy = -(clip_logits.softmax(1) * clip_logits.log_softmax(1)).sum(1)
        pred = clip_logits.argmax(1)
        res = self.reservoir.update(pred, entropy, cls_layers)
        return TCAOutput(clip_logits + res, clip_logits, pred, entropy, cls_layers, out)
