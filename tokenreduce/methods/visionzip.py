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
    """(dominant, contextual) for a total of ``keep`` image tokens: the authors' LLaVA-1.5
    splits 54+10 / 108+20 / 162+30, and the same 5/32 contextual share otherwise."""
    if keep in _PRESETS:
        return _PRESETS[keep]
    c = int(round(keep * 5 / 32)) if keep >= 2 else 0
    return keep - c, c


@register
class VisionZip(Method):
    """Dominant + contextual tokens (VisionZip).

    dominant: the ``d`` image tokens with the highest [CLS] attention of ViT layer -2
    (head mean; the authors' head sum ranks the same), spatial order. contextual: the
    other ``R`` tokens in order; every ``max(1, R // c)``-th of them (the first ``c``) is
    a target, each remaining token joins its most key-similar target (cosine of the
    head-mean keys, `ops.recycle`), and a contextual token is ``target + mean(members)``.
    x ``[B, 1 + n, D]`` -> ``[B, 1 + d + c, D]`` = [CLS], dominant, contextual.
    """
    name = "visionzip"
    paper = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025"
    code = "github.com/dvlab-research/VisionZip"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.KEYS, Need.CLS_ATTN})
    options = {"dominant": "dominant tokens (with contextual=, instead of keep)",
               "contextual": "contextual tokens (with dominant=)",
               "layer": "ViT layer of the [CLS] attention and keys (default -2)"}
    budgets = ("keep=K (split 54+10, 108+20, 162+30 for 64/128/192, else contextual = round(5K/32)) "
               "or dominant=d, contextual=c")
    faithful_to = ("dvlab-research/VisionZip visionzip/clip_encoder.py CLIPVisionTower_forward "
                   "(topk of the head-summed [CLS] row of attentions[-2], masked_select, "
                   "step = max(1, R // c) targets, argmax of normalised-key similarity, "
                   "one-hot bmm mean, target + mean)")
    deviations = ("ties go to the lower position (torch.topk unspecified); fp16/bf16 similarities "
                  "accumulate in float32")

    def configure(self) -> None:
        d, c = self.opts.get("dominant"), self.opts.get("contextual")
        if (d is None) != (c is None) or (d is not None and self.budget.given):
            fail(self.where, "give dominant= and contextual= together, or keep=/ratio= alone")
        if d is not None and not (is_int_at_least(d, 0) and is_int_at_least(c, 0) and 1 <= d + c):
            fail(self.where, f"dominant and contextual must be ints >= 0 with a positive sum, got {d}, {c}")

    def default_budget_ok(self) -> bool:
        return self.opts.get("dominant") is not None

    def _split(self, n: int) -> Tuple[int, int]:
        d, c = self.opts.get("dominant"), self.opts.get("contextual")
        if d is None:
            d, c = split_budget(self.budget.resolve(n))
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
        d, c = self._split(n)
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
