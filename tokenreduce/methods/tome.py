"""ToMe: bipartite soft matching inside the ViT, r tokens merged per block."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import register
from .. import ops
from .base import Context, Need, Reduction
from .helpers import check_x, need
from .merge_schedule import MergeSchedule


def representative(source: Tensor, K: int, rank: Optional[Tensor] = None) -> Tensor:
    """Per output slot, the input position that stands for it: the B-set (odd) member
    of a merged slot, or the slot's only member. source ``[B, N]`` -> ``[B, K]``.
    ``rank``: a `position_rank` of at least N positions on source's device (reused across
    blocks: its first N entries serve)."""
    B, N = source.shape
    if rank is None or rank.shape[0] < N:
        rank = position_rank(N, source.device)
    best = torch.full((B, K), -1, dtype=torch.long, device=source.device)
    best = best.scatter_reduce_(1, source, rank[:N].expand(B, N), reduce="amax", include_self=True)
    return best.remainder_(rank.shape[0] + 1)


def position_rank(n: int, device) -> Tensor:
    """int64 ``[n]``: position ``p`` plus ``n + 1`` at the odd (B-set) positions, so the
    largest rank in a slot is its odd member, or else its only member; rank % (n + 1) = p."""
    rank = torch.arange(n, device=device)
    rank[1::2].add_(n + 1)
    return rank


@register
class ToMe(MergeSchedule):
    """Token Merging inside the vision encoder (ToMe).

    In block ``l``, between attention and MLP: tokens alternate into sets A / B, each A
    token finds its most cosine-similar B token by the block's head-mean keys, the ``r``
    best-matched A tokens merge into their partners (size-weighted mean), [CLS]
    protected (`ops.bipartite_merge`, ToMe's output order). ``Reduction.size`` is the
    size to carry on: the next blocks add ``key_bias=log(size)`` to their attention
    (proportional attention; see `ToMe.key_bias`). x ``[B, N, D]`` -> ``[B, N - r, D]``.
    """
    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    code = "github.com/facebookresearch/ToMe"
    needs = frozenset({Need.FEATURES, Need.KEYS})
    options = {"r": "tokens merged in every block (ToMe's r)",
               "num_layers": "blocks the schedule spans when ctx.num_layers is not set (default 24; "
                             "23 for LLaVA-1.5's penultimate-layer features)",
               "prop_attn": "proportional attention: key_bias = log(size) in later blocks (default True)"}
    budgets = ("r=R per block (ToMe), or keep=K / ratio=q of the image tokens at the encoder "
               "output (r spread evenly over the blocks); LLaVA-1.5 presets keep=192/128/64 of 576")
    faithful_to = ("facebookresearch/ToMe tome/merge.py bipartite_soft_matching + merge_wavg, "
                   "tome/patch/timm.py ToMeBlock / ToMeAttention (merge after attention, "
                   "metric = k.mean(heads), size.log() added to the attention logits)")
    deviations = ("ties go to the lower index (ToMe's argsort is unstable); the keep=/ratio= "
                  "schedule is ours (ToMe takes r, or r with an inflection)")

    @property
    def proportional_attention(self) -> bool:
        return bool(self.opts.get("prop_attn", True))

    @staticmethod
    def key_bias(size: Tensor) -> Tensor:
        """``log(size)`` ``[B, N]``: the key_bias of `ops.attention_with_scores` in later blocks."""
        return size.float().log()

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        keys = need(ctx, self.where, "keys", dims=3)
        size = None if ctx.size is None else need(ctx, self.where, "size")
        r = self.r_at(ctx)
        if size is not None and size is ctx.state.get("tome.size_out"):
            # the sizes this method's previous block returned (positive and finite by
            # construction): the registered op directly, without `ops.bipartite_merge`'s value
            # check (six ops and a read-back per block; a user's sizes are still checked)
            merged, size_out, source = torch.ops.tokenreduce.bipartite_merge(ctx.x, r, keys, size,
                                                                             int(ctx.has_cls), "tome")
        else:
            merged, size_out, source = ops.bipartite_merge(ctx.x, r, metric=keys, size=size,
                                                           protect=int(ctx.has_cls), order="tome")
        rank = ctx.state.get("tome.rank")   # built once per forward, at the largest N
        if rank is None or rank.shape[0] < source.shape[1] or rank.device != source.device \
                or type(rank) is not type(source):
            rank = ctx.state["tome.rank"] = position_rank(source.shape[1], source.device)
        index = representative(source, merged.shape[1], rank)
        if size_out.dtype != torch.float32:
            size_out = size_out.float()
        ctx.state["tome.size_out"] = size_out
        return Reduction(merged, index, source, size_out)
