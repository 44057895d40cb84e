"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025).

Inside the LLM, staged: before layer l in ``layers`` (8, 16, 24) the last instruction token's
attention to the image tokens, computed with layer l's own q/k (input norm + RoPE) on the
current hidden states (Need.LOOKAHEAD), head mean, ranks the image tokens; the top
``int(N0 * lam**s)`` survive stage s (cumulative 0.5 / 0.25 / 0.125 of N0), original order.
    ctx.x [B, n_s, D], ctx.query_attn[l] [B, n_s] -> [B, int(N0 lam^(s+1)), D]
"""
from __future__ import annotations

from typing import List

from . import register
from ..errors import fail
from .base import Context, Need, Reduction
from .helpers import keep_positions, need, top_positions
from .llm_stages import LLMStages


@register
class PyramidDrop(LLMStages):
    """PyramidDrop: staged last-instruction-token top-k at LLM layers 8/16/24 (x0.5 each)."""
    name = "pdrop"
    paper = ("Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid "
             "Visual Redundancy Reduction, CVPR 2025")
    code = "Cooperx521/PyramidDrop"
    needs = frozenset({Need.FEATURES, Need.QUERY_ATTN, Need.LOOKAHEAD})
    options = {
        "layers": "LLM layers l before which a stage drops tokens, scored with layer l's q/k (default (8, 16, 24))",
        "lam": "per-stage keep ratio (default 0.5: cumulative 0.5 / 0.25 / 0.125)",
    }
    budgets = ("default lam=0.5 at layers 8/16/24 (no keep/ratio needed); keep=K or ratio=r sets the final "
               "count and lam=(K/N)^(1/stages); LLaVA-1.5 presets keep=192 / 128 / 64 of 576")
    faithful_to = ("Cooperx521/PyramidDrop llava/model/modeling_llama_pdrop.py @3f89f94 (pdrop_rank_drop: "
                   "layer rank_layer's q/k with RoPE, last instruction token, head mean, topk "
                   "int(N0 * ratio[s+1]), sorted)")
    deviations = ("batched without padding (the authors loop and pad per sample); with keep/ratio the per-stage "
                  "ratio is derived geometrically instead of the authors' per-budget hand-tuned schedules; "
                  "ties go to the smaller index")

    default_layers = (8, 16, 24)

    def configure(self) -> None:
        super().configure()
        self.lam = self.opts.get("lam")
        if self.lam is not None and not (0.0 < float(self.lam) <= 1.0):
            fail(self.where, f"lam must be in (0, 1], got {self.lam!r}")

    def _lam(self, n0: int) -> float:
        if self.lam is not None:
            return float(self.lam)
        if not self.budget.given:
            return 0.5
        return (self.budget.resolve(n0) / n0) ** (1.0 / len(self.layers))

    def stage_counts(self, n0: int) -> List[int]:
        """Image tokens after each stage (authors: int(N0 * ratio_list[s + 1]))."""
        lam = self._lam(n0)
        return [max(1, int(n0 * lam ** (s + 1) + 1e-9)) for s in range(len(self.layers))]

    def keep_tokens(self, n: int) -> int:
        return self.stage_counts(n)[-1]

    def reduce(self, ctx: Context) -> Reduction:
        N = ctx.x.shape[1]
        s = self.stage_of(ctx)
        if s == 0:
            ctx.state["pdrop_n0"] = N
        n0 = ctx.state.get("pdrop_n0")
        if n0 is None:
            fail(self.where, "ctx.state lost the stage-0 token count (reuse one ctx.state per forward)")
        attn = need(ctx, self.where, "query_attn", ctx.layer + 1)
        k = self.stage_counts(n0)[s]
        if k > N:
            fail(self.where, f"stage {s} keeps {k} tokens but only {N} are left")
        return keep_positions(ctx, top_positions(attn, k), sort=False)
