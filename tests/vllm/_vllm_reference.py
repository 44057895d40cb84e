"""What the vLLM plugin must reproduce: transformers running the same model with the same
reduction, greedy. The one function the tests compare with (`reference_generate`); switch its
body to ``tokenreduce.patch`` once that lands (same arguments, same result).

Today it runs tokenreduce's transformers path piece by piece, per image: the LLaVA adapter's
tower run (`LlavaAdapter.run_tower`: VIT / PROJECTOR method, fused statistics) and projector
(`LlavaAdapter.project`), the features placed at the image tokens of a prompt that holds K of
them per image (vLLM's layout: every image of a prompt reduced on its own), then
transformers' greedy ``generate``. `VLMRunner.generate` (one image per prompt) is the same
computation; tests/vllm/test_plugin.py checks that too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from tokenreduce.models.adapters.llava import LlavaAdapter
from tokenreduce.vllm.config import method_of_spec

_MODELS: Dict[str, Any] = {}


def load(path: str, model_class: str = "LlavaForConditionalGeneration"):
    """(transformers ``model_class`` float32, processor), cached per path."""
    if path not in _MODELS:
        import transformers
        model = getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval()
        _MODELS[path] = (model, transformers.AutoProcessor.from_pretrained(path))
    return _MODELS[path]


def generate_with_features(model, tok, prompt: str, feats: Sequence[torch.Tensor], max_new_tokens: int) -> List[int]:
    """Greedy new token ids of ``prompt`` (one "<image>" per image) with image ``i``'s features
    ``feats[i]`` ``[K_i, D]`` at K_i placeholders: the prompt vLLM's plugin builds."""
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join(" ".join(["<image>"] * f.shape[0]) + rest for f, rest in zip(feats, pieces[1:]))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    emb = model.get_input_embeddings()(ids)
    if len(feats):
        emb[ids == model.config.image_token_id] = torch.cat(list(feats)).to(emb.dtype)
    gen = model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=3)
    return gen[0].tolist()


@torch.no_grad()
def reference_generate(path: str, prompts: Sequence[Dict[str, Any]], spec: Optional[Dict[str, Any]],
                       max_new_tokens: int) -> List[List[int]]:
    """Greedy token ids per prompt (``{"prompt": str with one "<image>" per image,
    "images": [PIL images]}``) of the model at ``path`` with the ``tokenreduce`` entry ``spec``
    (None: unreduced)."""
    model, proc = load(path)
    method = method_of_spec(spec) if spec is not None else None
    adapter = LlavaAdapter(model, method)
    out = []
    for p in prompts:
        images = p.get("images") or []
        feats = []
        if images:
            px = proc.image_processor(images, return_tensors="pt")["pixel_values"]
            feats = list(adapter.project(adapter.run_tower(px, None))[0])          # n_images x [K, D]
        out.append(generate_with_features(model, proc.tokenizer, p["prompt"], feats, max_new_tokens))
    return out


@torch.no_grad()
def patched_generate(path: str, prompts: Sequence[Dict[str, Any]], spec: Optional[Dict[str, Any]],
                     max_new_tokens: int) -> List[List[int]]:
    """The same as `reference_generate` through the user-facing path: ``tokenreduce.patch`` on
    the transformers model, then HF's own greedy ``generate`` on the processor's unreduced
    prompt (N placeholders per image; the patch cuts them to K). Prompts with at most one image."""
    import tokenreduce

    model, proc = load(path)
    tok = proc.tokenizer
    out = []
    with tokenreduce.patched(model, method_of_spec(spec) if spec is not None else None):
        for p in prompts:
            images = p.get("images") or []
            if len(images) > 1:
                raise ValueError("patched_generate: one image per prompt")
            if images:
                px = proc.image_processor(images, return_tensors="pt")["pixel_values"]
                n = model.config.vision_config.image_size // model.config.vision_config.patch_size
                text = p["prompt"].replace("<image>", " ".join(["<image>"] * (n * n)))
                ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
                kw = {"pixel_values": px}
            else:
                ids = torch.tensor([tok(p["prompt"], add_special_tokens=False)["input_ids"]])
                kw = {}
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=3, **kw)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out
