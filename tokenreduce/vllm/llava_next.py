"""LLaVA-NeXT (anyres) in vLLM with a tokenreduce method (registered over vLLM's own
``LlavaNextForConditionalGeneration`` by `tokenreduce.vllm.register`).

Without a ``tokenreduce`` entry in the model's config the class is vLLM's, unchanged. With one,
each image is reduced as `tokenreduce.patch` reduces it on transformers' LLaVA-NeXT
(`tokenreduce.models.adapters.llava_next.LlavaNextAdapter`), by one of two paths:

* **per tile** (a VIT method, or a PROJECTOR method that needs the tower: [CLS] attention,
  attention received, keys, values, the patch grid, pixels): the method runs on every anyres
  tile (the base image, then the crops; each a full patch grid with [CLS]) with its budget
  per tile, LLaVA's feature select and projector follow, and the tiles' kept tokens are
  concatenated in tile order: no spatial unpadding and no ``image_newline`` tokens (they do not
  apply to a reduced set, as in VisionZip's LLaVA-NeXT code). K = tiles x k_tile, the tile
  count from the image size and ``image_grid_pinpoints``, k_tile from the tower's shape-only run
  (`tokenreduce.vllm.llava.kept_tokens_of`);
* **packed** (a PROJECTOR method on features only: divprune, random, ...): vLLM's own feature
  path (tower, projector, unpadding, ``image_newline`` tokens: N tokens per image), then the
  method on the image's N packed tokens: K = ``method.keep_tokens(N)``.

`ReducedLlavaNextProcessingInfo.get_num_image_tokens` reports K (vLLM's prompt replacement,
``get_max_image_tokens``, the encoder budget and the dummy inputs read it); which tokens are
kept depends on the image. A prompt whose images the transformers path refuses to reduce
together (different tile counts for a per-tile method, different packed counts for a packed
one) is refused with the same reason (`check_prompt_images`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

from ..errors import fail
from ..methods.base import Context, Method, Need, Stage
from ..models.adapters.llava import TOWER_STATISTICS
from ..models.stages import check_reduction
from .llava import kept_tokens_of, method_of, use_full_clip_tower
from .tower import reduced_features

__all__ = ["ReducedLlavaNextForConditionalGeneration", "ReducedLlavaNextProcessingInfo",
           "ReducedLlavaNextMultiModalProcessor", "per_tile", "num_tiles", "kept_tokens_of_image",
           "check_prompt_images"]

WHERE = "vllm"


def per_tile(method: Method) -> bool:
    """The method runs on every anyres tile (the transformers adapter's `prepare_tiles` test)."""
    return method.stage == Stage.VIT or bool(method.needs & (TOWER_STATISTICS | {Need.GRID, Need.PIXELS}))


def num_tiles(hf_config, height: int, width: int) -> int:
    """Anyres tiles of an image (the base image + crops), as transformers counts them."""
    return image_size_to_num_patches(image_size=(height, width), grid_pinpoints=hf_config.image_grid_pinpoints,
                                     patch_size=hf_config.vision_config.image_size)


def kept_tokens_of_image(hf_config, height: int, width: int, n: Optional[int]) -> Optional[int]:
    """Placeholders of one ``height x width`` image with the config's method (None: no method);
    ``n`` is its unreduced (packed) count (read by packed methods only)."""
    method = method_of(hf_config)
    if method is None:
        return None
    if per_tile(method):
        return num_tiles(hf_config, height, width) * kept_tokens_of(hf_config)
    return method.keep_tokens(n)


def check_prompt_images(hf_config, sizes: Sequence[tuple], counts: Sequence[int]) -> None:
    """Refuse what `tokenreduce.patch` refuses for the images of one prompt (``sizes`` (h, w),
    ``counts`` their unreduced token counts): different tile counts for a per-tile method,
    different packed counts for a packed PROJECTOR method."""
    method = method_of(hf_config)
    if method is None or len(sizes) < 2:
        return
    if per_tile(method):
        tiles = [num_tiles(hf_config, h, w) for h, w in sizes]
        if len(set(tiles)) != 1:
            fail(WHERE, f"images with different tile counts {tiles}: batch equal tile counts for a per-tile "
                        f"method ({method.name}, as tokenreduce.patch on transformers' LLaVA-NeXT)")
    elif len(set(counts)) != 1:
        fail(WHERE, "images with different tile counts: the PROJECTOR budget is applied per image, got feature "
                    f"counts {sorted(set(counts))}; they must be equal per batch here (batch equal tile counts; "
                    f"{method.name}, as tokenreduce.patch on transformers' LLaVA-NeXT)")


class ReducedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """K placeholders per image instead of N (see the module docstring)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        k = kept_tokens_of_image(self.get_hf_config(), image_height, image_width, n)
        return n if k is None else k

    def unreduced_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return super().get_num_image_tokens(image_width=image_width, image_height=image_height)


class ReducedLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    """vLLM's processor, refusing a prompt's images that transformers refuses to reduce together."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems)) if "image" in mm_items \
            else None
        if isinstance(images, ImageProcessorItems) and len(images) > 1:
            sizes = [images.get_image_size(i) for i in range(len(images))]
            counts = [self.info.unreduced_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]
            check_prompt_images(self.info.get_hf_config(), [(s.height, s.width) for s in sizes], counts)
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(ReducedLlavaNextMultiModalProcessor, info=ReducedLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ReducedLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with the config's tokenreduce method (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = method_of(self.config)
        if self.tokenreduce_method is None:
            return
        # per tile: the tower with all of its layers (a method's layer numbers as in transformers);
        # packed: vLLM's own tower (stopped at vision_feature_layer) and feature path
        use_full_clip_tower(self, vllm_config, prefix, full=per_tile(self.tokenreduce_method))

    def _process_image_input(self, image_input):
        method = self.tokenreduce_method
        if method is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        sizes = self._image_sizes(image_input)
        if per_tile(method):
            out = self._reduce_tiles(image_input["pixel_values"], sizes)
            counts = [None] * len(out)                                 # K does not depend on N here
        else:
            packed = super()._process_image_input(image_input)       # [N, D_llm] per image
            counts = [f.shape[0] for f in packed]
            out = [self._reduce_packed(f) for f in packed]
        for (h, w), n, feats in zip(sizes, counts, out):
            want = kept_tokens_of_image(self.config, h, w, n)
            if feats.shape[0] != want:
                raise RuntimeError(f"tokenreduce.vllm: {method.name} kept {feats.shape[0]} tokens of a {h}x{w} image "
                                   f"but the prompt holds {want} placeholders")
        return out

    def _image_sizes(self, image_input) -> List[tuple]:
        sizes = image_input.get("image_sizes")
        if sizes is None:
            tile = self.config.vision_config.image_size
            return [(tile, tile)] * len(image_input["pixel_values"])
        return [tuple(int(v) for v in s) for s in sizes.tolist()]

    def _reduce_tiles(self, pixel_values, sizes: List[tuple]) -> List[Tensor]:
        """Per tile: each image's first ``tiles`` tiles (vLLM may pad an image's tiles) through the
        tower with the method, the feature select and the projector -> ``[tiles * k_tile, D_llm]``."""
        tiles = [num_tiles(self.config, h, w) for h, w in sizes]
        stacked = torch.cat([px[:t] for px, t in zip(pixel_values, tiles)])
        feats = reduced_features(self.vision_tower.vision_model, stacked, self.tokenreduce_method,
                                 self.config.vision_feature_layer, self.config.vision_feature_select_strategy)
        projected = self.multi_modal_projector(feats)                       # [sum tiles, k_tile, D]
        return [p.reshape(-1, p.shape[-1]) for p in torch.split(projected, tiles)]

    def _reduce_packed(self, feats: Tensor) -> Tensor:
        """Packed: the method on one image's packed features ``[N, D_llm]`` -> ``[K, D_llm]``."""
        method = self.tokenreduce_method
        x = feats[None]
        red = method(Context(x=x, has_cls=False, grid=None))
        check_reduction(method, x, red, "on the projected image features")
        if red.size is not None and bool((red.size <= 0).any()):
            fail(WHERE, f"{method.name} returned padding slots (size 0), which vLLM cannot mask in the prompt; "
                        "give a budget it fills")
        return red.tokens[0]
