"""What the plugin's LLaVA-NeXT must reproduce: transformers running the same model with the
same reduction, greedy.

* `patched_generate`: the user-facing path, ``tokenreduce.patch`` on transformers'
  `LlavaNextForConditionalGeneration` and HF's own ``generate`` on the processor's unreduced
  prompt (prompts with at most one image; the patch cuts the placeholders to K);
* `reference_generate`: the same computation piece by piece, per image (the adapter's tile
  run and projector, or the model's packed features and the method), the features placed at
  K placeholders per image of the prompt (vLLM's layout: every image of a prompt reduced on its
  own), then ``generate`` on ``inputs_embeds``; prompts with any number of images.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from tokenreduce.models.adapters.llava_next import LlavaNextAdapter
from tokenreduce.vllm.config import method_of_spec
from tokenreduce.vllm.llava_next import num_tiles, per_tile

from _vllm_reference import generate_with_features, load as load_model


def load(path: str):
    """(transformers LLaVA-NeXT float32, processor), cached per path."""
    return load_model(path, "LlavaNextForConditionalGeneration")


def image_features(model, proc, adapter: LlavaNextAdapter, image) -> torch.Tensor:
    """One image's LLM features ``[K, D_llm]`` (unreduced without a method: the packed N)."""
    cfg = model.config
    b = proc.image_processor([image], return_tensors="pt")
    px, size = b["pixel_values"], b["image_sizes"]
    method = adapter.method
    if method is not None and per_tile(method):
        t = num_tiles(cfg, *size[0].tolist())
        feats, _ = adapter.project(adapter.run_tower(px[0, :t], None))        # [t, k_tile, D]
        return feats.reshape(-1, feats.shape[-1])
    packed = model.model.get_image_features(pixel_values=px, image_sizes=size,
                                            vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    packed = packed.pooler_output[0]                                         # [N, D]
    if method is None:
        return packed
    return adapter.reduce_projected(packed[None], "on the projected image features").tokens[0]


@torch.no_grad()
def reference_generate(path: str, prompts: Sequence[Dict[str, Any]], spec: Optional[Dict[str, Any]],
                       max_new_tokens: int) -> List[List[int]]:
    """Greedy new token ids per prompt (``{"prompt": str with one "<image>" per image,
    "images": [PIL images]}``) with the ``tokenreduce`` entry ``spec`` (None: unreduced)."""
    model, proc = load(path)
    adapter = LlavaNextAdapter(model, method_of_spec(spec) if spec is not None else None)
    out = []
    for p in prompts:
        feats = [image_features(model, proc, adapter, im) for im in p.get("images") or []]
        out.append(generate_with_features(model, proc.tokenizer, p["prompt"], feats, max_new_tokens))
    return out


@torch.no_grad()
def patched_generate(path: str, prompts: Sequence[Dict[str, Any]], spec: Optional[Dict[str, Any]],
                     max_new_tokens: int) -> List[List[int]]:
    """`reference_generate` through ``tokenreduce.patch`` + HF ``generate`` on the processor's
    unreduced prompt (N placeholders per image). Prompts with at most one image."""
    import tokenreduce

    model, proc = load(path)
    out = []
    with tokenreduce.patched(model, method_of_spec(spec) if spec is not None else None):
        for p in prompts:
            images = p.get("images") or []
            if len(images) > 1:
                raise ValueError("patched_generate: one image per prompt")
            if images:
                b = proc(images=images, text=p["prompt"], return_tensors="pt")
            else:
                b = proc.tokenizer(p["prompt"], add_special_tokens=False, return_tensors="pt")
            gen = model.generate(**b, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=3)
            out.append(gen[0, b["input_ids"].shape[1]:].tolist())
    return out


@torch.no_grad()
def patched_batch_error(path: str, prompts: Sequence[Dict[str, Any]], spec: Dict[str, Any]) -> str:
    """The error ``tokenreduce.patch`` raises for one HF batch of one-image ``prompts`` ("" if none)."""
    import tokenreduce

    model, proc = load(path)
    b = proc(images=[p["images"][0] for p in prompts], text=[p["prompt"] for p in prompts], padding=True,
             return_tensors="pt")
    with tokenreduce.patched(model, method_of_spec(spec)):
        try:
            model.generate(**b, max_new_tokens=1, do_sample=False, pad_token_id=3)
        except ValueError as e:
            return str(e)
    return ""
