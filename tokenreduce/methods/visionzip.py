"""VisionZip: dominant tokens by [CLS] attention, contextual tokens by key-similarity merging."""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import (assemble, check_x, complement, gather_tokens, image_part, is_int_at_least, need,
                      topk_indices)

_PRESETS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def split_budget(keep: int) -> Tuple[int, int]:
    """(dominant, contextual) for ``keep`` tokens into the LLM, as the authors' entry point
    ``visionzip(model, dominant, contextual)`` takes them (dominant counts [CLS]): their
    LLaVA-1.5 splits 54+10 / 108+20 / 162+30, and the same 5/32 contextual share otherwise."""
    if keep in _PRESETS:
        return _PRESETS[keep]
    c = int(round(keep * 5 / 32)) if keep >= 2 else 0
    return keep - c, c


@register
class VisionZip(Method):
    """Dominant + contextual tokens (VisionZip).

    As the authors' entry point: ``dominant=d`` counts [CLS] (``visionzip/main.py`` passes
    ``dominant - 1`` on), and [CLS] goes on into the projector (`projects_cls`), so
    ``keep=64`` (54 + 10) gives the LLM [CLS] + 53 dominant + 10 contextual = 64 tokens.
    dominant: the ``d - 1`` image tokens with the highest [CLS] attention of ViT layer -2
    (head mean; the authors' head sum ranks the same), spatial order. contextual: the
    other ``R`` tokens in order; every ``max(1, R // c)``-th of them (the first ``c``) is
    a target, each remaining token joins its most key-similar target (cosine of the
    head-mean keys, `ops.recycle`), and a contextual token is ``target + mean(members)``.
    x ``[B, 1 + n, D]`` -> ``[B, d + c, D]`` = [CLS], dominant, contextual.
    """
    name = "visionzip"
    paper = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025"
    code = "github.com/dvlab-research/VisionZip"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.KEYS, Need.CLS_ATTN})
    options = {"dominant": "dominant tokens, [CLS] included as in the authors' visionzip() "
                           "(with contextual=, instead of keep)",
               "contextual": "contextual tokens (with dominant=)",
               "layer": "ViT layer of the [CLS] attention and keys (default -2)"}
    budgets = ("keep=K tokens into the LLM, [CLS] included (split 54+10, 108+20, 162+30 for "
               "64/128/192, else contextual = round(5K/32); [CLS] + K - 1 image tokens) or "
               "dominant=d ([CLS] included), contextual=c")
    faithful_to = ("dvlab-research/VisionZip @3151f6d visionzip/main.py visionzip() "
                   "(dominant_num = dominant - 1), visionzip/clip_encoder.py CLIPVisionTower_forward "
                   "(topk of the head-summed [CLS] row of attentions[-2], [CLS] + dominant by "
                   "masked_select, step = max(1, R // c) targets, argmax of normalised-key similarity, "
                   "one-hot bmm mean, target + mean), visionzip/llava_arch.py encode_images_visionzip "
                   "(all of them, [CLS] included, into mm_projector)")
    deviations = ("ties go to the lower position (torch.topk unspecified); fp16/bf16 similarities "
                  "accumulate in float32")
    projects_cls = True

    def configure(self) -> None:
        d, c = self.opts.get("dominant"), self.opts.get("contextual")
        if (d is None) != (c is None) or (d is not None and self.budget.given):
            fail(self.where, "give dominant= and contextual= together, or keep=/ratio= alone")
        if d is not None and not (is_int_at_least(d, 1) and is_int_at_least(c, 0) and 2 <= d + c):
            fail(self.where, f"dominant ([CLS] included) must be an int >= 1 and contextual an int >= 0 "
                             f"with a sum >= 2, got {d}, {c}")

    def default_budget_ok(self) -> bool:
        return self.opts.get("dominant") is not None

    def _split(self, n: int, projected_cls: bool = True) -> Tuple[int, int]:
        """(dominant image tokens, contextual tokens) out of ``n``: the authors' ``dominant - 1``
        when [CLS] goes on into the projector (not on a model without one, e.g. Qwen)."""
        d, c = self.opts.get("dominant"), self.opts.get("contextual")
        if d is None:
            keep = self.budget.resolve(n)
            if keep < 2:
                fail(self.where, f"keep={keep} counts [CLS]: it leaves no image token; give keep >= 2")
            d, c = split_budget(keep)
        d -= int(projected_cls)            # visionzip/main.py: dominant_num = dominant - 1 ([CLS])
        if d + c > n:
            fail(self.where, f"dominant + contextual = {d + c} exceeds the {n} image tokens")
        if c > n - d:
            fail(self.where, f"contextual={c} exceeds the {n - d} non-dominant tokens")
        return d, c

    def keep_tokens(self, n: int) -> int:
        return sum(self._split(n))

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.opts.get("layer", -2)]

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        n = ctx.n_image
        d, c = self._split(n, not ctx.cls_synthetic)
        x = image_part(ctx, ctx.x)
        keys = image_part(ctx, need(ctx, self.where, "keys", dims=3))
        score = image_part(ctx, need(ctx, self.where, "cls_attn", self.opts.get("layer", -2)))
        B, dev = x.shape[0], x.device
        dom = topk_indices(score.float(), d).sort(dim=1).values          # [B, d]
        rest = complement(dom, n)                                          # [B, R] ascending
        R = n - d
        src_d = torch.full((B, n), -1, dtype=torch.long, device=dev)
        src_d = src_d.scatter(1, dom, torch.arange(d, device=dev).expand(B, d))
        if c == 0:
            return assemble(ctx, gather_tokens(x, dom), dom, src_d)
        step = max(1, R // c)              # the authors' strided targets among the rest: 0, step, ...
        t_pos = torch.arange(0, R, step, device=dev)[:c]                   # [c], built on the device
        o_pos = complement(t_pos[None], R)[0]                              # [R - c] ascending
        target, source = rest[:, t_pos], rest[:, o_pos]
        mean, _, slot = ops.recycle(x, target, source, features=keys, include_target=False,
                                    return_slot=True)
        ctx_tokens = gather_tokens(x, target) + mean
        tokens = torch.cat([gather_tokens(x, dom), ctx_tokens], dim=1)
        index = torch.cat([dom, target], dim=1)
        src = src_d.scatter(1, target, d + torch.arange(c, device=dev).expand(B, c))
        src = src.scatter(1, source, d + slot)
        return assemble(ctx, tokens, index, src)
