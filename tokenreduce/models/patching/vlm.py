"""The patched forward of a VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Qwen3-VL): HF's own
``generate`` (or a plain ``model(**batch)``) runs a reduction unchanged.

A call that brings pixels is a **prefill**: the architecture's adapter
(`tokenreduce.models.adapters`) builds the LLM's inputs, with any VIT / PROJECTOR reduction
(fewer image placeholders: ``input_ids`` cut, ``attention_mask`` cut, padding slots masked,
Qwen2-VL's M-RoPE positions of the kept tokens gathered from the unreduced ones), and the
model's own forward runs on ``inputs_embeds`` of the shortened sequence (inside the adapter's
`llm_context`: Qwen3-VL's kept DeepStack features). An LLM-stage method
runs inside that forward (`tokenreduce.models.llm.LLMReducer`, hooks on the decoder layers).

``generate`` keeps counting in the prompt's own coordinates (its ``attention_mask`` grows from
the unreduced prompt length ``L0``; its ``position_ids`` continue from the unreduced
positions); each **decoding step** is translated to the shortened cache of length ``L'``:

* ``attention_mask`` ``[B, L0 + t]`` -> the prefill's reduced mask ``[B, L']`` + its new columns;
* ``position_ids``: LLaVA: what ``generate`` computes for the reduced prompt (the cumulative
  sum of its mask, continued); Qwen2-VL: the reduced prompt's next M-RoPE position + t, on
  the three (t, h, w) rows (as `tokenreduce.models.vlm.greedy_generate` does);
* ``cache_position`` (transformers releases that pass it): shifted by ``L0 - L'``.

Beam search (the cache reorders) and sampling need nothing more: every beam of a sample has
the same reduced prompt. ``use_cache=False`` makes every step a prefill (reduced again).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ...errors import fail
from ...methods.base import Method, Stage
from .. import attention
from ..adapters import adapter_class
from ..llm import LLMReducer
from .handle import CallStats, PatchHandle, image_counts, kept_counts

__all__ = ["PatchedVLM", "generate_positions"]

EXTRA_INPUTS = ("image_sizes", "image_grid_thw", "mm_token_type_ids")


def generate_positions(attention_mask: Tensor) -> Tensor:
    """``position_ids`` ``[B, L]`` that ``generate`` gives a prompt with ``attention_mask``
    (cumulative sum of the mask minus one; 0 on padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@dataclass
class PrefillState:
    """What the decoding steps of one request need from its prefill."""
    L0: int                          # prompt length as generate sees it
    Lp: int                          # prompt length in the cache (after a PROJECTOR / VIT reduction)
    mask: Optional[Tensor]           # [B, L'] reduced prompt mask (None: no padding, none was given)
    next_position: Tensor            # [B] position of the first generated token (reduced prompt)
    mrope: bool                      # Qwen2-VL: 3D positions


def bind_call(signature: inspect.Signature, args, kwargs) -> Dict[str, Any]:
    """A forward call's arguments as one keyword dict (``**kwargs`` flattened)."""
    if not args:
        return dict(kwargs)
    bound = signature.bind_partial(*args, **kwargs).arguments
    out: Dict[str, Any] = {}
    for name, v in bound.items():
        p = signature.parameters[name]
        if p.kind == p.VAR_KEYWORD:
            out.update(v)
        else:
            out[name] = v
    return out


class PatchedVLM:
    """The forward installed on a VLM by `tokenreduce.patch` (see the module docstring)."""

    def __init__(self, model: nn.Module, method: Optional[Method], handle: PatchHandle,
                 nominal_layers: Optional[int] = None, vision_nominal_layers: Optional[int] = None,
                 image_tokens: Optional[int] = None):
        cls = adapter_class(model)
        self.model, self.method, self.handle = model, method, handle
        self.adapter = cls(model, method, vision_nominal_layers)
        self.adapter.image_tokens = image_tokens
        self.adapter.check_method()
        self.image_token = model.config.image_token_id
        lm = cls.parts(model).lm
        self.reducer = (LLMReducer(lm, method, nominal_layers=nominal_layers)
                        if method is not None and method.stage == Stage.LLM else None)
        self.adapter.check_reducer(self.reducer)
        handle.adapter, handle.reducer = self.adapter, self.reducer
        self.state: Optional[PrefillState] = None
        self.signature: Optional[inspect.Signature] = None

    def hooks(self):
        return self.reducer.install() if self.reducer is not None else []

    def overrides(self) -> Dict[str, Any]:
        """Qwen2-VL / Qwen3-VL: ``generate``'s input expansion (beams, ``num_return_sequences``) repeats
        each image's packed patches as a whole (the generic one repeats every patch row)."""
        if self.adapter.kind not in ("qwen2-vl", "qwen3-vl"):
            return {}
        original = self.model._expand_inputs_for_generation

        def expand(expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
            px = model_kwargs.pop("pixel_values", None)
            thw = model_kwargs.get("image_grid_thw")
            input_ids, model_kwargs = original(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                               input_ids=input_ids, **model_kwargs)
            if px is not None and expand_size > 1 and thw is not None:
                chunks = torch.split(px, thw.prod(-1).tolist())        # host metadata from the processor
                px = torch.cat([c for c in chunks for _ in range(expand_size)])
            if px is not None:
                model_kwargs["pixel_values"] = px
            return input_ids, model_kwargs
        return {"_expand_inputs_for_generation": expand}

    # -- the forward ---------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        forward = self.handle.original_forward
        if self.signature is None:
            self.signature = inspect.signature(forward)
        kw = bind_call(self.signature, args, kwargs)
        cache_key = "cache" if "cache" in kw or "past_key_values" not in kw else "past_key_values"
        cache = kw.get(cache_key)
        cache_len = cache.get_seq_length() if cache is not None else 0
        if kw.get("pixel_values") is not None:
            if cache_len:
                fail("patch", "new images on a non-empty cache (continuing a request with more images) are "
                              "not supported by a patched model; start a new request")
            return self._prefill(forward, kw)
        if self.state is not None and cache_len > 0:
            return self._decode(forward, kw, cache_len)
        self.state = None
        with self._recording():
            return forward(**kw)

    def _recording(self):
        return attention.recording(self.reducer.rec) if self.reducer is not None else contextlib.nullcontext()

    def _prefill(self, forward, kw: Dict[str, Any]):
        ids = kw.pop("input_ids", None)
        if ids is None or kw.get("inputs_embeds") is not None:
            fail("patch", "a patched VLM takes input_ids with pixel_values (not inputs_embeds): the image "
                          "placeholders are where the reduced features go")
        px = kw.pop("pixel_values")
        caller_mask = kw.pop("attention_mask", None)
        am = caller_mask if caller_mask is not None else torch.ones_like(ids)
        extra = {k: kw.pop(k) for k in EXTRA_INPUTS if k in kw}
        extra = {k: v for k, v in extra.items() if v is not None}
        given_pos = kw.pop("position_ids", None)
        had_cache_position = kw.pop("cache_position", None) is not None
        st = CallStats(self.method.stage.value if self.method is not None else None,
                       self.method.name if self.method is not None else None, ids.shape[0],
                       _in=image_counts(ids, self.image_token))
        before = dict(self.reducer.rec.fallbacks) if self.reducer is not None else {}
        with torch.no_grad():
            p = self.adapter.prepare(ids, am, px, **extra)
        self.handle.last = p
        Lp = p.inputs_embeds.shape[1]
        if p.position_ids is not None:                       # Qwen2-VL: M-RoPE positions of the kept tokens
            pos, nxt, mrope = p.position_ids, p.next_position, True
        else:
            text_pos = generate_positions(p.attention_mask)
            pos = text_pos if given_pos is not None else None
            nxt, mrope = text_pos[:, -1] + 1, False
        mask = p.attention_mask
        if caller_mask is None and bool(mask.all()):        # as generate drops an all-ones mask (one read)
            mask = None
        self.state = PrefillState(ids.shape[1], Lp, mask, nxt, mrope)
        if had_cache_position:
            kw["cache_position"] = torch.arange(Lp, device=ids.device)
        if self.reducer is not None:
            if p.n_img < 0:
                fail("models.vlm", "the LLM stage needs the same image-token count per sample")
            self.reducer.begin(p.is_img, p.n_img, p.grid)
        with self._recording(), self.adapter.llm_context(p):
            out = forward(inputs_embeds=p.inputs_embeds, attention_mask=mask, position_ids=pos, **kw)
        st.steps = [dict(s) for s in p.steps]
        if self.reducer is not None:
            st.steps += [dict(s) for s in self.reducer.steps]
            st._out = self.reducer.steps[-1]["tokens_out"] if self.reducer.steps else p.n_img
            after = self.reducer.rec.fallbacks
            st.fallbacks = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        else:
            st._out = kept_counts(p.is_img, p.attention_mask)
        vis = getattr(p, "vision", None)
        if vis is not None and getattr(vis, "recorder", None) is not None:
            for k, v in vis.recorder.fallbacks.items():
                st.fallbacks[f"vision {k}"] = st.fallbacks.get(f"vision {k}", 0) + v
        self.handle.record(st)
        return out

    def _decode(self, forward, kw: Dict[str, Any], cache_len: int):
        s = self.state
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        B, q = ref.shape[0], ref.shape[1]
        t = cache_len - s.Lp                                 # tokens generated so far (in the cache)
        am = kw.get("attention_mask")
        if am is not None and am.dim() == 2:
            new = am[:, s.L0:]
            if new.shape[1] != t + q:
                fail("patch", f"decoding mask of {am.shape[1]} columns for a prompt of {s.L0} tokens and "
                              f"{t + q} new ones: pass generate's own attention_mask")
            prompt = s.mask if s.mask is not None else am.new_ones(B, s.Lp)
            kw["attention_mask"] = torch.cat([prompt, new.to(prompt.dtype)], dim=1)
        elif am is None and s.mask is not None:
            kw["attention_mask"] = torch.cat([s.mask, s.mask.new_ones(B, t + q)], dim=1)
        step = torch.arange(q, device=s.next_position.device)
        nxt = (s.next_position + t)[:, None] + step[None, :]     # [B, q]
        if s.mrope:
            kw["position_ids"] = nxt[None].expand(3, B, q)
        elif kw.get("position_ids") is not None:
            kw["position_ids"] = nxt
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] - (s.L0 - s.Lp)
        for k in ("pixel_values",) + EXTRA_INPUTS[:2]:
            kw.pop(k, None)
        with self._recording():
            return forward(**kw)
