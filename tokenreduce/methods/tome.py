"""ToMe: bipartite soft matching inside the ViT, r tokens merged per block."""
from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .. import ops
from .base import Context, Need, Reduction
from .helpers import check_x, need
from .merge_schedule import MergeSchedule


def representative(source: Tensor, K: int) -> Tensor:
    """Per output slot, the input position that stands for it: the B-set (odd) member
    of a merged slot, or the slot's only member. source ``[B, N]`` -> ``[B, K]``."""
    B, N = source.shape
    pos = torch.arange(N, device=source.device).expand(B, N)
    key = pos + (N + 1) * (pos % 2)
    best = torch.full((B, K), -1, dtype=torch.long, device=source.device)
    best = best.scatter_reduce(1, source, key, reduce="amax", include_self=True)
    return best % (N + 1)


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
        merged, size_out, source = ops.bipartite_merge(ctx.x, r, metric=keys, size=size,
                                                       protect=int(ctx.has_cls), order="tome")
        return Reduction(merged, representative(source, merged.shape[1]), source, size_out.float())
