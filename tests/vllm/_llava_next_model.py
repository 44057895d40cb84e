"""A random LLaVA-NeXT (anyres) saved where vLLM and transformers both load it offline.

CLIP 112/14 tiles (8 x 8 = 64 patches + [CLS]), grid pinpoints 112x112, 112x224, 224x112 and
224x224 (2, 3 or 5 tiles: the base image + 1, 2 or 4 crops), ``vision_feature_layer=-2``,
``"default"`` select; Llama hidden 256, 2 layers. The tokenizer is the tiny LLaVA-1.5's
(`tokenreduce.testing.tiny_vlm.save_llava`, saved next to it). Weight names as vLLM expects them:
the CLIP tower under ``model.vision_tower.vision_model.*``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

__all__ = ["save_llava_next", "TILE", "PINPOINTS"]

TILE = 112
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]


def save_llava_next(path: Union[str, os.PathLike], seed: int = 0) -> str:
    """Save the tiny LLaVA-NeXT at ``path`` (weights, config, tokenizer, processor); returns the path."""
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from tokenreduce.testing.tiny_vlm import CHAT_TEMPLATE, IMAGE_TOKEN, SIZES, clip_llama_configs, save_llava

    path = Path(path)
    tok_dir = save_llava(path.parent / (path.name + "-tokenizer"))     # the word-level tokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    s = SIZES["tiny"]
    image_token_id = s["vocab"] - 1
    vision, text = clip_llama_configs(s, TILE)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                          projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():   # larger random weights than the default init: outputs depend on the image
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
        model.model.image_newline.normal_(0.0, 1.0)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.vision_model."):
            k = "model.vision_tower.vision_model." + k[len("model.vision_tower."):]
        sd[k] = v.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.torch_dtype = torch.float32
    cfg.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["LlavaNextForConditionalGeneration"]
    conf["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    image_proc = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                         image_grid_pinpoints=PINPOINTS, do_center_crop=True, do_resize=True,
                                         do_pad=True)
    proc = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
