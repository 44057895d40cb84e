"""PruMerge+: [CLS]-attention outliers plus spatial samples, each absorbing its neighbours."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import assemble, check_x, gather_tokens, image_part, need


def iqr_outliers(attn: Tensor) -> Tensor:
    """PruMerge's adaptive count: tokens above ``Q3 + 1.5 IQR`` of the row (linear
    quantiles, as np.percentile). attn ``[B, n]`` -> bool ``[B, n]``."""
    a = attn.float()
    # torch.quantile's linear interpolation on a sorted copy: positions p * (n - 1) are Python
    # numbers, so no host sync (torch.quantile checks its q tensor on the host); NaN as quantile
    n = a.shape[1]
    s = a.sort(dim=1).values

    def at(p: float) -> Tensor:
        r = p * (n - 1)
        return torch.lerp(s[:, int(r)], s[:, min(int(r) + 1, n - 1)], r - int(r))

    q1, q3 = at(0.25), at(0.75)
    upper = (q3 + 1.5 * (q3 - q1)).masked_fill(a.isnan().any(dim=1), float("nan"))
    return a > upper[:, None]


def plus_selection(attn: Tensor, k: int) -> Tensor:
    """The ``k`` kept positions ``[B, k]`` in the authors' order: the IQR outliers by
    descending attention (the first ``m`` of the top-k, ``m`` the outlier count), then
    the spatial samples ``0, s, 2s, ... < n - 1`` with ``s = int(int(n / m) / 3)`` not
    already kept, ascending; when more slots remain, the next tokens by attention.
    Sync-free: the order is one sort of a per-token key."""
    B, n = attn.shape
    dev = attn.device
    a = attn.float()
    m = iqr_outliers(a).sum(dim=1).clamp_min(1).double()                  # [B]
    ratio = m / n
    m_top = torch.floor(n * ratio).long()                                  # int(N * ratio)
    step = torch.floor(torch.floor(1.0 / ratio) / 3).long().clamp_min(1)   # int(int(1/ratio)/3)
    rank = torch.empty(B, n, dtype=torch.long, device=dev).scatter(
        1, torch.sort(a, dim=1, descending=True, stable=True).indices,
        torch.arange(n, device=dev).expand(B, n))                          # attention rank
    pos = torch.arange(n, device=dev).expand(B, n)
    is_top = rank < m_top[:, None]
    is_sample = (pos % step[:, None] == 0) & (pos < n - 1) & ~is_top
    key = torch.where(is_top, rank, torch.where(is_sample, n + pos, 2 * n + rank))
    return torch.sort(key, dim=1).indices[:, :k]


def absorb(x: Tensor, keys: Tensor, attn: Tensor, kept: Tensor, neighbours: int = 32) -> Tensor:
    """Each kept token plus the attention-weighted sum (unnormalised, as the authors) of
    its ``neighbours`` most key-similar other tokens. x ``[B, n, D]``, keys ``[B, n, C]``,
    attn ``[B, n]``, kept ``[B, K]`` -> ``[B, K, D]``."""
    B, n, _ = x.shape
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = gather_tokens(kn, kept) @ kn.transpose(1, 2)                     # [B, K, n]
    sim = sim.scatter(2, kept[..., None], float("-inf"))                  # not itself
    nb = sim.topk(min(neighbours, n - 1), dim=2).indices                   # [B, K, nb]
    w = torch.zeros_like(sim).scatter(2, nb, attn.float()[:, None, :].expand_as(sim).gather(2, nb))
    return (gather_tokens(x, kept).float() + w @ x.float()).to(x.dtype)


@register
class PruMergePlus(Method):
    """Adaptive [CLS]-attention outliers + spatial samples, merged with neighbours (PruMerge+).

    attn = [CLS] row of the last ViT layer ``[B, n]``; kept = ``keep - 1`` positions from
    `plus_selection` (outliers, then spatial samples); each kept token absorbs its 32
    nearest tokens by key cosine, weighted by attention (`absorb`); one extra token =
    the attention-weighted sum of all non-kept tokens (index -1).
    x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``, kept tokens in the authors' order.
    """
    name = "prumerge+"
    paper = ("Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
             "Multimodal Models, arXiv 2403.15388 (PruMerge+)")
    code = "github.com/42Shawn/LLaVA-PruMerge"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.KEYS, Need.CLS_ATTN})
    options = {"layer": "ViT layer of the [CLS] attention and keys (default -1, the authors' layer 23)",
               "neighbours": "tokens each kept token absorbs (default 32)"}
    budgets = ("keep=K (static, includes the extra token) or ratio=r; LLaVA-1.5 presets "
               "keep=192/128/64 of 576 (the authors' adaptive count averages ~32 + samples)")
    faithful_to = ("42Shawn/LLaVA-PruMerge@1ca8b2b llava/model/multimodal_encoder/clip_encoder.py "
                   "token_prune_merge_advanced_plus (IQR outliers, arithmetic sequence of step "
                   "int(step_length/3), topk-32 key neighbours, x + sum(attn * x), extra token)")
    deviations = ("static budget: the authors' count is adaptive per image (a host sync, "
                  "batch 1): the outliers come first, the spatial samples fill the rest of the "
                  "budget (ascending) and extra slots go by attention - equal to the authors "
                  "when keep = their count + 1; attention = head mean of the layer's real "
                  "attention and keys = head-mean keys (the authors: one full-width q.k softmax "
                  "and full-width keys of layer 23); a [CLS] token is kept first")

    def configure(self) -> None:
        if self.budget.keep is not None and self.budget.keep < 2:   # refused when built, not at reduce
            fail(self.where, f"keep must be >= 2 (kept tokens + the extra token), got {self.budget.keep}")

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.opts.get("layer", -1)]

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        n = ctx.n_image
        K = self.keep_tokens(n)
        if K < 2:
            fail(self.where, f"keep must be >= 2 (kept tokens + the extra token), got {K}")
        x = image_part(ctx, ctx.x)
        keys = image_part(ctx, need(ctx, self.where, "keys", dims=3))
        attn = image_part(ctx, need(ctx, self.where, "cls_attn", self.opts.get("layer", -1))).float()
        B, dev = x.shape[0], x.device
        kept = plus_selection(attn, K - 1)
        merged = absorb(x, keys, attn, kept, int(self.opts.get("neighbours", 32)))
        src = torch.full((B, n), K - 1, dtype=torch.long, device=dev)
        src = src.scatter(1, kept, torch.arange(K - 1, device=dev).expand(B, K - 1))
        rest = (src == K - 1).to(attn.dtype) * attn
        extra = (rest[:, None, :] @ x.float()).to(x.dtype)                   # [B, 1, D]
        tokens = torch.cat([merged, extra], dim=1)
        index = torch.cat([kept, torch.full((B, 1), -1, dtype=torch.long, device=dev)], dim=1)
        return assemble(ctx, tokens, index, src)
