"""SparseVLM: text-guided visual token pruning inside the LLM, with recycling of the pruned
tokens into a few merged tokens (Zhang et al., ICML 2025; the v1.5 code)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import assemble, complement, gather_tokens, is_int_at_least, need, topk_indices

# the authors' score.py: visual tokens kept after layers 2 / 6 / 15 for each RETAIN_TOKN
SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
LAYERS = (2, 6, 15)
RECYCLE_SHARE = 0.3        # top 30% of the pruned tokens (by rater attention) are recycled
CLUSTER_SIZE = 10          # into int(m / 10) + 1 merged tokens


def stage_counts(n: int, schedule: Tuple[int, ...]) -> List[Tuple[int, int, int]]:
    """(kept, recycled candidates, merged) per stage for ``n`` image tokens, as the authors' loop
    updates ``v_token_num``: kept ``k = min(count, v - 1)``, candidates ``m = int((v - k) * 0.3) + 1``,
    merged ``c = int(m / 10) + 1``, next ``v = k + c``."""
    out, v = [], n
    for count in schedule:
        k = min(count, v - 1)
        m = int((v - k) * RECYCLE_SHARE) + 1
        c = int(m / CLUSTER_SIZE) + 1
        out.append((k, m, c))
        v = k + c
    return out


def dpc_knn(x: Tensor, c: int) -> Tuple[Tensor, Tensor]:
    """The authors' ``cluster_and_merge`` clustering (DPC-KNN), batched: ``x`` ``[B, m, C]`` ->
    (centres ``[B, c]`` positions in ``[0, m)`` by descending score, cluster ``[B, m]`` the slot
    of each token, the centres their own). Distances in float32, ``/ sqrt(C)``; local density
    ``exp(-mean of the c nearest squared distances)``; a token's parent distance is its distance to
    the nearest denser token (the largest distance for the densest); score = parent distance x
    density; every token joins its nearest centre."""
    B, m, C = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / (C ** 0.5)   # [B, m, m]
    near = torch.topk(dist, k=c, dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()                                          # [B, m]
    denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)
    dmax = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = (dist * denser + dmax * (1 - denser)).min(dim=-1).values
    centres = topk_indices(parent * density, c)                                          # [B, c]
    cluster = gather_tokens(dist, centres).argmin(dim=1)                                 # [B, m]
    slots = torch.arange(c, device=x.device).expand(B, c)
    return centres, cluster.scatter(1, centres, slots)


@register
class SparseVLM(Method):
    """Text-guided pruning at LLM layers 2 / 6 / 15 with token recycling (SparseVLM v1.5).

    After layer l the image tokens are ranked by the attention the rater text tokens give them
    in layer l (``ctx.rater_attn[l]``, Need.RATER_ATTN: raters are the text tokens after the image
    that attend to it above their mean, chosen once at the LLM input); the top ``k`` of the
    stage's count stay; of the pruned ones the ``int(0.3 p) + 1`` with the highest rater attention
    are clustered (DPC-KNN, `dpc_knn`) into ``int(m / 10) + 1`` merged tokens (`ops.recycle`, the
    mean of each cluster), which go on with the kept tokens, at their centre's position.
    ctx.x ``[B, v, D]`` -> ``[B, k + c, D]``.
    """
    name = "sparsevlm"
    paper = ("Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
             "Inference, ICML 2025")
    code = "github.com/Gumpest/SparseVLMs (v1.5)"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.RATER_ATTN})
    options = {"counts": "image tokens kept after each of the layers (default: the authors' schedule of the "
                         "budget, e.g. (66, 30, 17) for keep=64)",
               "layers": "LLM layers after which it prunes (default (2, 6, 15))"}
    budgets = ("keep=K is the authors' RETAIN_TOKN: the v1.5 schedules 64 -> (66, 30, 17), 96 -> (238, 48, 26), "
               "128 -> (303, 110, 36), 192 -> (300, 200, 110) kept after layers 2/6/15 (+ merged tokens; "
               "the LLM-average is about K); another K scales the nearest schedule; or counts=(a, b, c)")
    faithful_to = ("Gumpest/SparseVLMs v1.5 (same code as main with USE_VERSION=1_0) "
                   "llava/model/language_model/modelling_sparse_llama.py LlamaModel.forward (raters: "
                   "softmax(v_t @ t_t^T, text).mean(image) > mean, once at the input; pruning_loc 2/6/15 "
                   "on the layer's output; merge of the top 30% pruned into int(m/10)+1 tokens), "
                   "score.py attn_postprocess_topk (head mean, rater mean, topk min(count, v - 1)), "
                   "utils.py cluster_and_merge (DPC-KNN, mean per cluster)")
    deviations = ("static counts (v1.5's schedule; the v1 paper's count from torch.linalg.matrix_rank of the "
                  "rater attention is a host sync and a data-dependent shape: not done); rater attention "
                  "from the fused op's output with one-hot image values (no [B, H, L, L] eager softmax); "
                  "batched (the authors index batch 0 only); no 1e-6 random noise on the DPC-KNN density "
                  "(ties go to the lower index, deterministic); cluster means without the authors' +1e-6 "
                  "in the divisor; kept tokens keep their RoPE positions and a merged token takes its "
                  "centre's (the authors renumber the shortened sequence 0..L'-1 and append the merged "
                  "tokens after the kept ones); the raters' relevance in float32")

    def configure(self) -> None:
        layers = tuple(self.opts.get("layers", LAYERS))
        if not layers or not all(is_int_at_least(l, 0) for l in layers) or list(layers) != sorted(set(layers)):
            fail(self.where, f"layers must be increasing ints >= 0, got {layers!r}")
        counts = self.opts.get("counts")
        if counts is not None:
            counts = tuple(counts)
            if len(counts) != len(layers) or not all(is_int_at_least(c, 1) for c in counts):
                fail(self.where, f"counts must be {len(layers)} ints >= 1 (one per layer), got {counts!r}")
        if counts is not None and self.budget.given:
            fail(self.where, "give counts= or keep=/ratio=, not both")
        self.layers, self.counts = layers, counts

    def default_budget_ok(self) -> bool:
        return self.counts is not None

    def schedule(self, n: int) -> Tuple[int, ...]:
        """Image tokens kept (before merging) after each layer, for ``n`` image tokens."""
        if self.counts is not None:
            return self.counts
        keep = self.budget.resolve(n)
        if keep in SCHEDULES and len(self.layers) == 3:
            return SCHEDULES[keep]
        base = min(SCHEDULES, key=lambda p: (abs(p - keep), p))
        sched = [max(1, int(round(c * keep / base))) for c in SCHEDULES[base]]
        return tuple(sched[:len(self.layers)]) + (sched[-1],) * (len(self.layers) - len(sched))

    def keep_tokens(self, n: int) -> int:
        k, _, c = stage_counts(n, self.schedule(n))[-1]
        return k + c

    def reduce_layers(self, num_layers: int) -> List[int]:
        if self.layers[-1] > num_layers - 1:
            fail(self.where, f"layer {self.layers[-1]} beyond the {num_layers} LLM layers")
        return list(self.layers)

    def attention_layers(self, num_layers: int) -> List[int]:
        return self.reduce_layers(num_layers)

    def reduce(self, ctx: Context) -> Reduction:
        if ctx.layer is None or ctx.layer not in self.layers:
            fail(self.where, f"called after layer {ctx.layer}; expected one of {list(self.layers)} "
                             "(ctx.layer must be set)")
        s = self.layers.index(ctx.layer)
        x = ctx.x
        B, v, _ = x.shape
        if s == 0:
            ctx.state["sparsevlm_n0"] = v
        n0 = ctx.state.get("sparsevlm_n0", v)
        if v < 2:
            fail(self.where, f"stage {s} has {v} image token(s): nothing to prune")
        k = min(self.schedule(n0)[s], v - 1)                                         # the authors' min(count, v - 1)
        p = v - k
        m = int(p * RECYCLE_SHARE) + 1
        c = int(m / CLUSTER_SIZE) + 1
        rel = need(ctx, self.where, "rater_attn", ctx.layer).float()                 # [B, v]
        kept = topk_indices(rel, k).sort(dim=1).values                              # [B, k] spatial
        pruned = complement(kept, v)                                                 # [B, p] ascending
        cand = pruned.gather(1, topk_indices(rel.gather(1, pruned), m))              # [B, m] by relevance
        centres, cluster = dpc_knn(gather_tokens(x, cand), c)
        others = complement(centres, m)                                              # [B, m - c]
        target, source = cand.gather(1, centres), cand.gather(1, others)
        merged, _ = ops.recycle(x, target, source, assign=cluster.gather(1, others), include_target=True)
        dev = x.device
        src = torch.full((B, v), -1, dtype=torch.long, device=dev)
        src = src.scatter(1, kept, torch.arange(k, device=dev).expand(B, k))
        src = src.scatter(1, cand, k + cluster)
        tokens = torch.cat([gather_tokens(x, kept), merged.to(x.dtype)], dim=1)
        return assemble(ctx, tokens, torch.cat([kept, target], dim=1), src)
