"""TCA (Wang et al., "Is Less More? Exploring Token Condensation as Training-free Test-time
Adaptation", ICCV 2025): token condensation inside CLIP's vision encoder, guided by domain
anchor tokens kept across test samples in a reservoir, and a logit correction by the reservoir.

Two parts, both batched and free of host syncs:

* `TCA` (a `Stage.VIT` method): at each drop layer ``d`` (default 3, 6, 9 of ViT-B/16's 12) the
  image tokens are ranked by the [CLS] attention of block ``d`` (head mean, fused op): the top
  ``k`` are kept (in attention order), the next ``s`` are condensed into ``centers`` tokens by
  coreset averaging (greedy k-center in L2 with `ops.kcenter`, every token joins its nearest
  center, inverse-distance weights) and the last ``f`` fuse into one token (their sum weighted by
  their [CLS] attention). x ``[B, 1 + n, D]`` -> ``[B, 1 + k + centers + 1, D]``.
  With a `TCAReservoir` attached (``method.reservoir``) whose anchors are active, the method also
  runs after block ``d - 1`` and inserts each sample's domain anchor (the reservoir class mean of
  the [CLS] token after block ``d - 1`` most cosine-similar to the sample's [CLS]) as an extra
  token at position 1, which block ``d``'s attention sees as key / value; the call after block
  ``d`` removes it again. Inactive anchors are inserted as padding (size 0: a ``-inf`` key), so
  shapes never depend on the reservoir's contents.
* `TCAReservoir`: the state that persists across calls (per pseudo-label class: up to ``size``
  entries of the per-layer [CLS] tokens with their prediction entropy), its update rule and the
  reservoir logits ``lambd * exp(-beta * (1 - affinity)) @ one_hot(class)``.
  `tokenreduce.models.tca_clip.TCAClassifier` runs both around a transformers CLIP model.

Reservoir state (what persists, how it resets): ``cls`` ``[C, S, L, D]``, ``entropy`` ``[C, S]``,
``valid`` ``[C, S]``, ``anchors`` ``[C, L, D]`` and ``active`` (a 0-dim bool) live on the device
and change only in `TCAReservoir.update`; `TCAReservoir.reset` / `TCA.reset` empty it (a new
domain or test stream). A batch of B samples updates it sample by sample in batch order (sample
0 first), as B consecutive batches of one would, except that the anchors the vision encoder
used for the batch are those of the state before the batch (exact for B = 1).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .. import ops
from ..errors import fail
from .base import Context, Method, Need, Reduction, Stage
from .helpers import assemble, check_x, gather_tokens, is_int_at_least, need, topk_indices

__all__ = ["TCA", "TCAReservoir", "rate_plan", "budget_plan", "coreset_average", "condense"]


# -- the condensation of one drop layer -----------------------------------------------------------

def rate_plan(n: int, rate: float, centers: int) -> Tuple[int, int, int, int]:
    """The authors' counts for ``n`` image tokens at drop rate ``rate``: ``(k, s, f, c)`` = kept,
    clustered into ``c`` centers, fused into one token. left = ceil((1 - rate) n), m = n + 1 - left:
    k = left - 2m, s = 2m, f = n - left (ResidualAttentionBlock_Ours)."""
    left = math.ceil((1.0 - rate) * n)
    m = n + 1 - left
    return left - 2 * m, 2 * m, n - left, centers


def budget_plan(n: int, t: int, centers: int) -> Tuple[int, int, int, int]:
    """``(k, s, f, c)`` turning ``n`` image tokens into exactly ``t`` (our keep= / ratio= schedule):
    ``c = min(centers, t - 1)`` centers, one fused token (when t >= 2), ``k = t - c - 1`` kept; of
    the other ``n - k`` tokens about a third fuse and the rest are clustered, as the authors' s = 2m,
    f = m - 1 split does."""
    if t >= n:
        return n, 0, 0, 0
    extra = 1 if t >= 2 else 0
    c = min(centers, t - extra)
    k = t - extra - c
    r = n - k
    f = 0 if not extra else min(max((r - 2) // 3, 1), r - c)
    return k, r - f, f, c


def coreset_average(xc: Tensor, c: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Coreset averaging of ``xc`` ``[B, s, D]`` into ``c`` tokens: greedy k-center (L2, first
    center = row 0), each row joins its nearest center (ties: the earlier center), members
    averaged with weights 1 / distance (1 for distance 0: the center itself).
    Returns (tokens ``[B, c, D]`` float32, center rows ``[B, c]``, assignment ``[B, s]``)."""
    xf = xc.float()
    centers, _ = ops.kcenter(xf, c, metric="l2", first=0)
    cent = gather_tokens(xf, centers)                                   # [B, c, D]
    dist = torch.cdist(xf, cent)                                        # [B, s, c]
    assign = dist.argmin(dim=-1)                                        # [B, s]
    d = (xf - gather_tokens(cent, assign)).norm(dim=-1)                  # [B, s], exact 0 at a center
    w = torch.where(d == 0, torch.ones_like(d), 1.0 / d.clamp_min(1e-30))
    onehot = F.one_hot(assign, c).to(xf.dtype) * w.unsqueeze(-1)        # [B, s, c]
    onehot = onehot / onehot.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return onehot.transpose(1, 2) @ xf, centers, assign


def condense(ctx: Context, attn: Tensor, k: int, s: int, f: int, c: int) -> Reduction:
    """One TCA condensation of ``ctx.x`` ``[B, 1 + n, D]`` ([CLS] first) by the [CLS] attention
    ``attn`` ``[B, 1 + n]``: [CLS], the top ``k`` (attention order), ``c`` coreset centers of the
    next ``s``, one token fusing the last ``f`` (attention-weighted sum; absent when f = 0)."""
    x = ctx.x
    B, N, D = x.shape
    n = N - 1
    a = attn[:, 1:].float()
    order = topk_indices(a, n)                                          # [B, n] by attention, desc
    parts, index, slot = [], [], torch.empty(B, n, dtype=torch.long, device=x.device)
    kept = order[:, :k]
    parts.append(gather_tokens(x[:, 1:], kept))
    index.append(kept)
    slots = torch.arange(n, device=x.device).expand(B, n)
    slot = slot.scatter(1, order, slots)        # rank of every image token; remapped below
    src = torch.where(slot < k, slot, torch.zeros_like(slot))
    if s:
        clus = order[:, k:k + s]
        merged, centers, assign = coreset_average(gather_tokens(x[:, 1:], clus), c)
        parts.append(merged.to(x.dtype))
        index.append(clus.gather(1, centers))
        in_clus = (slot >= k) & (slot < k + s)
        member = assign.gather(1, (slot - k).clamp(0, s - 1))
        src = torch.where(in_clus, k + member, src)
    if f:
        fused = order[:, k + s:]
        w = a.gather(1, fused).unsqueeze(-1)
        parts.append((gather_tokens(x[:, 1:], fused).float() * w).sum(dim=1, keepdim=True).to(x.dtype))
        index.append(torch.full((B, 1), -1, dtype=torch.long, device=x.device))
        src = torch.where(slot >= k + s, torch.full_like(slot, k + c), src)
    return assemble(ctx, torch.cat(parts, dim=1), torch.cat(index, dim=1), src)


def _insert_anchor(red: Reduction, anchor: Tensor, active: Tensor) -> Reduction:
    """``red`` with ``anchor`` ``[B, D]`` inserted at slot 1 (after [CLS]); size 1 where the
    reservoir's anchors are ``active`` (0-dim bool), else 0 (a padding slot, masked as a key)."""
    B = red.tokens.shape[0]
    t = torch.cat([red.tokens[:, :1], anchor.to(red.tokens.dtype).unsqueeze(1), red.tokens[:, 1:]], dim=1)
    idx = torch.cat([red.index[:, :1], torch.full((B, 1), -1, dtype=torch.long, device=t.device),
                     red.index[:, 1:]], dim=1)
    src = torch.where(red.source >= 1, red.source + 1, red.source)
    sz = active.float().expand(B, 1)
    size = torch.cat([red.size[:, :1], sz, red.size[:, 1:]], dim=1)
    return Reduction(t, idx, src, size)


def _identity(ctx: Context) -> Reduction:
    x = ctx.x
    B, N, _ = x.shape
    pos = torch.arange(N, device=x.device).expand(B, N)
    size = ctx.size.float() if ctx.size is not None else torch.ones(B, N, device=x.device)
    return Reduction(x, pos, pos, size)


# -- the reservoir ------------------------------------------------------------------------------------

class TCAReservoir:
    """Domain anchors across test samples (the authors' ``reservoir`` dict and ``cls_token_cache``).

    ``num_classes`` C pseudo-label classes, ``size`` S entries each, ``layers`` L per-layer [CLS]
    tokens of width ``dim`` D. `update` inserts a batch sample by sample (batch order) and returns
    each sample's reservoir logits computed right after its own insertion (as the authors' runner
    does); `anchors` are the class means of the [CLS] tokens, active once every class holds at
    least two entries (then recomputed after every insertion). `reset` empties everything.
    """

    def __init__(self, num_classes: int, layers: int, dim: int, *, size: int = 3, scale: float = 0.1,
                 lambd: float = 3.0, beta: float = 5.0, device=None):
        for name, v in (("num_classes", num_classes), ("layers", layers), ("dim", dim), ("size", size)):
            if not is_int_at_least(v, 1):
                fail("methods.tca", f"reservoir {name} must be an int >= 1, got {v!r}")
        if not scale > 0:
            fail("methods.tca", f"reservoir scale must be > 0, got {scale!r}")
        self.C, self.L, self.D, self.S = num_classes, layers, dim, size
        self.scale, self.lambd, self.beta = float(scale), float(lambd), float(beta)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        w = torch.exp(torch.linspace(0, 1, layers, dtype=torch.float64) / self.scale)
        self.layer_weights = (w / w.sum()).float().to(self.device)       # [L]
        self.reset()

    def reset(self) -> None:
        """Forget every entry and the anchors (a new test domain / stream)."""
        C, S, L, D, dev = self.C, self.S, self.L, self.D, self.device
        self.cls = torch.zeros(C, S, L, D, device=dev)
        self.entropy = torch.zeros(C, S, device=dev)
        self.valid = torch.zeros(C, S, dtype=torch.bool, device=dev)
        self.anchors = torch.zeros(C, L, D, device=dev)
        self.active = torch.zeros((), dtype=torch.bool, device=dev)

    def anchor_for(self, layer: int, cls: Tensor) -> Tuple[Tensor, Tensor]:
        """Each sample's anchor for the input of block ``layer + 1``: the class mean (after block
        ``layer``) most cosine-similar to its [CLS] ``cls`` ``[B, D]`` -> (``[B, D]``, active)."""
        a = self.anchors[:, min(max(layer, 0), self.L - 1)]                # [C, D]
        sim = F.cosine_similarity(a.unsqueeze(1), cls.float().unsqueeze(0), dim=-1)   # [C, B]
        return a[sim.argmax(dim=0)], self.active

    def logits(self, cls_layers: Tensor) -> Tensor:
        """Reservoir logits ``[B, C]`` of ``cls_layers`` ``[B, L, D]`` against the current entries."""
        aff = F.cosine_similarity(cls_layers.float()[:, None, None], self.cls[None], dim=-1)   # [B, C, S, L]
        aff = (aff * self.layer_weights).sum(-1)                                                # [B, C, S]
        e = torch.exp(-(self.beta - self.beta * aff)) * self.valid
        return self.lambd * e.sum(-1)

    def _insert(self, pred: Tensor, ent: Tensor, cls_layers: Tensor) -> None:
        """One sample: pred int64 ``[1]``, ent ``[1]``, cls_layers ``[L, D]`` (device ops only)."""
        S = self.S
        rows = self.cls.index_select(0, pred)[0]               # [S, L, D]
        valid = self.valid.index_select(0, pred)[0]            # [S]
        ents = self.entropy.index_select(0, pred)[0]           # [S]
        new = cls_layers.float().unsqueeze(0)                  # [1, L, D]
        cand = torch.cat([rows, new], 0)                       # [S + 1, L, D]
        cval = torch.cat([valid, valid.new_ones(1)])
        cent = torch.cat([ents, ent.float()])
        feat = F.normalize(cand.mean(dim=1), dim=-1)           # token_sim: mean over the layers
        sim = feat @ feat.t()
        sim = sim * (cval[None] & cval[:, None]) * (1 - torch.eye(S + 1, device=sim.device))
        score = (cent + sim.sum(1) / S).masked_fill(~cval, float("-inf"))   # full: S others each
        full = valid.all()
        drop = score.argmax()
        free = torch.cat([(~valid).long(), valid.new_ones(1).long()]).argmax()   # first empty slot
        target = torch.where(full, drop, free)                 # S: the new sample itself is dropped
        put = F.one_hot(target, S + 1)[:S].bool()              # [S]
        self.cls.index_copy_(0, pred, torch.where(put[:, None, None], new, rows).unsqueeze(0))
        self.entropy.index_copy_(0, pred, torch.where(put, ent.float(), ents).unsqueeze(0))
        self.valid.index_copy_(0, pred, (valid | put).unsqueeze(0))
        count = self.valid.sum(1)
        ready = (count > 1).all()
        means = (self.cls * self.valid[..., None, None]).sum(1) / count.clamp_min(1)[:, None, None]
        self.anchors = torch.where(ready, means, self.anchors)
        self.active = self.active | ready

    def update(self, pred: Tensor, entropy: Tensor, cls_layers: Tensor) -> Tensor:
        """Insert a batch (``pred`` int64 ``[B]``, ``entropy`` ``[B]``, ``cls_layers``
        ``[B, L, D]``) in batch order; returns the reservoir logits ``[B, C]``, each computed right
        after its sample's insertion."""
        B = pred.shape[0]
        if cls_layers.shape[1:] != (self.L, self.D):
            fail("methods.tca", f"cls_layers must be [B, {self.L}, {self.D}], got {tuple(cls_layers.shape)}")
        out = []
        for b in range(B):     # sequential by definition: each insertion sees the previous ones
            self._insert(pred[b:b + 1].long(), entropy[b:b + 1], cls_layers[b])
            out.append(self.logits(cls_layers[b:b + 1]))
        return torch.cat(out, 0)


# -- the method ---------------------------------------------------------------------------------------------

@register
class TCA(Method):
    """TCA: condense image tokens at CLIP drop layers by [CLS] attention, guided by reservoir anchors.

    x ``[B, 1 + n, D]`` ([CLS] first), ctx.cls_attn[d] ``[B, 1 + n]`` -> ``[B, 1 + k + c + 1, D]``
    at each drop layer d; see the module docstring for the reservoir (``method.reservoir``)."""
    name = "tca"
    paper = ("Wang et al., Is Less More? Exploring Token Condensation as Training-free Test-time "
             "Adaptation, ICCV 2025")
    code = "github.com/Jo-wang/TCA"
    stage = Stage.VIT
    needs = frozenset({Need.FEATURES, Need.CLS_ATTN})
    options = {"layers": "drop layers (0-based blocks; default 3, 6, 9 of ViT-B/16's 12)",
               "rate": "the authors' drop rate per drop layer (default 0.1) when no keep/ratio is given",
               "centers": "coreset centers per drop layer (default 4)"}
    budgets = ("rate=r per drop layer (the authors', default 0.1: 196 -> 142 -> ... on ViT-B/16), or "
               "keep=K / ratio=q of the image tokens at the encoder output (geometric over the drop layers)")
    faithful_to = ("Jo-wang/TCA @0f846d6 clip/model.py ResidualAttentionBlock_Ours (anchor prepended to "
                   "the block's attention, [CLS]-attention top-k, coreset_averaging of the next 2m, "
                   "attention-weighted fused token), VisionTransformer drop_loc [3, 6, 9], "
                   "CLIP.update_cls_token, runner.py update_reservoir_sim / compute_reservoir_logits "
                   "(configs: size 3, scale 0.1, lambd 3, beta 5)")
    deviations = ("k-center's first center is the cluster token with the highest [CLS] attention (the "
                  "authors draw it with torch.randint); condensation after the whole block (the authors "
                  "between attention and MLP: kept tokens identical, merged/fused tokens are averages of "
                  "post-MLP states); the anchor enters as a token after block d-1 (its query row is "
                  "discarded, as theirs); inactive anchors are padding keys (static shapes); batched: a "
                  "batch's anchors are those before it, the reservoir is then updated in batch order (exact "
                  "for B=1); per-sample [CLS] lists (theirs: sample 0); reservoir ties to the lower slot; "
                  "keep=/ratio= schedule ours; float32 reservoir")
    proportional_attention = False

    def configure(self) -> None:
        layers = tuple(self.opts.get("layers", (3, 6, 9)))
        if not layers or not all(is_int_at_least(l, 1) for l in layers) or list(layers) != sorted(set(layers)):
            fail(self.where, f"layers must be increasing ints >= 1, got {layers!r}")
        self.layers = layers
        rate = self.opts.get("rate", 0.1)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
            fail(self.where, f"rate must be in (0, 1), got {rate!r}")
        if "rate" in self.opts and self.budget.given:
            fail(self.where, "give keep/ratio or rate, not both")
        self.rate = float(rate)
        self.centers = self.opts.get("centers", 4)
        if not is_int_at_least(self.centers, 1):
            fail(self.where, f"centers must be an int >= 1, got {self.centers!r}")
        self.reservoir: Optional[TCAReservoir] = None

    def default_budget_ok(self) -> bool:
        return True

    def reset(self) -> None:
        """Empty the attached reservoir (a new domain / test stream); the method holds no other state."""
        if self.reservoir is not None:
            self.reservoir.reset()

    def _anchor_layers(self) -> List[int]:
        return [d - 1 for d in self.layers] if self.reservoir is not None else []

    def reduce_layers(self, num_layers: int) -> List[int]:
        if self.layers[-1] > num_layers - 1:
            fail(self.where, f"drop layer {self.layers[-1]} beyond the {num_layers} encoder layers")
        return sorted(set(self.layers) | set(self._anchor_layers()))

    def attention_layers(self, num_layers: int) -> List[int]:
        self.reduce_layers(num_layers)
        return list(self.layers)

    def _rate_counts(self, n: int) -> List[Tuple[int, int, int, int]]:
        plans = []
        for _ in self.layers:
            k, s, f, c = rate_plan(n, self.rate, self.centers)
            if k < 0:
                fail(self.where, f"rate={self.rate} leaves no kept token of {n} (k={k}); lower the rate")
            plans.append((k, s, f, c))
            n = k + (c if s else 0) + (1 if f else 0)
        return plans

    def keep_tokens(self, n: int) -> int:
        if self.budget.given:
            return self.budget.resolve(n)
        k, s, f, c = self._rate_counts(n)[-1]
        return k + (c if s else 0) + (1 if f else 0)

    def _plan(self, ctx: Context, stage: int, n: int) -> Tuple[int, int, int, int]:
        n0 = ctx.state.setdefault("tca_n0", n)
        if not self.budget.given:
            k, s, f, c = rate_plan(n, self.rate, self.centers)
            if k < 0:
                fail(self.where, f"rate={self.rate} leaves no kept token of {n} (k={k}); lower the rate")
            return k, s, f, c
        final = self.budget.resolve(n0)
        D = len(self.layers)
        t = final if stage == D - 1 else max(final, min(n, int(round(n0 * (final / n0) ** ((stage + 1) / D)))))
        return budget_plan(n, t, self.centers)

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where, cls=True)
        l = ctx.layer
        if l is None or (l not in self.layers and l not in self._anchor_layers()):
            fail(self.where, f"called after layer {l}; expected one of {self.reduce_layers(10 ** 6)} "
                             "(ctx.layer must be set)")
        anchored = bool(ctx.state.get("tca_anchor", False))
        red = None
        if l in self.layers:
            attn = need(ctx, self.where, "cls_attn", l)
            sub = ctx
            if anchored:   # drop the anchor (slot 1) before condensing
                dev = ctx.x.device
                keep = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                                  torch.arange(2, ctx.x.shape[1], device=dev)])
                sub = Context(x=ctx.x[:, keep], has_cls=True, size=None if ctx.size is None else ctx.size[:, keep],
                              state=ctx.state, layer=l)
                attn = attn[:, keep]
            k, s, f, c = self._plan(ctx, self.layers.index(l), sub.n_image)
            red = condense(sub, attn, k, s, f, c) if s or f else _identity(sub)
            if anchored:
                B = red.index.shape[0]
                red = Reduction(red.tokens, torch.where(red.index >= 1, red.index + 1, red.index),
                                torch.cat([red.source[:, :1], red.source.new_full((B, 1), -1), red.source[:, 1:]], 1),
                                red.size)
            ctx.state["tca_anchor"] = False
        if l in self._anchor_layers() and self.reservoir is not None:
            base = red if red is not None else _identity(ctx)
            anchor, active = self.reservoir.anchor_for(l, base.tokens[:, 0])
            red = _insert_anchor(base, anchor, active)
            ctx.state["tca_anchor"] = True
        return red
