"""CDPruner: keep the MAP subset of a conditional DPP (instruction relevance x similarity)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, image_part, keep_indices


def instruction_relevance(x: Tensor, text: Tensor, theta: Optional[float] = None) -> Tensor:
    """CDPruner's relevance of image tokens ``x`` ``[B, n, D]`` to the instruction ``text``
    ``[B, T, D]`` -> ``[B, n]`` float32: ``-mean_t cos(x_i, text_t)``, min-max normalised per
    sample (``(r - min + 1e-6) / (max - min)``; a zero row has cosine 0 and max = min divides
    by 1e-12, where the authors' code gives NaN); with ``theta``, ``exp(theta / (2 (1 - theta)) r)``
    (the authors' commented-out variant)."""
    img = torch.nn.functional.normalize(x.float(), dim=-1)            # zero rows (padding) -> 0, not NaN
    txt = torch.nn.functional.normalize(text.float(), dim=-1)
    rel = -(img @ txt.transpose(1, 2)).mean(-1)                        # [B, n]
    lo, hi = rel.amin(1, keepdim=True), rel.amax(1, keepdim=True)
    rel = (rel - lo + 1e-6) / (hi - lo).clamp_min(1e-12)
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel


@register
class CDPruner(Method):
    """Conditional DPP selection (CDPruner).

    Kernel ``L = diag(r) S diag(r)`` over the image tokens: S = cosine similarity of ctx.x,
    r = the instruction relevance (`instruction_relevance` of ctx.x and ctx.text); the greedy
    MAP of the DPP (`ops.dpp_select`, the incremental Cholesky of Chen et al.) picks
    ``keep`` tokens, kept in spatial order, [CLS] first.
    x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``.
    """
    name = "cdpruner"
    paper = ("Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token "
             "Pruning in MLLMs (CDPruner), arXiv 2506.10967")
    code = "github.com/Theia-4869/CDPruner"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.TEXT})
    options = {"theta": "relevance weight in (0, 1): r -> exp(theta / (2 (1 - theta)) r) (default: off, "
                        "the authors' default linear relevance)"}
    budgets = ("keep=K or ratio=r of the image tokens ([CLS] kept on top); LLaVA-1.5 presets keep=192/128/64 "
               "of 576 (the authors' --visual_token_num: the LLM receives exactly K image tokens)")
    faithful_to = ("Theia-4869/CDPruner llava/model/llava_arch.py encode_images (commit 9541616): cosine "
                   "similarity of the image features, relevance -mean cos(image embeds, text embeds) min-max "
                   "normalised, kernel r_i S_ij r_j, the fast greedy MAP loop for visual_token_num picks, the "
                   "picks sorted (spatial order) = tokenreduce.ops.dpp_select")
    deviations = ("the authors compare CLIP's projected image embeds with CLIP text-tower embeds of the "
                  "instruction and take S on the projector output; tokenreduce's context has one feature "
                  "space: S and the relevance both use ctx.x, and ctx.text (at the projector stage the LLM "
                  "input embeddings of the prompt tokens, one per token) stands for the text embeds; when "
                  "ctx.text is missing or its width differs from ctx.x (LLaVA: CLIP 1024 vs LLM 4096) the "
                  "relevance is 1, the unconditional DPP (the authors' ablation without the instruction); "
                  "min-max per sample (the authors: over the whole batch, the same for their batch of 1); ctx.text "
                  "rows as given, padding included (zero rows count as cosine 0, the authors' division gives NaN); "
                  "unit rows with a 1e-12 norm floor, S in float32 with S_ii = 1 exactly (the authors' Gram "
                  "diagonal is 1 +- rounding, which breaks ties among equal relevances arbitrarily; here the lower "
                  "position wins); when the gain reaches 0 (singular "
                  "kernel) the rest are the unpicked tokens of the largest r^2 (the authors' loop divides by "
                  "sqrt(0))")

    def configure(self) -> None:
        theta = self.opts.get("theta")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 < float(theta) < 1.0 or not math.isfinite(float(theta))):
            fail(self.where, f"theta must be a number in (0, 1), got {theta!r}")

    def relevance(self, ctx: Context, x: Tensor) -> Optional[Tensor]:
        """The instruction relevance ``[B, n]``, or None (relevance 1) without usable text."""
        text = ctx.text
        if text is None or text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != x.shape[2] \
                or text.shape[1] == 0:
            return None
        theta = self.opts.get("theta")
        return instruction_relevance(x, text, None if theta is None else float(theta))

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        x = image_part(ctx, ctx.x)
        idx, _ = ops.dpp_select(x, self.keep_tokens(ctx.n_image), relevance=self.relevance(ctx, x))
        return keep_indices(ctx, idx)
