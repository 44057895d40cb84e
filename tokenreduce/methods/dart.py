"""DART: keep the image tokens least duplicated with a few pivot tokens (inside the LLM)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, gather_tokens, image_part, int_option, keep_indices, need


def pivot_quota(keep: int, image_pivots: int, text_pivots: int) -> Tuple[int, List[int]]:
    """Image pivots kept and the neighbours each pivot (image, then text) selects, so
    that pivots + neighbours == keep (the authors give every pivot the same count)."""
    p_img = min(image_pivots, keep)
    P = p_img + text_pivots
    rest = keep - p_img
    base, extra = divmod(rest, P) if P else (0, 0)
    return p_img, [base + (1 if i < extra else 0) for i in range(P)]


@register
class DART(Method):
    """Duplication-aware token reduction inside the LLM (DART).

    After decoder layer ``layer - 1``: pivots = the ``image_pivots`` image tokens with the
    largest L1 norm of their keys (and the ``text_pivots`` text tokens with the largest
    L1 norm of their states); pivot by pivot (image pivots, then text, ascending
    position), each adds its least cosine-similar not-yet-kept image tokens (hidden
    states). Keeps pivots + selected, spatial order. x ``[B, n, D]`` -> ``[B, keep, D]``.
    """
    name = "dart"
    paper = ("Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: "
             "Duplication Matters More (DART), arXiv 2502.11494")
    code = "github.com/ZichenWen1/DART"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.KEYS, Need.TEXT})
    options = {"layer": "first decoder layer that sees the reduced sequence (K, default 2)",
               "image_pivots": "image pivot tokens (default 4)",
               "text_pivots": "text pivot tokens (default 4; 0 = no text needed)"}
    budgets = ("keep=K or ratio=r of the image tokens; LLaVA-1.5 presets keep=192/128/64 of 576 "
               "(the authors: reduction_ratio 0.667/0.778/0.889)")
    faithful_to = ("ZichenWen1/DART LLaVA modeling_llama get_retained_image_token: L1-norm "
                   "pivots of the layer K-1 keys, -cosine topk(TOKEN_TOPK) neighbours per pivot "
                   "on the normed hidden states, taken tokens removed from the candidates")
    deviations = ("pivots are visited in ascending position (the authors iterate a Python set, "
                  "an order set by hashing); the per-pivot counts are spread so the total is "
                  "exactly keep (the authors: the same TOKEN_TOPK = ceil((M or N (1 - R)) // 8) for every "
                  "pivot, so their scripts/v1_5/eval/<bench>.sh R M hands on 4 + 8 TOKEN_TOPK image "
                  "tokens: `0.778 128` -> 132, R alone 0.667/0.778/0.889 -> 188/124/60; keep=132 "
                  "reproduces `0.778 128` with 16 per pivot, the keep=128 preset gives 4 of the 8 pivots 15); the text "
                  "pivots are ranked by the L1 norm of ctx.text (the context carries image keys "
                  "only); image pivots rank the L1 norm of ctx.keys (the authors: all KV heads "
                  "concatenated - pass those as ctx.keys to match); similarities use ctx.x / ctx.text as given (the authors apply the "
                  "LLM's final norm first: pass normed states to match)")

    def reduce_layers(self, num_layers: int) -> List[int]:
        return [int_option(self, "layer", 2) - 1]

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        x = image_part(ctx, ctx.x)
        keys = image_part(ctx, need(ctx, self.where, "keys", dims=3))
        B, n, _ = x.shape
        dev = x.device
        ip, tp = int(self.opts.get("image_pivots", 4)), int(self.opts.get("text_pivots", 4))
        if ip < 1 or tp < 0:
            fail(self.where, f"image_pivots must be >= 1 and text_pivots >= 0, got {ip}, {tp}")
        keep = self.keep_tokens(n)
        p_img, quota = pivot_quota(keep, ip, tp)
        piv_img = keys.float().abs().sum(-1).topk(p_img, dim=1).indices.sort(dim=1).values
        states = torch.nn.functional.normalize(x.float(), dim=-1)
        pivots = [gather_tokens(states, piv_img)]
        if tp:
            text = ctx.text
            if text is None or text.dim() != 3 or text.shape[0] != B or text.shape[2] != x.shape[2]:
                fail(self.where, f"needs ctx.text [B, T, D] with B={B}, D={x.shape[2]} for its "
                                f"text pivots (or text_pivots=0), got "
                                f"{None if text is None else tuple(text.shape)}")
            if text.shape[1] < tp:
                fail(self.where, f"text_pivots={tp} exceeds the {text.shape[1]} text tokens")
            piv_txt = text.float().abs().sum(-1).topk(tp, dim=1).indices.sort(dim=1).values
            pivots.append(gather_tokens(torch.nn.functional.normalize(text.float(), dim=-1), piv_txt))
        piv = torch.cat(pivots, dim=1)                                   # [B, P, D]
        sim = piv @ states.transpose(1, 2)                               # [B, P, n]
        taken = torch.zeros(B, n, dtype=torch.bool, device=dev).scatter(1, piv_img, True)
        picks = [piv_img]
        for p, q in enumerate(quota):                                    # a fixed small number of pivots
            if q == 0:
                continue
            s = sim[:, p].masked_fill(taken, float("inf"))
            sel = torch.sort(s, dim=1, stable=True).indices[:, :q]       # least similar first
            taken = taken.scatter(1, sel, True)
            picks.append(sel)
        return keep_indices(ctx, torch.cat(picks, dim=1))
