"""A random Qwen2.5-VL saved in a folder that vLLM and transformers both load offline: weights
(safetensors, the names transformers 5 saves, which vLLM's ``hf_to_vllm_mapper`` maps), config,
a small word-level tokenizer with Qwen's vision special tokens, the Qwen2-VL image / video
processors (images resized to at most 224 x 224 px: at most 16 x 16 patches, 64 merged tokens).

Tower: 4 blocks (full attention in blocks 1 and 3, windows of 112 px = 4 x 4 merged tokens in
0 and 2), hidden 64, 4 heads; LLM: Qwen2 with hidden 256, 2 layers, 4 heads (head size 64,
M-RoPE sections [8, 12, 12]), vocab 384.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

__all__ = ["save_qwen2_5_vl", "IMAGE_PAD", "VISION_START", "VISION_END", "PROMPT_IMAGE"]

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
PROMPT_IMAGE = f"{VISION_START}{IMAGE_PAD}{VISION_END}"     # one image in a prompt (vLLM's placeholder string)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
VISION = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
WORDS = ["user:", "assistant:", "describe", "the", "image", "what", "is", "in", "this", "picture", "compare",
         "two", "images", "hello", "say", "something", "a", "and", "?", "."]
VOCAB = 384
IDS = {VISION_START: 300, VISION_END: 301, IMAGE_PAD: 302, VIDEO_PAD: 303}
MAX_PIXELS = 224 * 224
MIN_PIXELS = 56 * 56


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + WORDS
    words += [f"w{i}" for i in range(VOCAB - len(words) - len(VISION))]
    vocab = {}
    i = 0
    for w in words:
        while i in IDS.values():
            i += 1
        vocab[w] = i
        i += 1
    vocab.update(IDS)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + VISION])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=VISION)


def save_qwen2_5_vl(path: Union[str, Path], seed: int = 0) -> str:
    """The tiny random Qwen2.5-VL (float32) with its processor at ``path``; returns the path."""
    from safetensors.torch import save_file
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2_5_VLConfig(
        image_token_id=IDS[IMAGE_PAD], video_token_id=IDS[VIDEO_PAD], vision_start_token_id=IDS[VISION_START],
        vision_end_token_id=IDS[VISION_END], bos_token_id=None, eos_token_id=2, pad_token_id=0,
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=256,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3], hidden_act="silu", in_chans=3),
        text_config=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         eos_token_id=2, pad_token_id=0, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # larger random weights than the default init: outputs depend on the image
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    conf["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    tok = _tokenizer()
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_proc = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_proc = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
