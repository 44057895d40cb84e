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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..methods.base import Context, Method, Need, Reduction, Stage
from . import attention as A

__all__ = ["VisionParts", "vision_parts", "Tracker", "VisionOutput", "run_vision", "prepare",
           "request_scores", "fill_context_scores"]


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


def prepare(model: nn.Module) -> nn.Module:
    """Register the ``"tokenreduce"`` attention and switch ``model`` (and its sub-models) to it."""
    A.register()
    model.set_attn_implementation(A.NAME)
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
        self.source = torch.where(self.source >= 0, s, torch.full_like(s, -1))
        self.size = red.size.float()

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
    recorder: A.ScoreRecorder
    grid: Tuple[int, int]
    steps: List[Dict[str, Any]] = field(default_factory=list)   # (stage, layer, tokens in, tokens out)
    reduction: Optional[Reduction] = None    # the PROJECTOR reduction, if any


_NEED_KIND = {Need.CLS_ATTN: "cls", Need.ATTN_RECEIVED: "received", Need.QUERY_ATTN: "query",
              Need.VALUES: "values"}
_CTX_FIELD = {"cls": "cls_attn", "received": "attn_received", "query": "query_attn", "values": "values"}


def _resolve(layer: int, n: int, what: str) -> int:
    l = layer + n if layer < 0 else layer
    if not 0 <= l < n:
        raise ValueError(f"tokenreduce.models: {what} layer {layer} is outside the {n} layers")
    return l


def request_scores(rec: A.ScoreRecorder, method: Method, part: str, num_layers: int,
                   key_layers: List[int] = ()) -> None:
    """Ask the recorder for what ``method`` needs (``key_layers``: where Need.KEYS is read)."""
    kinds = [k for n, k in _NEED_KIND.items() if n in method.needs]
    for l in method.attention_layers(num_layers):
        rec.request(part, _resolve(l, num_layers, f"{method.name} attention"), kinds)
    if Need.KEYS in method.needs:
        for l in key_layers:
            rec.request(part, l, ["keys"])


def fill_context_scores(ctx: Context, rec: A.ScoreRecorder, method: Method, part: str, num_layers: int,
                        transform: Callable[[Tensor], Tensor] = lambda t: t) -> None:
    """Put the recorded statistics the method named into ``ctx`` (both layer spellings)."""
    for l in method.attention_layers(num_layers):
        r = _resolve(l, num_layers, f"{method.name} attention")
        for need, kind in _NEED_KIND.items():
            if need not in method.needs:
                continue
            v = rec.get(kind, part, r)
            if v is not None:
                d = getattr(ctx, _CTX_FIELD[kind])
                d[r] = transform(v)
                d[l] = d[r]


def _check_method(method: Method, x: Tensor, red: Reduction, where: str) -> None:
    B, N, _ = x.shape
    if not isinstance(red, Reduction):
        raise TypeError(f"tokenreduce.models: {method.name} {where} returned {type(red).__name__}, not a Reduction")
    if red.tokens.dim() != 3 or red.tokens.shape[0] != B or red.source.shape != (B, N):
        raise ValueError(f"tokenreduce.models: {method.name} {where}: Reduction shapes do not match the input "
                         f"(x {tuple(x.shape)}, tokens {tuple(red.tokens.shape)}, source {tuple(red.source.shape)})")


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
               feature_layer: Optional[int] = None, recorder: Optional[A.ScoreRecorder] = None,
               part: str = "vision") -> VisionOutput:
    """Run a vision encoder with ``method`` (Stage.VIT or Stage.PROJECTOR, or None: the
    full model). ``feature_layer=None`` runs every block and applies the final norm;
    an int stops at ``hidden_states[feature_layer]`` (LLaVA: -2) and returns it as
    ``features`` (no final norm, as LLaVA)."""
    parts = vision_parts(model)
    if method is not None and method.stage not in (Stage.VIT, Stage.PROJECTOR):
        raise ValueError(f"tokenreduce.models.vit: {method.name} runs at stage {method.stage.value}, "
                         "not in a vision encoder (vit / projector)")
    L = len(parts.layers)
    n_run = _feature_layers(feature_layer, L)
    rec = recorder if recorder is not None else A.ScoreRecorder()
    A.tag_layers(parts.layers, part)
    B = pixel_values.shape[0]
    grid = (pixel_values.shape[-2] // parts.patch, pixel_values.shape[-1] // parts.patch)
    c = int(parts.has_cls)
    reduce_at: List[int] = []
    if method is not None:
        if method.stage == Stage.VIT:
            reduce_at = sorted({_resolve(l, L, f"{method.name} reduce") for l in method.reduce_layers(L)})
            if reduce_at and reduce_at[-1] >= n_run:
                raise ValueError(f"tokenreduce.models.vit: {method.name} reduces after layer {reduce_at[-1]} but "
                                 f"only {n_run} layers run")
            request_scores(rec, method, part, L, key_layers=reduce_at)
        else:
            request_scores(rec, method, part, L, key_layers=[n_run - 1])
        if rec.requests and model.config._attn_implementation != A.NAME:
            raise RuntimeError(f"tokenreduce.models.vit: {method.name} needs attention statistics: call "
                               f"tokenreduce.models.vit.prepare(model) first (attention implementation is "
                               f"{model.config._attn_implementation!r}; eager output_attentions is never used)")
    state: Dict[str, Any] = {}
    steps: List[Dict[str, Any]] = []
    with A.recording(rec):
        h = parts.embed(pixel_values)
        tracker = Tracker(B, h.shape[1] - c, h.device)
        tracker_full = Tracker(B, h.shape[1], h.device)   # including [CLS], for reindexing sizes
        size = None
        for i in range(n_run):
            h = parts.layers[i](h, None)
            if i in reduce_at:
                ctx = _context(h, parts, tracker_full, grid, rec, method, part, L, i, size, state, pixel_values)
                red = method(ctx)
                _check_method(method, h, red, f"after layer {i}")
                steps.append({"stage": "vit", "layer": i, "tokens_in": h.shape[1], "tokens_out": red.tokens.shape[1]})
                h = red.tokens
                tracker_full.apply(red)
                rec.reindex(part, red.index)
                size = red.size.float()
                if getattr(method, "proportional_attention", True):
                    rec.key_bias[part] = size.clamp_min(1e-6).log()
        rec.key_bias.pop(part, None)
        final_h = h
        last = pooled = None
        red_p = None
        if feature_layer is None:
            last, pooled = parts.finalize(h)
            final_h = last
        if method is not None and method.stage == Stage.PROJECTOR:
            ctx = _context(final_h, parts, tracker_full, grid, rec, method, part, L, n_run - 1, size, state,
                           pixel_values)
            ctx.layer = None
            red_p = method(ctx)
            _check_method(method, final_h, red_p, "on the encoder output")
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
             L: int, layer: int, size: Optional[Tensor], state, pixel_values) -> Context:
    c = int(parts.has_cls)
    full = h.shape[1] == grid[0] * grid[1] + c
    ctx = Context(x=h, has_cls=parts.has_cls, grid=grid if full else None, layer=layer, num_layers=L,
                  size=size, state=state, pixels=pixel_values if Need.PIXELS in method.needs else None)
    fill_context_scores(ctx, rec, method, part, L)
    if Need.KEYS in method.needs:
        ctx.keys = rec.get("keys", part, layer)
    return ctx
