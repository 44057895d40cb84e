"""VisionDrop (Xu et al., "VisionDrop: Training-Free Vision Token Pruning via Visual-Only
Attention", 2025) - the LLM stage (its ViT stage is VisionZip's dominant/contextual selection
on the [CLS] attention: use the ``visionzip`` method there).

Before LLM layers 8, 16, 24 the image tokens are scored by *visual-only* attention: the mean
attention each image token receives from the image-token queries (layer l's q/k with RoPE on
the current states, Need.VISUAL_ATTN + Need.LOOKAHEAD). The top ``d`` are dominant; of the
rest (original order) every ``max(1, rest // c)``-th is a contextual target and each other
token joins its most cosine-similar target (head-mean keys); a contextual token is
``target + mean(members)`` (ops.recycle). Output: dominant (spatial order) then contextual.
    ctx.x [B, n, D], ctx.visual_attn[l] [B, n], ctx.keys [B, n, Dk] -> [B, d + c, D]
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import register
from ..errors import fail
from .base import Context, Need, Reduction
from .helpers import gather_tokens, need, topk_indices
from .llm_stages import LLMStages
from .. import ops


@register
class VisionDrop(LLMStages):
    """VisionDrop (LLM stage): visual-only attention top-k + light contextual merge, staged."""
    name = "visiondrop"
    paper = "Xu et al., VisionDrop: Training-Free Vision Token Pruning via Visual-Only Attention, 2025"
    code = "Ruixxxx/VisionDrop"
    needs = frozenset({Need.FEATURES, Need.VISUAL_ATTN, Need.KEYS, Need.LOOKAHEAD})
    options = {
        "layers": "LLM layers before which a stage reduces (default (8, 16, 24))",
        "schedule": "((dominant, contextual), ...) per stage (authors' default ((30, 5), (22, 4), (16, 3)))",
        "contextual_frac": "share of contextual tokens when the schedule comes from keep/ratio (default 0.15)",
    }
    budgets = ("default: the authors' schedule ((30,5),(22,4),(16,3)) after 48 ViT tokens (their scripts: "
               "visionzip(model, dominant=42, contextual=6) = [CLS] + 41 + 6, i.e. visionzip "
               "dominant=42, contextual=6 here); keep=K or "
               "ratio=r: stage totals shrink geometrically to K; LLaVA-1.5 presets keep=192 / 128 / 64 (ViT stage "
               "by visionzip)")
    faithful_to = ("Ruixxxx/VisionDrop llava/model/modeling_llama_visiondrop.py visiondrop_rank_drop @f7a9444 "
                   "(image queries x all keys with RoPE and causal mask, head mean, image keys, mean over image "
                   "rows; topk dominant; strided contextual targets on head-mean keys; target + mean)")
    deviations = ("batched; ties go to the smaller index; the ViT stage is left to the visionzip method")

    default_layers = (8, 16, 24)

    def configure(self) -> None:
        super().configure()
        sched = self.opts.get("schedule")
        if sched is not None:
            sched = tuple((int(d), int(c)) for d, c in sched)
            if len(sched) != len(self.layers) or any(d < 1 or c < 1 for d, c in sched):
                fail(self.where, f"schedule needs one (dominant>=1, contextual>=1) "
                                 f"per layer {self.layers}, got {sched!r}")
        self.sched = sched
        self.cfrac = float(self.opts.get("contextual_frac", 0.15))

    def schedule(self, n0: int) -> List[Tuple[int, int]]:
        if self.sched is not None:
            return list(self.sched)
        if not self.budget.given:
            if len(self.layers) != 3:
                fail(self.where, "give schedule= or a budget for non-default layers")
            return [(30, 5), (22, 4), (16, 3)]
        k, S = self.budget.resolve(n0), len(self.layers)
        out = []
        for s in range(1, S + 1):
            tot = max(2, int(round(n0 * (k / n0) ** (s / S))))
            c = max(1, int(round(tot * self.cfrac)))
            out.append((tot - c, c))
        return out

    def keep_tokens(self, n: int) -> int:
        return sum(self.schedule(n)[-1])

    def reduce(self, ctx: Context) -> Reduction:
        x = ctx.x
        B, n, _ = x.shape
        s = self.stage_of(ctx)
        if s == 0:
            ctx.state["visiondrop_n0"] = n
        if "visiondrop_n0" not in ctx.state:
            fail(self.where, "ctx.state lost the stage-0 count (reuse one ctx.state per forward)")
        d, c = self.schedule(ctx.state["visiondrop_n0"])[s]
        if d + c > n:
            fail(self.where, f"stage {s} keeps {d}+{c} tokens but only {n} are left")
        attn = need(ctx, self.where, "visual_attn", ctx.layer + 1).float()
        keys = need(ctx, self.where, "keys", dims=3)
        dom = topk_indices(attn, d).sort(dim=1).values                            # [B, d], spatial order
        is_dom = torch.zeros(B, n, dtype=torch.long, device=x.device).scatter(1, dom, 1)
        rest = torch.sort(is_dom, dim=1, stable=True).indices[:, : n - d]         # [B, n-d], ascending
        m = n - d
        step = max(1, m // c)
        tloc = list(range(0, m, step))[:c]
        sloc = sorted(set(range(m)) - set(tloc))
        target = rest[:, tloc]
        source = rest[:, sloc]
        # each source joins its most cosine-similar target (keys), mean of members (target excluded)
        if sloc:
            agg, _, slot = ops.recycle(x, target, source, features=keys, include_target=False, return_slot=True)
        else:
            agg, slot = torch.zeros_like(gather_tokens(x, target)), source
        ctx_tok = gather_tokens(x, target) + agg
        tokens = torch.cat([gather_tokens(x, dom), ctx_tok], dim=1)
        index = torch.cat([dom, target], dim=1)
        K = d + c
        src = torch.full((B, n), -1, dtype=torch.long, device=x.device)
        src = src.scatter(1, index, torch.arange(K, device=x.device).expand(B, K))
        if len(sloc):
            src = src.scatter(1, source, torch.where(slot >= 0, slot + d, slot))
        base = ctx.size.float() if ctx.size is not None else torch.ones(B, n, device=x.device)
        size = torch.zeros(B, K, device=x.device).scatter_add(1, src.clamp_min(0), base * (src >= 0))
        return Reduction(tokens, index, src, size)
