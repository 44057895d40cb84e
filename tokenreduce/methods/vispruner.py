"""VisPruner: important tokens by [CLS] attention, then diverse tokens among the rest by
iterative similarity-based duplicate removal."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, gather_tokens, image_part, keep_indices, need


def remove_duplicates(sim: Tensor, keep: int, step: int = 8) -> Tensor:
    """The authors' iterative matching and pruning on a candidate list, batched.

    sim ``[B, R, R]``: cosine similarities of the ``R`` candidates (in the authors' order, by
    descending [CLS] attention), computed once. While more than ``keep`` remain: the list is
    split into even (``a``) and odd (``b``) places, each ``a`` scores its best match among the
    ``b`` (read from ``sim``; the authors recompute ``a @ b.T`` every round: the same dot
    products up to rounding), and the ``min(step, R - keep)`` highest-scoring ``a`` are dropped;
    the survivors are the other ``a`` (by descending score) followed by every ``b``. Returns
    the ``keep`` survivors' positions in ``[0, R)`` ``[B, keep]``. Shapes follow Python ints
    only (static)."""
    B, R, _ = sim.shape
    pos = torch.arange(R, device=sim.device).expand(B, R)
    rows = torch.arange(B, device=sim.device)[:, None, None]
    while pos.shape[1] - keep > 0:
        r = min(step, pos.shape[1] - keep)
        a, b = pos[:, ::2], pos[:, 1::2]
        score = sim[rows, a[:, :, None], b[:, None, :]].amax(dim=-1)          # [B, ceil(R'/2)]
        rest = torch.sort(score, dim=1, descending=True, stable=True).indices[:, r:]
        pos = torch.cat([a.gather(1, rest), b], dim=1)
    return pos


@register
class VisPruner(Method):
    """Important + diverse tokens after the vision encoder (VisPruner).

    Of ``keep = T`` tokens, ``int(T * important_ratio)`` are important: the highest [CLS]
    attention of ViT layer -2 (head mean, image columns). The rest, in descending attention,
    are thinned by `remove_duplicates` (cosine similarity of the layer's features, 8 per
    round) to the ``T - int(T * important_ratio)`` diverse tokens. The kept tokens go on in
    spatial order; [CLS] first (LLaVA's "patch" select drops it, as in the authors' code).
    x ``[B, 1 + n, D]`` -> ``[B, 1 + T, D]``.
    """
    name = "vispruner"
    paper = ("Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token "
             "Pruning in VLMs (VisPruner), ICCV 2025")
    code = "github.com/Theia-4869/VisPruner"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {"important_ratio": "share of the budget taken by [CLS]-attention tokens (default 0.5)",
               "layer": "ViT layer of the [CLS] attention (default -2, the features' layer)"}
    budgets = ("keep=K (the authors' --visual_token_num, of the image tokens; LLaVA-1.5 runs 64/128/192) "
               "or ratio=r; important = int(K * important_ratio), diverse = K - important")
    faithful_to = ("Theia-4869/VisPruner@aefa01a llava/model/llava_arch.py encode_images "
                   "(important_token_num = int(T * r), head-mean [CLS] row argsort, residual in that "
                   "order, while loop: r = min(8, R - T_div), a/b = ::2 / 1::2, max similarity, "
                   "drop the r highest, boolean index mask: spatial order) and "
                   "llava/model/multimodal_encoder/clip_encoder.py feature_select ('patch': [CLS] "
                   "dropped, attentions[select_layer][:, :, 0, 1:])")
    deviations = ("ties go to the lower position / earlier place (the authors' argsort is unstable); "
                  "similarities in float32 for fp16/bf16 inputs; the candidates' similarity matrix is "
                  "computed once and read each round (the authors recompute a @ b.T per round: the same "
                  "dot products up to float rounding; the rounds are rounding-chaotic, one near-tie swap "
                  "changes every later even/odd split, so float32 picks can differ from theirs as their "
                  "own differ between batch sizes; equal in float64, pinned by tests/methods/"
                  "test_vispruner.py); an odd candidate count, which "
                  "the authors' indexing (expand to R // 2 - r) rejects, runs with ceil(R / 2) even places")

    def configure(self) -> None:
        r = self.opts.get("important_ratio", 0.5)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            fail(self.where, f"important_ratio must be in [0, 1], got {r!r}")

    def attention_layers(self, num_layers: int) -> List[int]:
        return [self.opts.get("layer", -2)]

    def split(self, n: int):
        """(important, diverse) of the ``keep_tokens(n)`` tokens."""
        T = self.keep_tokens(n)
        imp = int(T * float(self.opts.get("important_ratio", 0.5)))
        return imp, T - imp

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        n = ctx.n_image
        t_imp, t_div = self.split(n)
        score = image_part(ctx, need(ctx, self.where, "cls_attn", self.opts.get("layer", -2)))
        score = score.to(torch.promote_types(score.dtype, torch.float32))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices           # [B, n]
        important, residual = order[:, :t_imp], order[:, t_imp:]
        if t_div == 0:
            return keep_indices(ctx, important)
        x = image_part(ctx, ctx.x)
        cand = gather_tokens(x, residual)
        cand = cand.to(torch.promote_types(cand.dtype, torch.float32))
        cand = cand / cand.norm(dim=-1, keepdim=True)                                    # [B, R, D]
        survivors = remove_duplicates(cand @ cand.transpose(1, 2), t_div)
        return keep_indices(ctx, torch.cat([important, residual.gather(1, survivors)], dim=1))
