"""DivPrune: keep a maximally diverse subset (greedy max-min k-center)."""
from __future__ import annotations

from . import register
from .. import ops
from .base import Context, Method, Need, Reduction, Stage
from .helpers import check_x, image_part, keep_indices


@register
class DivPrune(Method):
    """Greedy max-min diversity selection (DivPrune).

    d = 1 - cosine between image tokens ``[B, n, n]`` (never materialised: `ops.kcenter`);
    first pick = the token farthest from its nearest neighbour, then repeatedly the
    token farthest from the picked set, ``keep`` picks; kept in spatial order, [CLS]
    first. x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``.
    """
    name = "divprune"
    paper = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025"
    code = "github.com/vbdi/divprune"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES})
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192/128/64 of 576"
    faithful_to = ("vbdi/divprune DivPrune() (the greedy loop over 1 - pairwise cosine: first "
                   "pick argmax of the second-smallest column distance, then argmax of the min "
                   "distance to the picked rows) = tokenreduce.ops.kcenter(first='isolated'); the "
                   "authors run it on the projected features (after mm_projector): pass those as ctx.x")
    deviations = ("output in spatial order (the order of picks is what ops.kcenter returns); "
                  "ties to the lower position; distances accumulated in float32 for fp16/bf16")

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        x = image_part(ctx, ctx.x)
        idx, _ = ops.kcenter(x, self.keep_tokens(ctx.n_image), metric="cosine", first="isolated")
        return keep_indices(ctx, idx)
