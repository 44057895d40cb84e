"""What every VLM adapter shares: `ModelParts`, `Prepared`, and `VLMAdapter`, whose
`insert_image_features` is the one place where the (reduced) image features enter the LLM's
input embeddings.

An adapter knows one architecture: where its parts are (`VLMAdapter.parts`), which methods
it cannot serve (`check_method`), and how its LLM inputs are built from ``input_ids`` and
pixels (`prepare`, with any VIT / PROJECTOR reduction). `tokenreduce.models.vlm.VLMRunner`
picks the adapter for the model class and runs the LLM (with `LLMReducer` for Stage.LLM).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ...methods.base import Context, Method, Need, Reduction, Stage
from ..positions import cut_image_tokens, split_positions
from ..stages import check_reduction

__all__ = ["ModelParts", "Prepared", "VLMAdapter"]


@dataclass
class ModelParts:
    """Where a model's pieces are: what the profiler hooks and the runners drive."""
    kind: str                                  # "dinov2" | "clip" | ... | "llava-next" | "qwen2-vl" | "qwen3-vl"
    vision_layers: Sequence[nn.Module]         # the vision encoder's blocks, in order
    vision_config: Any
    patch: int                                 # vision patch size (pixels)
    has_cls: bool                              # the vision encoder's tokens start with [CLS]
    projector: Optional[nn.Module] = None      # LLaVA's multi_modal_projector, Qwen2-VL's visual.merger
    lm: Optional[nn.Module] = None             # the decoder stack (``lm.layers``)
    lm_head: Optional[nn.Module] = None
    text_config: Any = None

    @property
    def lm_layers(self) -> Sequence[nn.Module]:
        return self.lm.layers if self.lm is not None else ()


@dataclass
class Prepared:
    """Inputs of the LLM after the vision part (and any PROJECTOR reduction)."""
    inputs_embeds: Tensor
    attention_mask: Tensor
    is_img: Tensor                      # bool [B, L]
    n_img: int                          # image tokens per sample
    position_ids: Optional[Tensor] = None      # [3, B, L] for M-RoPE
    next_position: Optional[Tensor] = None     # [B] M-RoPE text position of the next token
    grid: Optional[Tuple[int, int]] = None
    steps: List[Dict[str, Any]] = field(default_factory=list)
    vision: Any = None


class VLMAdapter:
    """One VLM architecture (subclasses: `LlavaAdapter`, `LlavaNextAdapter`, `Qwen2VLAdapter`,
    `Qwen3VLAdapter`)."""
    kind = ""
    class_prefixes: Tuple[str, ...] = ()       # model class names this adapter serves

    def __init__(self, model: nn.Module, method: Optional[Method] = None,
                 vision_nominal_layers: Optional[int] = None):
        self.model, self.method, self.vision_nominal = model, method, vision_nominal_layers
        self.image_tokens: Optional[int] = None   # known image-token count per sample (host metadata)
        self.cfg = model.config
        self.image_token = self.cfg.image_token_id

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__.startswith(cls.class_prefixes)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        raise NotImplementedError

    def check_method(self) -> None:
        """Raise a clear error when ``self.method`` cannot run on this architecture."""

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **extra) -> Prepared:
        raise NotImplementedError

    def check_reducer(self, reducer) -> None:
        """Raise a clear error when the LLM-stage ``reducer`` (an `LLMReducer` or None) cannot
        run on this architecture (Qwen3-VL: its layers); nothing here."""

    def llm_context(self, p: Prepared):
        """A context to run the LLM on ``p`` in (Qwen3-VL: its DeepStack features); none here."""
        return contextlib.nullcontext()

    # -- shared by the adapters --------------------------------------------------------
    def stage_method(self, *stages: Stage) -> Optional[Method]:
        """The method when it runs at one of ``stages``, else None."""
        return self.method if self.method is not None and self.method.stage in stages else None

    def count_image_tokens(self, is_img: Tensor) -> int:
        """Image tokens per sample of ``is_img`` ``[B, L]`` (one count for the whole batch): the
        caller's ``image_tokens`` when given (no device read-back), else read from ``is_img``."""
        if self.image_tokens is not None:
            return self.image_tokens
        counts = is_img.sum(1)
        n = int(counts[0])                     # input assembly, outside the timed reduction
        if not bool((counts == n).all()):
            raise ValueError(f"tokenreduce.models.vlm: samples hold different image-token counts "
                             f"{counts.tolist()}; the batch must keep one count per sample")
        return n

    def text_embeddings(self, input_ids: Tensor, is_img: Tensor, n_img: int) -> Optional[Tensor]:
        """Need.TEXT at the PROJECTOR stage: the LLM input embeddings of the non-image tokens
        ``[B, T, D_llm]`` (left padding included, as in the input)."""
        if self.method is None or Need.TEXT not in self.method.needs:
            return None
        _, txt = split_positions(is_img, n_img)
        return self.model.get_input_embeddings()(input_ids.gather(1, txt))

    def reduce_projected(self, feats: Tensor, where: str, grid: Optional[Tuple[int, int]] = None,
                         text: Optional[Tensor] = None) -> Reduction:
        """The PROJECTOR method on image features ``[B, N, D]`` that have no [CLS]."""
        red = self.method(Context(x=feats, has_cls=False, grid=grid, text=text))
        check_reduction(self.method, feats, red, where)
        return red

    def insert_image_features(self, input_ids: Tensor, attention_mask: Tensor, is_img: Tensor, n_img: int,
                              feats: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Put ``feats`` ``[B, K, D_llm]`` (``K <= n_img``) at the image tokens of ``input_ids``
        ``[B, L]`` (``n_img`` per row): with ``K < n_img`` each row's image-token run is cut to
        its first ``K`` (``attention_mask`` follows); the embedded image tokens are replaced by
        ``feats``; padding slots of a reduction (``size`` ``[B, K]`` 0) become masked positions.
        Returns ``(inputs_embeds [B, L', D_llm], attention_mask [B, L'], is_img [B, L'])``."""
        K = feats.shape[1]
        if K > n_img:
            raise ValueError(f"tokenreduce.models.vlm: {K} image features for {n_img} image tokens")
        if K < n_img:
            pos = cut_image_tokens(is_img, n_img, K)
            input_ids, attention_mask = input_ids.gather(1, pos), attention_mask.gather(1, pos)
            is_img = input_ids == self.image_token
        emb = self.model.get_input_embeddings()(input_ids)
        img_pos, _ = split_positions(is_img, K)
        emb = emb.scatter(1, img_pos.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), feats.to(emb.dtype))
        if size is not None:
            pad = (size <= 0).to(attention_mask.dtype)
            attention_mask = attention_mask.scatter(1, img_pos, attention_mask.gather(1, img_pos) * (1 - pad))
        return emb, attention_mask, is_img
