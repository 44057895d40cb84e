"""Token reduction in vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL.

Two places (the method's ``stage`` picks one):

* **PROJECTOR** (between encoder and LLM): the image features are reduced before they are
  inserted, and the inputs are rebuilt consistently: each sample's run of image tokens in
  ``input_ids`` is cut to the kept count, ``attention_mask`` follows, and for Qwen2-VL the
  3D (t, h, w) M-RoPE position ids of the kept tokens are their *original* grid positions
  (computed by the model's ``get_rope_index`` on the full input, then gathered), with the
  ``rope_deltas`` of later decoding steps recomputed for the shorter sequence.
* **LLM** (inside the language model, after decoder layer K): `LLMReducer`
  (`tokenreduce.models.llm`) hooks the decoder layers; the sequence shrinks after layer K,
  later layers see the kept tokens' original positions, and ``generate`` works after it.

`VLMRunner` picks the architecture's adapter (`tokenreduce.models.adapters`: how its inputs
are built and where its parts are) and runs the LLM; its ``generate`` is transformers' own
``generate`` on the model patched by `tokenreduce.models.patching.patch` (the one decoding path
of the package: the profiler runs it); `greedy_generate` is a plain decoding loop for reduced
M-RoPE positions, kept as the reference the patched path is tested against.

Batches: every sample keeps the same number of image tokens (a static budget), so the batch
stays rectangular. Inputs are left-padded (as ``generate`` wants); padding keys are masked by
a ``-inf`` key bias and padded query rows produce zeros. The LLM stage needs the same number
of image tokens in every sample of the batch (true for LLaVA-1.5; for Qwen2-VL with different
grids or LLaVA-NeXT with different tile counts, reduce at the PROJECTOR stage to a common
budget first, or batch equal sizes). Counting image tokens per sample while assembling the
inputs reads a small count from the device (outside the timed reduction); the reductions
themselves are batched gathers with no host sync.

Statistics and layers: the LLM stage provides query_attn / attn_received / values / keys
(recorded by the fused attention), visual_attn and query_attn_norope (the layer's own q/k,
`tokenreduce.models.llm_scores`), and Need.LOOKAHEAD (the next layer's statistics on the
current states). Layer numbers that do not fit a short model (``--layers``) are mapped from a
nominal depth (32 LLM / 24 vision layers; `tokenreduce.models.stages.LayerPlan`): e.g.
PyramidDrop's 8/16/24 run after layers 0/1/2 of a 4-layer LLM, and stages landing on the same
layer run one after the other there. PROJECTOR padding slots (size 0) become masked positions
(attention_mask 0). LLaVA-NeXT: a VIT / PROJECTOR method needing vision-tower statistics, the
grid or pixels runs per anyres tile (budget per tile, tiles concatenated); features-only
methods run on the packed features. Qwen2-VL / Qwen2.5-VL: the vision tower's statistics come
from `tokenreduce.models.qwen_vision` (no [CLS]: the mean attention received stands in for it;
see `tokenreduce.models.adapters.qwen2_vl`).

An LLM-stage method must return distinct token positions (``Reduction.index >= 0``): kept
tokens keep their own positions; a merged token takes its representative's position.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from ..methods.base import Method, Need, Stage
from . import attention
from .adapters import Prepared, adapter_class
from .llm import LLMReducer
from .patching import patched
from .positions import cut_image_tokens, split_positions

__all__ = ["LLMReducer", "VLMRunner", "Prepared", "greedy_generate", "split_positions", "cut_image_tokens"]


@torch.no_grad()
def greedy_generate(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int,
                    position_ids: Optional[Tensor] = None, next_position: Optional[Tensor] = None) -> Tensor:
    """A plain greedy loop with a KV cache (used where ``generate``'s own position logic
    cannot be told about reduced M-RoPE positions): ``[B, max_new_tokens]`` token ids.
    ``position_ids`` are the prefill positions (``[3, B, L]`` for M-RoPE), ``next_position``
    ``[B]`` the position of the first generated token."""
    from transformers import DynamicCache
    B = inputs_embeds.shape[0]
    cache = DynamicCache(config=model.config.get_text_config())
    out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks = [out.logits[:, -1].argmax(-1)]
    embed = model.get_input_embeddings()
    mask = attention_mask
    nxt = next_position
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pid = None
        if nxt is not None:
            pid = nxt.view(1, B, 1).expand(3, B, 1) if position_ids is not None and position_ids.dim() == 3 \
                else nxt.view(B, 1)
            nxt = nxt + 1
        out = model(inputs_embeds=embed(toks[-1][:, None]), attention_mask=mask, position_ids=pid,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, dim=1)


class VLMRunner:
    """Full / reduced forward and generation for LLaVA-1.5 (`LlavaForConditionalGeneration`),
    LLaVA-NeXT (`LlavaNextForConditionalGeneration`), Qwen2-VL / Qwen2.5-VL and Qwen3-VL; the inputs
    are built by the architecture's adapter (`tokenreduce.models.adapters`).

        r = VLMRunner(model, method)                # method None: the full model
        logits = r.next_token_logits(**batch)       # [B, V]
        ids = r.generate(max_new_tokens=8, **batch)
    """

    def __init__(self, model: nn.Module, method: Optional[Method] = None, nominal_layers: Optional[int] = None,
                 vision_nominal_layers: Optional[int] = None, image_tokens: Optional[int] = None):
        """``nominal_layers`` / ``vision_nominal_layers``: the LLM / vision-tower depth the
        method's layer numbers refer to (default: the model's when they fit, else 32 / 24;
        see `tokenreduce.models.stages.LayerPlan`). ``image_tokens``: the image-token count per
        sample when the caller knows it from the processor (host metadata): the input assembly
        then never reads it back from the device (no host sync inside a timed call)."""
        self.model, self.method = model, method
        self.nominal, self.vision_nominal = nominal_layers, vision_nominal_layers
        cls = adapter_class(model)
        if cls is None:
            raise TypeError(f"tokenreduce.models.vlm: unsupported model {type(model).__name__}")
        self.adapter = cls(model, method, vision_nominal_layers)
        self.adapter.image_tokens = image_tokens
        self.kind = cls.kind
        self.cfg = model.config
        self.image_token = self.cfg.image_token_id
        self.lm = cls.parts(model).lm
        if method is not None and (method.stage == Stage.LLM or method.needs & {
                Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.QUERY_ATTN, Need.KEYS}):
            attention.register()
            model.set_attn_implementation(attention.NAME)
        self.llm_reducer = (LLMReducer(self.lm, method, nominal_layers=nominal_layers)
                            if method is not None and method.stage == Stage.LLM else None)
        self.adapter.check_method()
        self.adapter.check_reducer(self.llm_reducer)

    @torch.no_grad()
    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **extra) -> Prepared:
        """The LLM's inputs (image features inserted, any VIT / PROJECTOR reduction applied)."""
        return self.adapter.prepare(input_ids, attention_mask, pixel_values, **extra)

    # -- running ------------------------------------------------------------------------
    def llm_context(self, p: Prepared):
        """The context to run the LLM on ``p`` in: the LLM-stage hooks of the method, and the
        adapter's (Qwen3-VL: the DeepStack features of the kept tokens, on the prefill call)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.adapter.llm_context(p))
        if self.llm_reducer is None:
            return stack
        if p.n_img < 0:
            stack.close()
            raise ValueError("tokenreduce.models.vlm: the LLM stage needs the same image-token count per sample")
        stack.enter_context(self.llm_reducer.active(p.is_img, p.n_img, p.grid))
        return stack


    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask, pixel_values, **extra) -> Tensor:
        p = self.prepare(input_ids, attention_mask, pixel_values, **extra)
        self.last = p
        with self.llm_context(p):
            out = self.model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask,
                             position_ids=p.position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int = 8, **extra) -> Tensor:
        """Greedy generation, ``[B, max_new_tokens]``: transformers' ``generate`` on the model
        patched with the method (`tokenreduce.models.patching.patch`) for this call; ``last``
        and ``llm_reducer`` are then the patched call's."""
        with patched(self.model, self.method, nominal_layers=self.nominal,
                     vision_nominal_layers=self.vision_nominal, image_tokens=self.adapter.image_tokens) as h:
            ids = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                      **extra, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=0)
        self.last = h.last
        if h.reducer is not None:
            self.llm_reducer = h.reducer
        return ids[:, -max_new_tokens:]
