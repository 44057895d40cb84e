"""FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025).

Inside the vision encoder, progressive. Every layer l scores each image token by
``(a_l / sum a_l + s_l / sum s_l) * |v_l|_1``: a = [CLS] attention (head mean), s = [CLS]-value
attention softmax(v_cls . v_j) per head (head mean, one [B, H, 1, N] product),
|v|_1 = L1 norm of the head-mean value. The score is accumulated ``cum = (cum + score) / 2``;
after every other layer (1, 3, ..., L-3 for L layers; the last point reaches the budget) the top
image tokens by ``cum`` survive ([CLS] kept first) and ``cum`` is re-indexed with them.
    ctx.x [B, 1+n, D], ctx.cls_attn[l] [B, 1+n], ctx.values[l] [B, 1+n, H*Dh] -> [B, 1+n', D]
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, int_option, keep_positions, need, top_positions


def flowcut_layer_score(cls_attn: Tensor, values: Tensor, heads: int) -> Tensor:
    """One layer's FlowCut score of the image tokens. cls_attn [B, 1+n] (head-mean [CLS] row),
    values [B, 1+n, H*Dh] -> float32 [B, n]."""
    B, N, C = values.shape
    v = values.reshape(B, N, heads, C // heads).transpose(1, 2).float()  # [B, H, N, Dh] (a view)
    # softmax(v_cls . v_j) per head, head mean: one [B, H, 1, N] product (the fused attention op
    # would also compute, and copy v for, an output row that is thrown away)
    sem = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(dim=1)[:, 0, 1:]
    rel = cls_attn[:, 1:].float()
    l1 = v.mean(dim=1)[:, 1:].abs().sum(dim=-1)                          # |mean_h v|_1
    return (rel / rel.sum(-1, keepdim=True) + sem / sem.sum(-1, keepdim=True)) * l1


@register
class FlowCut(Method):
    """FlowCut: information-flow score accumulated across ViT layers, top-k every other layer."""
    name = "flowcut"
    paper = ("Tong et al., FlowCut: Rethinking Redundancy via Information Flow for Efficient "
             "Vision-Language Models, NeurIPS 2025")
    code = "TungChintao/FlowCut"
    stage = Stage.VIT
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN, Need.VALUES})
    options = {
        "heads": "attention heads of the ViT (values are heads concatenated); default: the model's (ctx.heads), else 16 (CLIP-L)",
        "entropy_ratio": "assumed normalised entropy of the [CLS] attention that fixes the static pruning "
                         "schedule (authors: measured per batch), default 0.9",
        "select_layer": "ViT layers used, from the end (LLaVA feature layer -2 -> prune up to layer L-3), default -2",
    }
    budgets = "keep=K or ratio=r image tokens after the ViT; LLaVA-1.5 presets keep=192 / 128 / 64 of 576"
    faithful_to = ("TungChintao/FlowCut flowcut/modeling_clip_flowcut.py + utils_flowcut.py @a2ecd24 "
                   "(compute_score, cumulative 0.5/0.5, prune when remaining-layers is even, "
                   "adaptive_prune_ratio)")
    deviations = ("static pruning counts: prune_num = round((n - K) / sqrt(rpl) * (1 - rho^2)) with a fixed "
                  "rho (entropy_ratio) instead of the per-batch [CLS]-attention entropy (a host sync and "
                  "data-dependent shapes); the last point still reaches the budget exactly; "
                  "ties go to the smaller index; keep=K is the authors' flowcut(model, target_num=K) on LLaVA-1.5 "
                  "(target K + 1 with [CLS] in the ViT, [CLS] dropped after); their anyres path (LLaVA-NeXT: "
                  "int(K / 2) per crop in the ViT, then a prune to K at LLM layer 1) is not followed: keep "
                  "applies per crop row in the ViT only")

    def configure(self) -> None:
        self.heads = int_option(self, "heads", 16, rule="a positive int")
        self.rho = float(self.opts.get("entropy_ratio", 0.9))
        if not (0.0 <= self.rho <= 1.0):
            fail(self.where, f"entropy_ratio must be in [0, 1], got {self.rho!r}")
        self.select_layer = self.opts.get("select_layer", -2)

    # layers: the authors prune inside layer idx when rpl = select - idx - 1 is even and >= 0
    def _select(self, num_layers: int) -> int:
        sel = self.select_layer % num_layers if self.select_layer < 0 else self.select_layer
        if not (1 <= sel <= num_layers):
            fail(self.where, f"select_layer={self.select_layer} invalid for {num_layers} layers")
        return sel

    def reduce_layers(self, num_layers: int) -> List[int]:
        sel = self._select(num_layers)
        return sorted(sel - 1 - rpl for rpl in range(0, sel, 2))

    def attention_layers(self, num_layers: int) -> List[int]:
        return list(range(self.reduce_layers(num_layers)[-1] + 1))

    def schedule(self, n: int, num_layers: int) -> List[int]:
        """Image tokens left after each reduce layer (static)."""
        k = self.keep_tokens(n)
        sel = self._select(num_layers)
        out, cur = [], n
        for layer in self.reduce_layers(num_layers):
            rpl = sel - layer - 1
            prune = cur if rpl == 0 else int(round((cur - k) / math.sqrt(rpl) * (1.0 - self.rho ** 2)))
            cur = max(cur - prune, k)
            out.append(cur)
        return out

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        if ctx.layer is None or ctx.num_layers is None:
            fail(self.where, "ctx.layer and ctx.num_layers must be set")
        layers = self.reduce_layers(ctx.num_layers)
        if ctx.layer not in layers:
            fail(self.where, f"called after layer {ctx.layer}; expected one of {layers}")
        st = ctx.state
        if ctx.layer == layers[0]:
            st["flowcut_n0"], st["flowcut_last"], st["flowcut_cum"] = ctx.n_image, -1, None
        if "flowcut_n0" not in st:
            fail(self.where, "ctx.state lost the progressive state (reuse one ctx.state per forward)")
        cum = st["flowcut_cum"]
        # the model's head count when the model gives it and the user did not set heads
        heads = self.heads if ("heads" in self.opts or ctx.heads is None) else ctx.heads
        for l in range(st["flowcut_last"] + 1, ctx.layer + 1):   # layers since the previous call
            a = need(ctx, self.where, "cls_attn", l)
            v = need(ctx, self.where, "values", l, dims=3)
            s = flowcut_layer_score(a, v, heads)
            cum = s if cum is None else 0.5 * cum + 0.5 * s
        k = self.schedule(st["flowcut_n0"], ctx.num_layers)[layers.index(ctx.layer)]
        idx = top_positions(cum, k)
        st["flowcut_cum"] = torch.gather(cum, 1, idx)
        st["flowcut_last"] = ctx.layer
        return keep_positions(ctx, idx, sort=False)
