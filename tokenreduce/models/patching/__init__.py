"""HF-native use: `patch(model, method, keep=...)`, then the model's own ``generate`` /
``forward`` run the reduction unchanged; `unpatch(model)` or ``with patched(...)`` restores it.

    handle = tokenreduce.patch(model, "visionzip", keep=64)     # any method, budget, options
    out = model.generate(**processor(images=..., text=..., return_tensors="pt"), max_new_tokens=64)
    handle.stats[-1].tokens_out                                # image tokens kept per sample
    tokenreduce.unpatch(model)

Supported (model class -> stages): `LlavaForConditionalGeneration` (vit, projector, llm),
`LlavaNextForConditionalGeneration` (vit and tower-statistics projector methods per anyres
tile, features-only projector methods on the packed features, llm), `Qwen2VLForConditionalGeneration`
/ `Qwen2_5_VLForConditionalGeneration` (projector on the merged features, llm),
`Qwen3VLForConditionalGeneration` (projector on the merged features, DeepStack features cut
alike; llm after the DeepStack layers), and the vision
encoders `CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model` (vit, projector: ``model(pixel_values)``
returns the reduced tokens with their un-merge map, `ReducedVisionOutput`).

`patch` refuses before any forward runs: a model class it does not serve (TypeError), a
method whose needs the model cannot give (ValueError / NotImplementedError naming both).
Patching a patched model again is an error (RuntimeError: unpatch first); `unpatch` on a
model that is not patched does nothing (returns None). Scores come from the fused
``"tokenreduce"`` attention (`tokenreduce.models.attention`), selected by `patch` when the
method reads statistics (or runs in the LLM) and restored by `unpatch`.

* `handle`: `PatchHandle`, `CallStats`; `vlm`: `PatchedVLM` (prefill / decoding-step
  translation); `encoder`: `PatchedEncoder`, `ReducedVisionOutput`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from torch import nn

from ...errors import fail
from ...methods.base import Method, Need, Stage
from ..adapters import adapter_class
from ..stages import check_needs
from ..vit import unavailable_needs, vision_parts
from .encoder import PatchedEncoder, ReducedVisionOutput
from .handle import ATTR, RECORDED, CallStats, PatchHandle, needs_fused_attention, resolve_method
from .vlm import PatchedVLM

__all__ = ["patch", "unpatch", "patched", "PatchHandle", "CallStats", "ReducedVisionOutput", "SUPPORTED"]

SUPPORTED = {
    "LlavaForConditionalGeneration": ("vit", "projector", "llm"),
    "LlavaNextForConditionalGeneration": ("vit", "projector", "llm"),
    "Qwen2VLForConditionalGeneration": ("projector", "llm"),
    "Qwen2_5_VLForConditionalGeneration": ("projector", "llm"),
    "Qwen3VLForConditionalGeneration": ("projector", "llm"),
    "CLIPVisionModel": ("vit", "projector"),
    "SiglipVisionModel": ("vit", "projector"),
    "Dinov2Model": ("vit", "projector"),
}

# what no vision tower of a VLM gives a VIT / PROJECTOR method
LLM_ONLY = {Need.QUERY_ATTN: "the text query attention is an LLM-stage statistic",
            Need.QUERY_ATTN_NOROPE: "the text query attention is an LLM-stage statistic",
            Need.VISUAL_ATTN: "visual_attn is an LLM-stage statistic",
            Need.LOOKAHEAD: "lookahead is an LLM-stage mechanism"}


def _refuse(method: Method, model: nn.Module, e: Exception):
    msg = str(e).split(": ", 1)[1] if str(e).startswith("tokenreduce.") else str(e)
    fail("patch", f"cannot run {method.name} on {type(model).__name__}: {msg}", type(e))


def _check_vlm(model: nn.Module, cls, method: Optional[Method]) -> None:
    if method is None or method.stage == Stage.LLM:
        return
    if cls.kind in ("llava", "llava-next"):
        check_needs(method, unavailable_needs(vision_parts(model.model.vision_tower), True))
    else:
        check_needs(method, LLM_ONLY)


def _fused_part(model: nn.Module, cls, method: Method) -> nn.Module:
    """The sub-model whose attention records the method's statistics: the LLM for an
    LLM-stage method, else the vision tower (the other part keeps its attention)."""
    if method.stage == Stage.LLM:
        return cls.parts(model).lm
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def patch(model: nn.Module, method: Any = None, keep: Optional[int] = None, ratio: Optional[float] = None, *,
          nominal_layers: Optional[int] = None, vision_nominal_layers: Optional[int] = None,
          image_tokens: Optional[int] = None, **options: Any) -> PatchHandle:
    """Install ``method`` on ``model`` (in place) and return its `PatchHandle`.

    ``method``: a registered name (built with ``keep=K`` tokens per image or ``ratio=r`` of
    each image's tokens, and ``**options``), a built `Method`, or None / ``"none"`` (no
    reduction, the same path: equals the unpatched model). ``nominal_layers`` /
    ``vision_nominal_layers``: the LLM / vision depth the method's layer numbers refer to
    (see `tokenreduce.models.stages.LayerPlan`); ``image_tokens``: a VLM's image-token count
    per sample when the caller knows it (host metadata: never read back from the device). Raises RuntimeError when ``model`` is
    already patched, TypeError for a model class not served (`SUPPORTED`), and a clear
    error naming method and model when the method needs what the model cannot give."""
    prev = getattr(model, ATTR, None)
    if prev is not None and prev.active:
        name = prev.method.name if prev.method is not None else "none"
        fail("patch", f"{type(model).__name__} is already patched (method {name}); call "
                      "tokenreduce.unpatch(model) first", RuntimeError)
    meth = resolve_method(method, keep, ratio, options)
    cls = adapter_class(model)
    if cls is None:
        try:
            parts = vision_parts(model)
        except TypeError:
            fail("patch", f"unsupported model {type(model).__name__}; supported: {', '.join(SUPPORTED)}", TypeError)
        return _patch_encoder(model, meth, parts, vision_nominal_layers)
    handle = PatchHandle(model, meth, cls.kind)
    try:
        _check_vlm(model, cls, meth)
        runner = PatchedVLM(model, meth, handle, nominal_layers, vision_nominal_layers, image_tokens)
    except (ValueError, NotImplementedError) as e:
        if meth is None:
            raise
        _refuse(meth, model, e)
    if needs_fused_attention(meth):
        handle.switch_attention([_fused_part(model, cls, meth)])
    # generate would encode the images itself (``mm_encoder_outputs``) before the forward:
    # hidden, it passes the pixels, which the reduction needs
    handle.install(runner, runner.hooks(), hide=("mm_encoder_outputs",), methods=runner.overrides())
    return handle


def _patch_encoder(model: nn.Module, meth: Optional[Method], parts, vision_nominal_layers) -> PatchHandle:
    handle = PatchHandle(model, meth, parts.family)
    if meth is not None:
        if meth.stage not in (Stage.VIT, Stage.PROJECTOR):
            fail("patch", f"cannot run {meth.name} on {type(model).__name__}: it is a {meth.stage.value}-stage "
                          "method; a vision encoder runs vit / projector methods", ValueError)
        try:
            check_needs(meth, unavailable_needs(parts, False))
        except ValueError as e:
            _refuse(meth, model, e)
    runner = PatchedEncoder(model, meth, handle, vision_nominal_layers)
    if meth is not None and meth.needs & RECORDED:
        handle.switch_attention()
    handle.install(runner, runner.hooks())
    return handle


def unpatch(model: nn.Module) -> Optional[PatchHandle]:
    """Restore ``model`` (its own forward and attention implementation; hooks removed) and
    return the handle; a model that is not patched is left alone (returns None)."""
    handle = getattr(model, ATTR, None)
    if handle is None:
        return None
    handle.unpatch()
    return handle


@contextlib.contextmanager
def patched(model: nn.Module, method: Any = None, keep: Optional[int] = None, ratio: Optional[float] = None,
            **kwargs: Any) -> Iterator[PatchHandle]:
    """``with patched(model, "divprune", keep=64) as h: model.generate(...)``: `patch`, then
    `unpatch` on leaving the block (also on an error)."""
    handle = patch(model, method, keep, ratio, **kwargs)
    try:
        yield handle
    finally:
        unpatch(model)
