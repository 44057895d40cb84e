"""Random-weight LLaVA-1.5 checkpoints saved in a folder that vLLM and transformers both load
offline: the weights (safetensors, in vLLM's names), config, a small word-level tokenizer with a
chat template, and the CLIP image processor. Used by tests/vllm and bench/vllm_serve_bench.py.

    path = save_llava(tmp / "tiny-llava")                       # CLIP 336/14: 576 image tokens
    path = save_llava(tmp / "llava-150m", size="bench")          # Llama ~150M parameters, bf16

Weight names: transformers 5.x saves the CLIP tower as ``model.vision_tower.embeddings...``;
vLLM 0.32 maps ``model.vision_tower.`` to its ``vision_tower.`` and then expects
``vision_model.embeddings...`` (the transformers 4 layout), so the tower's keys are saved as
``model.vision_tower.vision_model.*`` (transformers reads that older layout too).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Union

import torch

__all__ = ["save_llava", "clip_llama_configs", "WORDS", "IMAGE_TOKEN"]

IMAGE_TOKEN = "<image>"
# the word-level vocabulary: specials, the words of the chat template and the test prompts, fillers
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
WORDS = ["USER:", "ASSISTANT:", "user:", "assistant:", "system:", "describe", "the", "image", "what", "is",
         "in", "this", "picture", "compare", "two", "images", "hello", "say", "something", "a", "and", "?", ".",
         ",", ":"]

SIZES: Dict[str, Dict[str, int]] = {
    # tests: CLIP 336/14 (576 patches), hidden 64, 3 layers; Llama hidden 256, 2 layers
    "tiny": dict(v_hidden=64, v_layers=3, v_heads=4, v_inter=128, hidden=256, layers=2, heads=4, kv=4,
                 inter=512, vocab=384),
    # the serving benchmark: Llama ~150M parameters (hidden 768, 12 layers, vocab 32k), CLIP 336/14
    # with hidden 256, 4 layers
    "bench": dict(v_hidden=256, v_layers=4, v_heads=4, v_inter=1024, hidden=768, layers=12, heads=12, kv=12,
                  inter=2048, vocab=32000),
}

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _tokenizer(vocab_size: int, image_token_id: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    # the image token at the config's image_token_id: swap it into place
    img = vocab[IMAGE_TOKEN]
    other = words[image_token_id]
    vocab[IMAGE_TOKEN], vocab[other] = image_token_id, img
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def clip_llama_configs(s: dict, image_size: int):
    """(CLIPVisionConfig at ``image_size`` / 14, LlamaConfig) of the widths ``s`` (an entry of
    `SIZES`): the two halves of the random LLaVA-1.5 and LLaVA-NeXT checkpoints."""
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], intermediate_size=s["v_inter"], image_size=image_size,
                              patch_size=14, hidden_act="quick_gelu", projection_dim=s["v_hidden"],
                              layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv"], intermediate_size=s["inter"], vocab_size=s["vocab"],
                       max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=3, bos_token_id=1,
                       eos_token_id=2)
    return vision, text


def save_llava(path: Union[str, os.PathLike], size: str = "tiny", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> str:
    """A random LLaVA-1.5 (CLIP 336/14 -> 576 image tokens, ``vision_feature_layer=-2``,
    ``"default"`` select) saved at ``path`` with its tokenizer and processor; returns the path."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    s = SIZES[size]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    image_token_id = s["vocab"] - 1
    vision, text = clip_llama_configs(s, 336)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    with torch.no_grad():   # larger random weights than the default init: outputs depend on the image
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.vision_model."):
            k = "model.vision_tower.vision_model." + k[len("model.vision_tower."):]
        sd[k] = v.contiguous()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.torch_dtype = dtype   # read by vLLM as the model dtype
    cfg.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["LlavaForConditionalGeneration"]
    conf["dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    tok = _tokenizer(s["vocab"], image_token_id)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    do_center_crop=True, do_resize=True)
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
