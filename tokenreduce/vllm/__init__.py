"""tokenreduce inside vLLM: an out-of-tree plugin (no fork, no environment variables).

Installed with tokenreduce (entry point ``vllm.general_plugins: tokenreduce =
tokenreduce.vllm:register``); vLLM calls `register` in every process it starts. It registers
tokenreduce's subclasses over vLLM's own architectures (by ``"module:Class"``, so nothing is
imported until vLLM builds such a model):

* ``LlavaForConditionalGeneration`` -> `tokenreduce.vllm.llava.ReducedLlavaForConditionalGeneration`
* ``LlavaNextForConditionalGeneration`` -> `tokenreduce.vllm.llava_next.ReducedLlavaNextForConditionalGeneration`
* ``Qwen2_5_VLForConditionalGeneration`` -> `tokenreduce.vllm.qwen2_5_vl.ReducedQwen2_5_VLForConditionalGeneration`

A model without a ``tokenreduce`` config entry runs exactly as in vLLM. The method is chosen
per model by ``hf_overrides`` (`tokenreduce.vllm.config`):

    from vllm import LLM
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"tokenreduce": {"method": "visionzip", "keep": 64}})

or from the command line, `tokenreduce serve MODEL --method visionzip --keep 64`
(`tokenreduce.vllm.serve`). Modules: `config` (the spec; no vLLM import), `tower` (the CLIP
tower runner, fused statistics, tensor-parallel combination), `llava` (the model),
`llava_next` (LLaVA-NeXT, anyres), `qwen2_5_vl` + `qwen_reduce` (Qwen2.5-VL), `serve` (the OpenAI-compatible server), `client` (a free port,
waiting for `/health`, an image as a data URL: what the serve tests and the serving benchmark share).
"""
from __future__ import annotations

__all__ = ["register", "ARCHITECTURES"]

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokenreduce.vllm.llava:ReducedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "tokenreduce.vllm.llava_next:ReducedLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokenreduce.vllm.qwen2_5_vl:ReducedQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the architectures (idempotent)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
