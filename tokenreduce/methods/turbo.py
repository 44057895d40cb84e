"""Turbo: ToMe-style merging ranked by information degree (redundancy and [CLS] semantics)."""
from __future__ import annotations

from typing import List

import torch

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Need, Reduction
from .helpers import check_x, need
from .merge_schedule import MergeSchedule


@register
class Turbo(MergeSchedule):
    """Informativity-driven merging (Turbo), per ViT block.

    A / B alternate split as ToMe; mutual redundancy of an A token = its best cosine
    similarity to B (head-mean keys); semantic value = its [CLS] attention in the block,
    divided by the row's largest; information degree = semantic * alpha - redundancy.
    The ``r`` A tokens of lowest degree merge into their best B partner (size-weighted
    mean, `ops.recycle` with ``assign``); [CLS] protected; ToMe's output order.
    x ``[B, N, D]`` -> ``[B, N - r, D]``.
    """
    name = "turbo"
    paper = ("Ju et al., Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language "
             "Large Models, arXiv, Jul 2024")
    code = "paper only (no code followed)"
    needs = frozenset({Need.FEATURES, Need.KEYS, Need.CLS_ATTN})
    options = {"r": "tokens merged in every block",
               "alpha": "weight of the semantic value against the redundancy (default 1.0)",
               "num_layers": "blocks the schedule spans when ctx.num_layers is not set (default 24)"}
    budgets = "r=R per block, or keep=K / ratio=q at the encoder output; presets keep=192/128/64 of 576"
    faithful_to = ("paper: information degree = mutual redundancy (bipartite max similarity, "
                   "as ToMe) and semantic value ([CLS] attention); merge the least informative")
    deviations = ("paper only: the normalisation of the semantic value (divided by the row max), "
                  "alpha=1 and the per-block schedule are our choices")

    def attention_layers(self, num_layers: int) -> List[int]:
        return self.reduce_layers(num_layers)

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        x = ctx.x
        B, N, _ = x.shape
        dev = x.device
        keys = need(ctx, self.where, "keys", dims=3)
        layer = ctx.layer
        if layer is None:
            if len(ctx.cls_attn) != 1:
                fail(self.where, "needs ctx.layer (or exactly one ctx.cls_attn entry) to find its [CLS] attention")
            layer = next(iter(ctx.cls_attn))
        cls = need(ctx, self.where, "cls_attn", layer)
        size = torch.ones(B, N, device=dev) if ctx.size is None else need(ctx, self.where, "size").float()
        r = self.r_at(ctx)
        a_pos = torch.arange(0, N, 2, device=dev)
        b_pos = torch.arange(1, N, 2, device=dev)
        na, nb = a_pos.numel(), b_pos.numel()
        k = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = k[:, 0::2] @ k[:, 1::2].transpose(1, 2)                        # [B, na, nb]
        redundancy, partner = sim.max(dim=-1)
        sem = cls.float()
        sem = sem / sem.amax(dim=1, keepdim=True).clamp_min(1e-12)
        degree = float(self.opts.get("alpha", 1.0)) * sem[:, 0::2] - redundancy  # [B, na]
        degree[:, 0] = float("inf")                                            # [CLS] never merges
        order = torch.sort(degree, dim=1, stable=True).indices                 # lowest first
        src_a, unm_a = order[:, :r], order[:, r:].sort(dim=1).values
        target = torch.cat([a_pos[unm_a], b_pos.expand(B, nb)], dim=1)        # ToMe's order
        source = a_pos[src_a]
        assign = (na - r) + partner.gather(1, src_a)
        out, _, slot = ops.recycle(x, target, source, weight=size, assign=assign, return_slot=True)
        K = target.shape[1]
        src_map = torch.empty(B, N, dtype=torch.long, device=dev)
        src_map = src_map.scatter(1, target, torch.arange(K, device=dev).expand(B, K))
        src_map = src_map.scatter(1, source, slot)
        size_out = torch.zeros(B, K, device=dev).scatter_add(1, src_map, size)
        return Reduction(out, target, src_map, size_out)
