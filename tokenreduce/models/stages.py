"""What every reduction stage shares (vision encoder `vit`, the LLM `llm`, the VLM adapters).

* `LayerPlan` / `plan_layers`: a method's declared layer numbers mapped onto a model's depth
  (`NOMINAL_DEPTH` when they do not fit a short model); `resolve_layer` reads ``-2`` as
  ``L - 2``;
* `check_needs`: a clear error when a method needs what a model cannot give;
* `request_scores` / `fill_context_scores`: ask the `ScoreRecorder` for the statistics a
  method needs and put them into its `Context`, keyed by the layers the method declared;
* `check_reduction`: a method's `Reduction` has the shapes of its input;
* the need -> statistic kind tables (`RECORDED_NEED_KIND`, `LLM_NEED_KIND`) and the kind ->
  `Context` field table (`CONTEXT_FIELD`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

from ..methods.base import Context, Method, Need, Reduction
from .attention import ScoreRecorder

__all__ = ["NOMINAL_DEPTH", "LayerPlan", "plan_layers", "resolve_layer", "check_needs", "check_reduction",
           "request_scores", "fill_context_scores", "RECORDED_NEED_KIND", "LLM_NEED_KIND", "CONTEXT_FIELD"]

# Depth a method's layer numbers refer to when they do not fit the model (a short test model,
# ``--layers``): the papers' reference models (CLIP-L/14: 24 vision layers; Vicuna/LLaMA-7B of
# LLaVA-1.5: 32 LLM layers).
NOMINAL_DEPTH = {"vision": 24, "llm": 32}

# need -> recorder kind: what the "tokenreduce" attention records during the forward (any stage)
RECORDED_NEED_KIND = {Need.CLS_ATTN: "cls", Need.ATTN_RECEIVED: "received", Need.QUERY_ATTN: "query",
                      Need.VALUES: "values"}
# need -> kind of the statistics an LLM-stage method is given (`tokenreduce.models.llm`)
LLM_NEED_KIND = {Need.QUERY_ATTN: "query", Need.ATTN_RECEIVED: "received", Need.VISUAL_ATTN: "visual",
                 Need.QUERY_ATTN_NOROPE: "norope", Need.VALUES: "values", Need.RATER_ATTN: "rater"}
# recorder kind -> the `Context` field (a dict keyed by layer) that holds it
CONTEXT_FIELD = {"cls": "cls_attn", "received": "attn_received", "query": "query_attn", "values": "values",
                 "visual": "visual_attn", "norope": "query_attn_norope", "rater": "rater_attn"}


def resolve_layer(layer: int, n: int, what: str) -> int:
    """A declared layer (negative: from the end) as a 0-based index into ``n`` layers."""
    l = layer + n if layer < 0 else layer
    if not 0 <= l < n:
        raise ValueError(f"tokenreduce.models: {what} layer {layer} is outside the {n} layers")
    return l


@dataclass
class LayerPlan:
    """A method's layer numbers mapped onto a model with ``L`` layers.

    The method declares its layers for a depth ``Ln`` (``Ln == L`` when its declarations fit
    the model: the identity). When they do not (PyramidDrop's 8/16/24 in a 4-layer LLM,
    HiPrune's object layer 9 in a 4-layer ViT), they are read at the nominal depth ``Ln``
    (`NOMINAL_DEPTH`) and layer ``l`` (0-based) runs at ``(l + 1) * L // Ln - 1``, clipped to
    ``[0, top]`` (relative depth kept). Several nominal reduce layers may land on the same
    model layer: `reduce` is then called for each, in order, at that layer. The method keeps
    seeing its own numbers (``ctx.layer``, ``ctx.num_layers = Ln``, statistics keyed by the
    layers it declared)."""
    L: int
    Ln: int
    reduce: List[Tuple[int, int]]              # (nominal layer, model layer), call order
    attention: List[Tuple[int, int, int]]      # (as declared, nominal >= 0, model layer)

    @property
    def mapped(self) -> bool:
        return self.Ln != self.L

    def reduce_at(self) -> Dict[int, List[int]]:
        """model layer -> nominal layers to reduce after it (in order)."""
        out: Dict[int, List[int]] = {}
        for n, a in self.reduce:
            out.setdefault(a, []).append(n)
        return out

    def model_layer(self, nominal: int, top: Optional[int] = None) -> int:
        if not self.mapped:
            return nominal
        top = self.L - 1 if top is None else top
        return min(max((nominal + 1) * self.L // self.Ln - 1, 0), top)


def plan_layers(method: Method, L: int, nominal_layers: Optional[int] = None, default_nominal: int = 24,
                reduce_top: Optional[int] = None) -> LayerPlan:
    """Map ``method``'s declared layers onto a model with ``L`` layers (see `LayerPlan`).
    ``nominal_layers`` forces the depth the method's numbers refer to; by default the model's
    own depth when the declarations fit it, else ``max(default_nominal, L)``.
    ``reduce_top``: the last model layer a mapped reduction may follow (``L - 2`` for
    lookahead); an identity plan is returned as declared (callers check what can run)."""
    Ln = nominal_layers
    if Ln is None:
        try:
            [resolve_layer(l, L, "") for l in method.reduce_layers(L)]
            [resolve_layer(l, L, "") for l in method.attention_layers(L)]
            Ln = L
        except ValueError:
            Ln = max(default_nominal, L)
    red = sorted({resolve_layer(l, Ln, f"{method.name} reduce") for l in method.reduce_layers(Ln)})
    att = [(l, resolve_layer(l, Ln, f"{method.name} attention")) for l in method.attention_layers(Ln)]
    plan = LayerPlan(L, Ln, [], [])
    top = L - 1 if reduce_top is None else reduce_top
    plan.reduce = [(r, plan.model_layer(r, top)) for r in red]
    plan.attention = [(l, r, plan.model_layer(r)) for l, r in att]
    return plan


def check_needs(method: Method, unavailable: Dict[Need, str]) -> None:
    """Raise a clear error when ``method`` needs something this model cannot give
    (``unavailable``: need -> why)."""
    for need, why in unavailable.items():
        if need in method.needs:
            raise ValueError(f"tokenreduce.models: {method.name} needs {need.value}, but {why}")


def check_reduction(method: Method, x: Tensor, red: Reduction, where: str) -> None:
    """``red`` (what ``method`` returned ``where``) is a `Reduction` of ``x`` ``[B, N, C]``:
    ``tokens`` ``[B, K, C']``, ``source`` ``[B, N]``."""
    B, N, _ = x.shape
    if not isinstance(red, Reduction):
        raise TypeError(f"tokenreduce.models: {method.name} {where} returned {type(red).__name__}, not a Reduction")
    if red.kept_rows:   # tokens are x's rows at index (gathered on first use): check index
        bad = red.index.dim() != 2 or red.index.shape[0] != B
        got = f"index {tuple(red.index.shape)}"
    else:
        bad = red.tokens.dim() != 3 or red.tokens.shape[0] != B
        got = f"tokens {tuple(red.tokens.shape)}"
    if bad or red.source.shape != (B, N):
        raise ValueError(f"tokenreduce.models: {method.name} {where}: Reduction shapes do not match the input "
                         f"(x {tuple(x.shape)}, {got}, source {tuple(red.source.shape)})")


def request_scores(rec: ScoreRecorder, method: Method, part: str, num_layers: int,
                   key_layers: List[int] = (), plan: Optional[LayerPlan] = None,
                   skip_layers: Tuple[int, ...] = ()) -> None:
    """Ask the recorder for what ``method`` needs (``key_layers``: model layers where
    Need.KEYS is read; ``plan``: the method's layers on this model, default the identity;
    ``skip_layers``: nominal layers computed elsewhere, e.g. by lookahead)."""
    plan = plan if plan is not None else plan_layers(method, num_layers, nominal_layers=num_layers)
    kinds = [k for n, k in RECORDED_NEED_KIND.items() if n in method.needs]
    for _, r, a in plan.attention:
        if kinds and r not in skip_layers:
            rec.request(part, a, kinds)
    if Need.KEYS in method.needs:
        for l in key_layers:
            rec.request(part, l, ["keys"])


def fill_context_scores(ctx: Context, rec: ScoreRecorder, method: Method, part: str, num_layers: int,
                        transform: Callable[[Tensor], Tensor] = lambda t: t,
                        plan: Optional[LayerPlan] = None) -> None:
    """Put the recorded statistics the method named into ``ctx``, keyed by the layers the
    method declared (both spellings: as declared, e.g. -2, and resolved >= 0)."""
    plan = plan if plan is not None else plan_layers(method, num_layers, nominal_layers=num_layers)
    for l, r, a in plan.attention:
        for need, kind in RECORDED_NEED_KIND.items():
            if need not in method.needs:
                continue
            v = rec.get(kind, part, a)
            if v is not None:
                d = getattr(ctx, CONTEXT_FIELD[kind])
                d[r] = transform(v)
                d[l] = d[r]
