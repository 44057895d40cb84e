"""ToMe: bipartite soft matching inside the ViT, r tokens merged per block."""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
from torch import Tensor

from . import register
from .. import ops
from ._common import check_x, fail, per_token
from .base import Context, Method, Need, Reduction, Stage, resolve_keep


class MergeSchedule(Method):
    """Budget handling shared by the per-block merging methods (ToMe, Turbo).

    ``r=R``: merge R tokens in every block (clamped to half the mergeable tokens, as
    ToMe); ``keep=K`` / ``ratio=q``: merge ``ceil((n_l - K) / (L - l))`` tokens in block
    ``l`` (``n_l`` tokens left, ``L`` blocks), so the encoder output has K image tokens.
    All counts are Python ints computed from static shapes.
    """
    stage = Stage.VIT

    def __init__(self, keep: Optional[int] = None, ratio: Optional[float] = None, **opts: Any):
        super().__init__(keep, ratio, **opts)
        r = opts.get("r")
        if r is not None:
            if keep is not None or ratio is not None:
                fail(self.name, "give r= (tokens merged per block) or keep=/ratio=, not both")
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                fail(self.name, f"r must be an int >= 0, got {r!r}")
        L = opts.get("num_layers", 24)
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            fail(self.name, f"num_layers must be a positive int, got {L!r}")

    def default_budget_ok(self) -> bool:
        return self.opts.get("r") is not None

    def _L(self, ctx: Optional[Context] = None) -> int:
        if ctx is not None and ctx.num_layers is not None:
            return int(ctx.num_layers)
        return int(self.opts.get("num_layers", 24))

    def reduce_layers(self, num_layers: int) -> List[int]:
        return list(range(num_layers))

    def keep_tokens(self, n: int) -> int:
        r = self.opts.get("r")
        if r is None:
            return self.budget.tokens(n)
        for _ in range(self._L()):
            n -= min(r, n // 2)
        return n

    def r_at(self, ctx: Context) -> int:
        """Tokens to merge at this call (ToMe's per-block r)."""
        n = ctx.n_image
        r = self.opts.get("r")
        if r is not None:
            return min(r, n // 2)
        n0 = ctx.state.setdefault(f"{self.name}.n0", n)   # the budget refers to the first call
        target = resolve_keep(n0, self.budget.keep, self.budget.ratio, self.name)
        if ctx.layer is None:
            return max(0, min(n - target, n // 2))
        L = self._L(ctx)
        if not 0 <= ctx.layer < L:
            fail(self.name, f"ctx.layer={ctx.layer} outside [0, {L})")
        left = L - ctx.layer
        return max(0, min(math.ceil((n - target) / left), n // 2))


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
        check_x(ctx, self.name)
        keys = per_token(ctx, self.name, "keys", ctx.keys, dims=3)
        size = None if ctx.size is None else per_token(ctx, self.name, "size", ctx.size)
        r = self.r_at(ctx)
        merged, size_out, source = ops.bipartite_merge(ctx.x, r, metric=keys, size=size,
                                                       protect=int(ctx.has_cls), order="tome")
        return Reduction(merged, representative(source, merged.shape[1]), source, size_out.float())
