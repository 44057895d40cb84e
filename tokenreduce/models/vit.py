"""Token reduction inside vision encoders (DINOv2, CLIP vision tower, SigLIP).

`run_vision(model, pixel_values, method)` runs a transformers vision encoder block by
block (its own modules, in their order; no monkey-patching) and calls the method

* `Stage.VIT`: after each layer in ``method.reduce_layers(num_layers)``; the hidden
  states are replaced by ``Reduction.tokens``, the token sizes are kept, and when the
  method merges, ``log(size)`` is passed to every later attention call as a key bias
  (ToMe's proportional attention; a method sets ``proportional_attention = False`` to
  opt out). Statistics recorded at earlier layers are re-aligned with the new tokens.
* `Stage.PROJECTOR`: once on the encoder's output features (or, with ``feature_layer``,
  on the hidden state LLaVA feeds its projector: ``-2`` = the output of the second-to-last
  layer; the last layer is then not run at all, it is unused). The method sees [CLS]
  (``has_cls``) and the ``cls_attn`` of the encoder's layers; `drop_cls` removes it
  afterwards as LLaVA's ``"default"`` feature select does.

Attention statistics come from the ``"tokenreduce"`` attention implementation
(`tokenreduce.models.attention`); `prepare(model)` switches the model to it. Which
statistics are requested follows ``method.needs`` and ``method.attention_layers``; a
statistic is stored under the 0-based layer index and also under the negative index the
method named (``ctx.cls_attn[-2]`` and ``ctx.cls_attn[L - 2]`` are the same tensor).

`Tracker` composes the source maps of successive reductions, so reduced features can be
mapped back to the full patch grid (`Tracker.unmerge`) for fidelity measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..methods.base import Context, Method, Need, Reduction, Stage
from . import attention, compat
from .stages import NOMINAL_DEPTH, LayerPlan, check_needs, check_reduction, fill_context_scores, plan_layers, \
    request_scores

__all__ = ["VisionParts", "vision_parts", "Tracker", "VisionOutput", "run_vision", "prepare", "padding_bias",
           "unavailable_needs"]


@dataclass
class VisionParts:
    """The pieces of a vision encoder the runner needs."""
    family: str                              # "dinov2" | "clip" | "siglip"
    embed: Callable[[Tensor], Tensor]        # pixel_values -> tokens [B, N, D] (before layer 0)
    layers: nn.ModuleList
    has_cls: bool
    patch: int
    finalize: Callable[[Tensor], Tuple[Tensor, Tensor]]   # tokens -> (last_hidden_state, pooled)
    config: Any


def vision_parts(model: nn.Module) -> VisionParts:
    """Recognise a transformers vision encoder (`Dinov2Model`, `CLIPVisionModel`,
    `CLIPVisionTransformer`, `SiglipVisionModel`, `SiglipVisionTransformer`)."""
    name = type(model).__name__
    if name == "Dinov2Model":
        m = model
        return VisionParts("dinov2", lambda px: m.embeddings(px), m.encoder.layer, True, m.config.patch_size,
                           lambda h: (m.layernorm(h), m.layernorm(h)[:, 0]), m.config)
    if hasattr(model, "vision_model"):   # older nesting (transformers 4) and full CLIP / SigLIP models
        model = model.vision_model
        name = type(model).__name__
    if name.startswith("CLIPVision") and hasattr(model, "pre_layrnorm"):
        vm = model
        return VisionParts("clip", lambda px: vm.pre_layrnorm(vm.embeddings(px)), vm.encoder.layers, True,
                           vm.config.patch_size, lambda h: (h, vm.post_layernorm(h[:, 0])), vm.config)
    if name.startswith("SiglipVision"):
        vm = model

        def fin(h):
            last = vm.post_layernorm(h)
            pooled = vm.head(last) if getattr(vm, "use_head", False) else last.mean(1)
            return last, pooled
        return VisionParts("siglip", lambda px: vm.embeddings(px), vm.encoder.layers, False,
                           vm.config.patch_size, fin, vm.config)
    raise TypeError(f"tokenreduce.models.vit: unsupported vision encoder {type(model).__name__}; "
                    "supported: Dinov2Model, CLIPVisionModel/Transformer, SiglipVisionModel/Transformer")


def unavailable_needs(parts: VisionParts, text: bool) -> Dict[Need, str]:
    """What a vision encoder cannot give a VIT / PROJECTOR method (need -> why); ``text``:
    the caller gives ``ctx.text`` (a VLM's text embeddings)."""
    unavailable = {} if text else {Need.TEXT: f"a vision encoder ({parts.family}) alone has no text"}
    unavailable.update({
                   Need.QUERY_ATTN: f"a vision encoder ({parts.family}) has no text query",
                   Need.QUERY_ATTN_NOROPE: f"a vision encoder ({parts.family}) has no text query",
                   Need.VISUAL_ATTN: "visual_attn is an LLM-stage statistic",
                   Need.LOOKAHEAD: "lookahead is an LLM-stage mechanism"})
    if not parts.has_cls:
        unavailable[Need.CLS_ATTN] = f"{parts.family} has no [CLS] token (no cls_attn to give)"
    return unavailable


def prepare(model: nn.Module) -> nn.Module:
    """Register the ``"tokenreduce"`` attention and switch ``model`` (and its sub-models) to it."""
    attention.register()
    model.set_attn_implementation(attention.NAME)
    return model


class Tracker:
    """Where each of the ``N0`` original tokens ended after successive reductions.

    ``source`` int64 ``[B, N0]``: slot in the current tokens, ``-1`` when dropped;
    ``size`` float32 ``[B, N]``: original tokens each current token stands for.
    """

    def __init__(self, batch: int, n0: int, device: torch.device):
        self.n0 = n0
        self.source = torch.arange(n0, device=device).expand(batch, n0).clone()
        self.size = torch.ones(batch, n0, dtype=torch.float32, device=device)

    def apply(self, red: Reduction) -> None:
        s = torch.gather(red.source, 1, self.source.clamp_min(0))
        self.source = torch.where(self.source >= 0, s, -1)
        self.size = _float32(red.size)

    def drop_first(self) -> None:
        """The current first token (e.g. [CLS]) is removed: shift the slots."""
        s = self.source - 1
        self.source = torch.where(s >= 0, s, torch.full_like(s, -1))
        self.size = self.size[:, 1:]

    def unmerge(self, y: Tensor, fill: str = "zeros") -> Tensor:
        """Current per-token features ``y`` ``[B, K, C]`` -> ``[B, N0, C]``: each original
        token gets the feature of the token it ended in; dropped tokens get zeros
        (``fill="zeros"``) or the mean of ``y`` (``fill="mean"``)."""
        src = self.source
        g = torch.gather(y, 1, src.clamp_min(0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        keep = (src >= 0).unsqueeze(-1)
        if fill == "zeros":
            return g * keep.to(g.dtype)
        if fill == "mean":
            return torch.where(keep, g, y.mean(dim=1, keepdim=True).expand_as(g))
        raise ValueError(f"tokenreduce.models.vit: fill must be 'zeros' or 'mean', got {fill!r}")

    @property
    def kept(self) -> Tensor:
        """bool ``[B, N0]``: the original token survives (alone or merged)."""
        return self.source >= 0


@dataclass
class VisionOutput:
    last_hidden_state: Optional[Tensor]      # final tokens (final norm applied as the model does)
    pooled: Optional[Tensor]                 # [CLS] / pooled embedding
    features: Optional[Tensor]               # hidden state at feature_layer (reduced when PROJECTOR)
    tracker: Tracker                         # original patch tokens (no [CLS]) -> current tokens
    recorder: attention.ScoreRecorder
    grid: Tuple[int, int]
    steps: List[Dict[str, Any]] = field(default_factory=list)   # (stage, layer, tokens in, tokens out)
    reduction: Optional[Reduction] = None    # the PROJECTOR reduction, if any


def padding_bias(size: Tensor, proportional: bool) -> Tensor:
    """Key bias ``[B, N]`` float32 of the current tokens: ``log(size)`` (proportional
    attention) or 0, and ``-inf`` on padding slots (size 0)."""
    size = _float32(size)
    b = size.clamp_min(1e-30).log_() if proportional else torch.zeros_like(size)
    return b.masked_fill_(size <= 0, float("-inf"))


def _float32(t: Tensor) -> Tensor:
    """``t`` as float32; itself (no op) when it already is."""
    return t if t.dtype == torch.float32 else t.float()


def _feature_layers(feature_layer: Optional[int], L: int) -> int:
    """How many blocks to run so that the last one gives hidden_states[feature_layer]."""
    if feature_layer is None:
        return L
    n = feature_layer + L + 1 if feature_layer < 0 else feature_layer
    if not 1 <= n <= L:
        raise ValueError(f"tokenreduce.models.vit: feature_layer {feature_layer} is outside the {L} layers")
    return n


@torch.no_grad()
def run_vision(model: nn.Module, pixel_values: Tensor, method: Optional[Method] = None, *,
               feature_layer: Optional[int] = None, recorder: Optional[attention.ScoreRecorder] = None,
               part: str = "vision", nominal_layers: Optional[int] = None,
               text: Optional[Tensor] = None) -> VisionOutput:
    """Run a vision encoder with ``method`` (Stage.VIT or Stage.PROJECTOR, or None: the
    full model). ``feature_layer=None`` runs every block and applies the final norm;
    an int stops at ``hidden_states[feature_layer]`` (LLaVA: -2) and returns it as
    ``features`` (no final norm, as LLaVA). ``nominal_layers``: the depth the method's layer
    numbers refer to (default: the model's when they fit, else `NOMINAL_DEPTH`; see `LayerPlan`).
    Padding slots (size 0) of a reduction are masked (``-inf`` key bias) in later layers.
    ``text``: ``ctx.text`` for methods that declare Need.TEXT (a VLM's text embeddings)."""
    parts = vision_parts(model)
    if method is not None and method.stage not in (Stage.VIT, Stage.PROJECTOR):
        raise ValueError(f"tokenreduce.models.vit: {method.name} runs at stage {method.stage.value}, "
                         "not in a vision encoder (vit / projector)")
    L = len(parts.layers)
    n_run = n_feat = _feature_layers(feature_layer, L)
    proj_key_layer = n_feat - 1
    rec = recorder if recorder is not None else attention.ScoreRecorder()
    attention.tag_layers(parts.layers, part)
    B = pixel_values.shape[0]
    grid = (pixel_values.shape[-2] // parts.patch, pixel_values.shape[-1] // parts.patch)
    c = int(parts.has_cls)
    reduce_at: Dict[int, List[int]] = {}
    plan = None
    if method is not None:
        check_needs(method, unavailable_needs(parts, text is not None))
        plan = plan_layers(method, L, nominal_layers=nominal_layers, default_nominal=NOMINAL_DEPTH["vision"],
                           reduce_top=n_run - 1 if method.stage == Stage.VIT else None)
        if (method.stage == Stage.VIT and nominal_layers is None and n_run < L and plan.reduce
                and max(a for _, a in plan.reduce) >= n_run):
            # a VIT method reducing after every layer (ToMe) with LLaVA's feature layer: the
            # layers that run are the whole encoder it sees (ToMe's num_layers=23 for 24)
            plan = plan_layers(method, n_run, nominal_layers=n_run)
        if method.stage == Stage.VIT:
            reduce_at = plan.reduce_at()
            if reduce_at and max(reduce_at) >= n_run:
                raise ValueError(f"tokenreduce.models.vit: {method.name} reduces after layer {max(reduce_at)} but "
                                 f"only {n_run} layers run")
            request_scores(rec, method, part, L, key_layers=sorted(reduce_at), plan=plan)
        else:
            # a PROJECTOR method may read layers after the feature layer (e.g. the tower's last
            # layer while LLaVA feeds hidden_states[-2]): they run for their statistics only, as
            # the original LLaVA tower runs every layer; keys come from its last declared layer
            att = [a for _, _, a in plan.attention]
            if att:
                n_run = max(n_run, max(att) + 1)
                proj_key_layer = att[-1]
            request_scores(rec, method, part, L, key_layers=[proj_key_layer], plan=plan)
        if any(a >= n_run for _, _, a in plan.attention):
            raise ValueError(f"tokenreduce.models.vit: {method.name} reads attention of layer "
                             f"{max(a for _, _, a in plan.attention)} but only {n_run} layers run")
        if rec.requests and model.config._attn_implementation != attention.NAME:
            raise RuntimeError(f"tokenreduce.models.vit: {method.name} needs attention statistics: call "
                               f"tokenreduce.models.vit.prepare(model) first (attention implementation is "
                               f"{model.config._attn_implementation!r}; eager output_attentions is never used)")
    state: Dict[str, Any] = {}
    steps: List[Dict[str, Any]] = []
    with attention.recording(rec):
        h = parts.embed(pixel_values)
        tracker = Tracker(B, h.shape[1] - c, h.device)
        tracker_full = Tracker(B, h.shape[1], h.device)   # including [CLS], for reindexing sizes
        size = None
        h_feat = None
        for i in range(n_run):
            h = compat.run_layer(parts.layers[i], h)
            for nominal in reduce_at.get(i, ()):
                ctx = _context(h, parts, tracker_full, grid, rec, method, part, L, nominal, size, state,
                               pixel_values, plan, key_layer=i)
                ctx.text = text
                red = method(ctx)
                check_reduction(method, h, red, f"after layer {i}")
                steps.append({"stage": "vit", "layer": i, "tokens_in": h.shape[1], "tokens_out": red.tokens.shape[1]})
                h = red.tokens
                tracker_full.apply(red)
                rec.reindex_later(part, red.index)   # the statistics catch up when read
                size = tracker_full.size
                rec.key_bias[part] = padding_bias(size, getattr(method, "proportional_attention", True))
            if i == n_feat - 1:
                h_feat = h
        rec.key_bias.pop(part, None)
        rec.resolve(part)
        h = h_feat
        final_h = h
        last = pooled = None
        red_p = None
        if feature_layer is None:
            last, pooled = parts.finalize(h)
            final_h = last
        if method is not None and method.stage == Stage.PROJECTOR:
            ctx = _context(final_h, parts, tracker_full, grid, rec, method, part, L, n_feat - 1, size, state,
                           pixel_values, plan, key_layer=proj_key_layer)
            ctx.layer = None
            ctx.text = text
            red_p = method(ctx)
            check_reduction(method, final_h, red_p, "on the encoder output")
            steps.append({"stage": "projector", "layer": None, "tokens_in": final_h.shape[1],
                          "tokens_out": red_p.tokens.shape[1]})
            tracker_full.apply(red_p)
            final_h = red_p.tokens
            if feature_layer is None:
                last = final_h
    # the patch tracker: original patches (no [CLS]) -> current slots (no [CLS])
    tracker.source = tracker_full.source[:, c:]
    tracker.size = tracker_full.size
    if c:
        tracker.drop_first()
    return VisionOutput(last_hidden_state=last, pooled=pooled,
                        features=final_h if feature_layer is not None else None,
                        tracker=tracker, recorder=rec, grid=grid, steps=steps, reduction=red_p)


def _context(h: Tensor, parts: VisionParts, tracker_full: Tracker, grid, rec, method: Method, part: str,
             L: int, layer: int, size: Optional[Tensor], state, pixel_values,
             plan: Optional[LayerPlan] = None, key_layer: Optional[int] = None) -> Context:
    """``layer``: the method's (nominal) layer number of this call; statistics come from the
    model layers the plan maps the method's layers to; ``key_layer``: the model layer whose keys
    are ``ctx.keys`` (default ``layer``)."""
    plan = plan if plan is not None else plan_layers(method, L, nominal_layers=L)
    c = int(parts.has_cls)
    full = h.shape[1] == grid[0] * grid[1] + c
    heads = getattr(parts.config, "num_attention_heads", None)
    ctx = Context(x=h, has_cls=parts.has_cls, grid=grid if full else None, layer=layer, num_layers=plan.Ln,
                  size=size, state=state, pixels=pixel_values if Need.PIXELS in method.needs else None,
                  heads=heads)
    fill_context_scores(ctx, rec, method, part, L, plan=plan)
    if Need.KEYS in method.needs:
        ctx.keys = rec.get("keys", part, layer if key_layer is None else key_layer)
    return ctx
