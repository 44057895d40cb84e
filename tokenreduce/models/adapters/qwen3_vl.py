"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): the Qwen2-VL adapter plus DeepStack.

The vision tower is Qwen2-VL's layout (packed ``[sum N_i, D]`` patches of 16 px, attention
within each frame, ``cu_seqlens``, no [CLS], 2x2 patch merger), so `Qwen2VLAdapter` runs it
unchanged, with the tower statistics of `tokenreduce.models.qwen_vision` (the same fused
attention over the frames); M-RoPE positions of images (t = 1) follow the same rule
(``get_rope_index``: text after an image continues at ``s + max(h, w)``).

DeepStack: the tower also merges the hidden states of its ``deepstack_visual_indexes`` blocks
(one merger each) into ``[N_i, D_llm]`` features per image, which the LLM *adds* to the hidden
states of the image positions after its first ``len(deepstack_visual_indexes)`` decoder layers.
A PROJECTOR reduction cuts them with the reduction itself: output slot ``k`` gets the mean of
the deepstack features of the merged tokens the reduction's ``source`` map sends to ``k`` (a
kept token: its own; a merged / pooled token: the mean over the tokens it stands for; a slot
with no source: zeros), ordered as the kept tokens are (`Qwen2VLAdapter._cut`), so each kept
image position of the LLM receives exactly its own token's deepstack features.
``Prepared.vision.deepstack_embeds`` (per deepstack layer ``[sum kept, D_llm]``, in the order
of the image positions) reach the LLM through `llm_context` (a pre-hook on the language model
for the prefill call: ``visual_pos_masks`` = the kept image positions).

Stage.LLM methods run as on Qwen2-VL when they reduce after the DeepStack layers (model layer
``K >= len(deepstack_visual_indexes)``: DeepStack has added everything by then); earlier
reductions are refused (`check_reducer`: the cut image positions would no longer fit
DeepStack's mask). Stage.VIT is refused (as on Qwen2-VL).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from .base import Prepared
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3VLAdapter", "slot_deepstack"]


def slot_deepstack(deep: Tensor, source: Tensor, slots: int) -> Tensor:
    """Deepstack features of one image ``[N, C]`` -> per output slot ``[slots, C]``: the mean
    over the merged tokens with ``source == k`` (``source`` ``[N]``, -1 dropped); zeros for a
    slot no token maps to."""
    live = source >= 0
    at = source.clamp_min(0)
    w = live.to(deep.dtype)
    total = deep.new_zeros(slots, deep.shape[-1]).index_add_(0, at, deep * w[:, None])
    count = deep.new_zeros(slots).index_add_(0, at, w)
    return total / count.clamp_min(1)[:, None]


class Qwen3VLAdapter(Qwen2VLAdapter):
    kind = "qwen3-vl"
    class_prefixes = ("Qwen3VLFor",)      # Qwen3-VL-MoE (`Qwen3VLMoe...`) is not served (untested)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = None      # the QwenVision of the prepare in progress (between _reduce and _cut)
        self._kept_deep: Optional[Tensor] = None     # the kept slots' deepstack features (from _cut)

    def check_reducer(self, reducer) -> None:
        """An LLM-stage reduction must come after the decoder layers DeepStack adds to (model
        layers ``0 .. n - 1`` for ``n`` deepstack features): the image positions are cut after
        layer ``K``, and DeepStack's mask would no longer fit them."""
        n = len(self.cfg.vision_config.deepstack_visual_indexes)
        early = sorted(k for k in (reducer.reduce_at if reducer is not None else {}) if k < n)
        if early:
            raise NotImplementedError(
                f"tokenreduce.models.vlm: {self.method.name} is an LLM-stage method reducing after model layer "
                f"{early[0]}; {type(self.model).__name__} adds DeepStack vision features to the image positions "
                f"after decoder layers 0..{n - 1}, so an LLM-stage reduction must come after layer {n - 1} "
                "(projector-stage methods run anywhere)")

    # -- the reduction carries the deepstack features along -----------------------------------
    def _reduce(self, feats, shapes, input_ids, is_img, info):
        """`Qwen2VLAdapter._reduce`, with each output slot's deepstack features (`slot_deepstack`)
        appended to its token's features, so `_cut` orders both alike."""
        tokens, index, size, keep = super()._reduce(feats, shapes, input_ids, is_img, info)
        self._pending = info
        if not info.deepstack:
            return tokens, index, size, keep
        K = tokens.shape[1]
        per_row = [torch.cat([slot_deepstack(layer[i], info.sources[i], K) for layer in info.deepstack], dim=-1)
                   for i in range(len(keep))]
        return torch.cat([tokens, torch.stack(per_row).to(tokens.dtype)], dim=-1), index, size, keep

    def _cut(self, *args, **kwargs):
        out = list(super()._cut(*args, **kwargs))
        info, D = self._pending, self.cfg.text_config.hidden_size
        if info is not None and info.deepstack:
            tokens = out[4]
            self._kept_deep = tokens[..., D:]              # [B, K, n_deep * D], kept order
            out[4] = tokens[..., :D]
        return tuple(out)

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                **kwargs) -> Prepared:
        """`Qwen2VLAdapter.prepare`, and ``Prepared.vision.deepstack_embeds``: per deepstack
        layer ``[image positions, D_llm]`` in the order of ``is_img``'s true entries."""
        self._pending, self._kept_deep = None, None
        p = super().prepare(input_ids, attention_mask, pixel_values, image_grid_thw, **kwargs)
        info, kept, self._pending, self._kept_deep = p.vision, self._kept_deep, None, None
        if not info.deepstack:
            return p
        D = self.cfg.text_config.hidden_size
        if kept is None or info.kept_positions is None:      # no reduction: every image's features, in order
            info.deepstack_embeds = [torch.cat(layer) for layer in info.deepstack]
        else:
            n_row = info.tokens_out if len(set(info.tokens_out)) > 1 else [kept.shape[1]] * kept.shape[0]
            flat = torch.cat([kept[b, :n] for b, n in enumerate(n_row)])        # host counts: no read-back
            info.deepstack_embeds = [flat[:, j * D:(j + 1) * D] for j in range(len(info.deepstack))]
        return p

    def llm_context(self, p: Prepared):
        """While active, the language model's prefill call (``inputs_embeds`` of ``p``'s
        length, empty cache) gets ``visual_pos_masks`` = ``p.is_img`` and the kept
        ``deepstack_visual_embeds``; other calls (decoding steps) are left alone."""
        embeds: Optional[List[Tensor]] = p.vision.deepstack_embeds
        if not embeds:
            return contextlib.nullcontext()
        lm = self.model.model.language_model
        shape = tuple(p.is_img.shape)

        def hook(module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if x is None or tuple(x.shape[:2]) != shape or (cache is not None and cache.get_seq_length() > 0):
                return None
            if kwargs.get("deepstack_visual_embeds") is not None:
                return None
            kwargs["visual_pos_masks"] = p.is_img
            kwargs["deepstack_visual_embeds"] = [e.to(x.dtype) for e in embeds]
            return args, kwargs

        @contextlib.contextmanager
        def active():
            handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()
        return active()
