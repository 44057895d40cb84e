"""FEATHER (Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for
Vision-Language Model Acceleration", ICCV 2025).

Inside the LLM, two stages (before layers 8 and 16). The score is the last token's attention
to the image tokens computed with that layer's q/k *without RoPE* (removing FastV's bias to
the image bottom), softmax over the image keys only, head mean (Need.QUERY_ATTN_NOROPE,
Need.LOOKAHEAD). Stage 1 keeps a uniform grid (every ``stride``-th row and column) plus the
top ``int(N r)`` other tokens; stage 2 keeps the top ``int(n1 r^2)`` of those by attention.
    ctx.x [B, n, D], ctx.query_attn_norope[l] [B, n] -> [B, n', D] (original order)
"""
from __future__ import annotations

from typing import List

import torch

from . import register
from ..errors import fail
from .base import Context, Need, Reduction
from .helpers import int_option, keep_positions, need, patch_grid, top_positions
from .llm_stages import LLMStages


@register
class Feather(LLMStages):
    """FEATHER: no-RoPE last-token attention + uniform grid, pruned at LLM layers 8 and 16."""
    name = "feather"
    paper = ("Endo et al., Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language "
             "Model Acceleration, ICCV 2025")
    code = "markendo/FEATHER"
    needs = frozenset({Need.FEATURES, Need.QUERY_ATTN_NOROPE, Need.LOOKAHEAD, Need.GRID})
    options = {
        "layers": "the two LLM layers before which FEATHER prunes (default (8, 16))",
        "stride": "uniform grid stride kept at stage 1 (default 3)",
    }
    budgets = ("ratio=r: attention-kept fraction at stage 1 (authors: fastv_ratio=0.7 reduction -> r=0.3, the "
               "default); keep=K: K attention tokens at stage 1 (r=K/N); stage 2 keeps int(n1 r^2); "
               "LLaVA-1.5 presets keep=192 / 128 / 64 of 576 set stage 1")
    faithful_to = ("markendo/FEATHER prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py @c2a09b2 "
                   "(FastVLlamaModel with fastv_predefined_mask='no_rope_s=3', fastv_k=[8,16], "
                   "calculate_attention_weight without RoPE, softmax over image keys)")
    deviations = ("static count at stage 1: the grid plus the top int(N r) non-grid tokens (n1 = int(N r) + "
                  "|grid|); the authors take the union of the grid with the top int(N r) tokens overall, so "
                  "their n1 shrinks by the overlap (equal sets when the top tokens avoid the grid); stage 2 "
                  "keeps int(n1 r^2) of the static n1; ties go to the smaller index")

    default_layers = (8, 16)
    layer_count = 2
    layers_rule = "two increasing ints >= 1"

    def configure(self) -> None:
        super().configure()
        self.stride = int_option(self, "stride", 3, rule="a positive int")

    def _r(self, n: int) -> float:
        if not self.budget.given:
            return 0.3
        return self.budget.resolve(n) / n

    def grid_mask(self, n: int, grid, device=None) -> torch.Tensor:
        h, w = patch_grid(self.where, n, grid)
        r = torch.arange(h, device=device)[:, None] % self.stride == 0
        c = torch.arange(w, device=device)[None, :] % self.stride == 0
        return (r & c).reshape(-1)

    def stage_counts(self, n: int, grid=None) -> List[int]:
        r = self._r(n)
        h, w = patch_grid(self.where, n, grid)
        n_grid = len(range(0, h, self.stride)) * len(range(0, w, self.stride))
        n1 = min(n, int(n * r + 1e-9) + n_grid)
        return [n1, max(1, int(n1 * r * r + 1e-9))]

    def keep_tokens(self, n: int) -> int:
        return self.stage_counts(n)[-1]

    def reduce(self, ctx: Context) -> Reduction:
        n = ctx.x.shape[1]
        stage = self.stage_of(ctx)
        attn = need(ctx, self.where, "query_attn_norope", ctx.layer + 1).float()
        if stage == 0:
            ctx.state["feather_n0"], ctx.state["feather_grid"] = n, ctx.grid
            n1 = self.stage_counts(n, ctx.grid)[0]
            g = self.grid_mask(n, ctx.grid, ctx.x.device)
            return keep_positions(ctx, top_positions(attn + 2.0 * g.to(attn.dtype), n1), sort=False)
        if "feather_n0" not in ctx.state:
            fail(self.where, "ctx.state lost the stage-1 state (reuse one ctx.state per forward)")
        k = self.stage_counts(ctx.state["feather_n0"], ctx.state["feather_grid"])[1]
        return keep_positions(ctx, top_positions(attn, min(k, n)), sort=False)
