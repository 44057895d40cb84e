"""The ``tokenreduce`` entry of a model's config: which method, budget and options vLLM runs.

It arrives through vLLM's ``hf_overrides`` (``LLM(model, hf_overrides={"tokenreduce": {...}})``,
``vllm serve MODEL --hf-overrides '{"tokenreduce": {...}}'``, or `tokenreduce serve`), so no
environment variable selects a method and two models in one process may use different ones:

    {"method": "visionzip", "keep": 64}
    {"method": "divprune", "ratio": 0.25}
    {"method": "visionzip", "dominant": 54, "contextual": 10}      # other keys: the method's options
    {"method": "tome", "options": {"r": 16}}                       # or an explicit options dict

`method_of_spec` validates the entry (a one-line ``tokenreduce.vllm: ...`` error) and builds
the `Method`. This module does not import vLLM, so `tokenreduce serve` checks a spec before
vLLM starts and the main environment can test it.

Reachable stages: `Stage.PROJECTOR` (on the vision tower's features, before LLaVA's projector)
and `Stage.VIT` (between the tower's blocks). `Stage.LLM` methods (FastV, PyramidDrop, ...)
drop tokens after a decoder layer: vLLM allocates a request's KV cache for its whole prompt at
scheduling time and every layer attends over the same paged blocks, so a sequence cannot
shrink between layers without changing vLLM's KV allocation; they are refused. Methods that
read the prompt text (Need.TEXT) are refused too: vLLM encodes an image without its prompt
(the encoder cache is shared between requests).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..errors import fail
from ..methods import available, build
from ..methods.base import Method, Need, Stage

__all__ = ["KEY", "REFUSED_NEEDS", "method_of_spec", "spec_of_config", "spec_label"]

KEY = "tokenreduce"        # the config attribute / hf_overrides key
WHERE = "vllm"
REFUSED_NEEDS = {Need.TEXT: "the prompt text (vLLM encodes an image without its prompt)",
                 Need.QUERY_ATTN: "LLM attention", Need.VISUAL_ATTN: "LLM attention",
                 Need.QUERY_ATTN_NOROPE: "LLM attention", Need.LOOKAHEAD: "LLM attention"}


def spec_of_config(hf_config: Any) -> Optional[Dict[str, Any]]:
    """The ``tokenreduce`` entry of a (vLLM-overridden) transformers config, or None."""
    spec = getattr(hf_config, KEY, None)
    if spec is None:
        return None
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    return dict(spec)


def method_of_spec(spec: Mapping[str, Any]) -> Method:
    """The `Method` a ``tokenreduce`` entry names (validated: name, budget, options, stage)."""
    if not isinstance(spec, Mapping):
        fail(WHERE, f"the {KEY!r} entry must be a dict like {{\"method\": \"visionzip\", \"keep\": 64}}, "
                    f"got {type(spec).__name__}")
    spec = dict(spec)
    name = spec.pop("method", None)
    if not isinstance(name, str) or not name:
        fail(WHERE, f"the {KEY!r} entry needs \"method\": one of {', '.join(available())}")
    if name not in available():
        fail(WHERE, f"unknown method {name!r}; known: {', '.join(available())}")
    keep, ratio = spec.pop("keep", None), spec.pop("ratio", None)
    options = spec.pop("options", None) or {}
    if not isinstance(options, Mapping):
        fail(WHERE, f"\"options\" must be a dict, got {type(options).__name__}")
    options = {**dict(options), **spec}
    method = build(name, keep, ratio, **options)   # its own tokenreduce.methods.<name>: ... errors
    if method.stage == Stage.LLM:
        fail(WHERE, f"{name} runs inside the LLM (stage llm): out of reach in vLLM, whose KV cache holds "
                    "every prompt token in every layer; use a vit or projector method")
    for need, what in REFUSED_NEEDS.items():
        if need in method.needs:
            fail(WHERE, f"{name} needs {need.value} ({what}), which vLLM's vision encoder does not have")
    return method


def spec_label(spec: Mapping[str, Any]) -> str:
    """``visionzip keep=64`` (logs)."""
    rest = {k: v for k, v in spec.items() if k != "method"}
    return " ".join([str(spec.get("method"))] + [f"{k}={v}" for k, v in rest.items()])
