"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Inside the LLM: after decoder layer K-1 the last token's attention to each image token
(head mean, from layer K-1's own causal softmax) ranks the image tokens; the top
``keep`` survive (original order), the rest are dropped from layer K on.
    ctx.x [B, N, D] image-token hidden states, ctx.query_attn[K-1] [B, N] -> [B, keep, D]
"""
from __future__ import annotations

from typing import List

from . import register
from ..errors import fail
from .base import Budget, Context, Method, Need, Reduction, Stage
from .helpers import is_int_at_least, keep_indices, need, topk_indices


@register
class FastV(Method):
    """FastV: keep the image tokens the last token attends to most at LLM layer K-1."""
    name = "fastv"
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024"
    code = "pkunlp-icler/FastV"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.QUERY_ATTN})
    options = {
        "layer": "K: image tokens are pruned before LLM layer K, scored by layer K-1's attention (default 2)",
        "R": "fraction of the image tokens dropped (the paper's R, default 0.5); instead of keep/ratio",
    }
    budgets = ("keep=K or ratio=r (kept), or R=drop fraction; default R=0.5 at K=2; "
               "LLaVA-1.5 presets keep=192 / 128 / 64 of 576")
    faithful_to = ("pkunlp-icler/FastV src/FastV/lmms-eval-with-kvcache/fastv_kvcache.py @49dfad7 "
                   "(last-token attention of layer K-1, head mean, topk, sorted) and "
                   "src/transformers/.../modeling_llama.py (R = dropped fraction)")
    deviations = ("batched (the authors index sample 0); kept count round(N*(1-R)) as the paper's R "
                  "(the kv-cache script uses int(576*ratio)); ties go to the smaller index")

    def configure(self) -> None:
        if "R" in self.opts:
            if self.budget.given:
                fail(self.where, "give keep/ratio or R, not both")
            R = self.opts["R"]
            if not (0.0 <= float(R) < 1.0):
                fail(self.where, f"R must be in [0, 1), got {R!r}")
            self.budget = Budget(ratio=1.0 - float(R), where=self.where)
        elif not self.budget.given:
            self.budget = Budget(ratio=0.5, where=self.where)     # the paper's default R = 0.5
        self.K = self.opts.get("layer", 2)
        if not is_int_at_least(self.K, 1):
            fail(self.where, f"layer (K) must be an int >= 1, got {self.K!r}")

    def reduce_layers(self, num_layers: int) -> List[int]:
        if self.K > num_layers:
            fail(self.where, f"layer K={self.K} exceeds the {num_layers} LLM layers")
        return [self.K - 1]

    def attention_layers(self, num_layers: int) -> List[int]:
        return self.reduce_layers(num_layers)

    def reduce(self, ctx: Context) -> Reduction:
        attn = need(ctx, self.where, "query_attn", self.K - 1)
        return keep_indices(ctx, topk_indices(attn, self.keep_tokens(ctx.x.shape[1])))
