"""The Qwen2.5-VL reduction of the vLLM plugin without vLLM (the main environment tests it too):
which tower statistics a method reads, its `Context` per image (as
`tokenreduce.models.adapters.qwen2_vl.Qwen2VLAdapter` builds it in transformers), the kept count
per image grid fixed at preprocessing (`kept_tokens`: the method once per grid on ``meta``
tensors), where the kept tokens go (`kept_order`) and their M-RoPE channels
(`merged_positions`). `tokenreduce.vllm.qwen2_5_vl` runs them inside vLLM's model.
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..methods.base import Context, Method, Need, Stage
from ..models.adapters.qwen2_vl import TOWER_NEED_KIND, tower_context
from ..models.stages import NOMINAL_DEPTH, check_reduction, plan_layers
from .config import method_of_spec, spec_of_config

__all__ = ["spec_method", "method_of", "vision_plan", "image_context", "reduce_image", "kept_order",
           "merged_positions", "kept_tokens", "check_method"]


@functools.lru_cache(maxsize=32)
def spec_method(spec_json: str) -> Method:
    """The `Method` of a ``tokenreduce`` entry (JSON, sorted keys), built once per spec."""
    return method_of_spec(json.loads(spec_json))


def method_of(hf_config) -> Optional[Method]:
    """The config's method, or None."""
    spec = spec_of_config(hf_config)
    return None if spec is None else spec_method(json.dumps(spec, sort_keys=True))


# -- what the method reads and keeps ------------------------------------------------------
def vision_plan(method: Method, depth: int) -> Tuple[List[int], int]:
    """(blocks whose statistics ``method`` reads, the block whose keys it reads) on a tower of
    ``depth`` blocks, as the transformers adapter maps them (`plan_layers`)."""
    plan = plan_layers(method, depth, default_nominal=NOMINAL_DEPTH["vision"])
    att = [a for _, _, a in plan.attention]
    return att, (att[-1] if att else depth - 1)


def image_context(method: Method, x: Tensor, grid: Tuple[int, int, int], stats: Dict[Tuple[str, int], Tensor],
                  depth: int, heads: int) -> Context:
    """The method's `Context` for one image's merged features ``x`` ``[1, M, D]`` (merged grid
    ``(t, h, w)``), ``stats[(kind, block)]`` ``[1, M, ...]`` per merged token; with Need.CLS_ATTN
    the synthetic [CLS] slot in front (features, keys and values the means, score 0), exactly as
    `Qwen2VLAdapter` builds it in transformers (`tower_context`)."""
    plan = plan_layers(method, depth, default_nominal=NOMINAL_DEPTH["vision"])
    _, key_block = vision_plan(method, depth)
    return tower_context(method, x, grid, lambda kind, block: stats[(kind, block)], plan, key_block, heads)


def reduce_image(method: Method, x: Tensor, grid: Tuple[int, int, int], stats: Dict[Tuple[str, int], Tensor],
                 depth: int, heads: int) -> Tuple[Tensor, Tensor]:
    """``method`` on one image -> (tokens ``[K, D]``, index ``[K]`` into its ``M`` merged
    tokens, ``-1`` for a synthesised token), the synthetic [CLS] dropped."""
    ctx = image_context(method, x, grid, stats, depth, heads)
    red = method(ctx)
    check_reduction(method, ctx.x, red, "on the merged image features")
    tokens, index, size = red.tokens[0], red.index[0], red.size[0]
    if Need.CLS_ATTN in method.needs:
        tokens, index, size = tokens[1:], (index[1:] - 1).clamp_min(-1), size[1:]
    if tokens.device.type != "meta" and bool((size <= 0).any()):
        raise ValueError(f"tokenreduce.vllm: {method.name} returned padding slots (size 0), which vLLM cannot "
                         "mask in the prompt; give a budget it fills")
    return tokens, index


def kept_order(index: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Where the kept tokens go, as the transformers adapter places them (`Qwen2VLAdapter._cut`):
    a synthesised token (index ``-1``) takes the first unused merged position, in output order;
    the tokens then follow in position order. ``index`` ``[K]`` -> (permutation of the tokens
    ``[K]``, the merged position of each permuted token ``[K]``)."""
    valid = index >= 0
    used = torch.zeros(n + 1, dtype=torch.int8, device=index.device).scatter(
        0, torch.where(valid, index, torch.full_like(index, n)), 1)[:n]
    free = torch.sort(used, stable=True).indices
    rank = ((index == -1).long().cumsum(0) - 1).clamp(0, n - 1)
    resolved = torch.where(valid, index, free[rank])
    srt = resolved.sort()
    return srt.indices, srt.values


def merged_positions(merged: Tensor, grid: Tuple[int, int, int]) -> Tensor:
    """Merged-token positions ``[K]`` of a ``(t, h, w)`` merged grid -> the M-RoPE channels
    vLLM's EVS recompute reads ``[K, 4]``: ``(t, h, w)`` from the media's start, and
    ``max(t, h, w)``, where the text after the media starts (`get_mrope_input_positions`)."""
    t, h, w = grid
    thw = torch.stack([merged // (h * w), (merged % (h * w)) // w, merged % w], dim=1)
    return torch.cat([thw, torch.full_like(thw[:, :1], max(t, h, w))], dim=1)


@functools.lru_cache(maxsize=256)
def _kept(spec_json: str, grid: Tuple[int, int, int], depth: int, heads: int, dim: int) -> int:
    method = spec_method(spec_json)
    n = grid[0] * grid[1] * grid[2]
    blocks, key_block = vision_plan(method, depth)
    with torch.device("meta"):
        x = torch.empty(1, n, dim)
        stats = {}
        for block in blocks:
            for need, kind in TOWER_NEED_KIND.items():
                if need in method.needs:
                    stats[(kind, block)] = torch.empty(1, n, dim) if kind == "values" else torch.empty(1, n)
        if Need.KEYS in method.needs:
            stats[("keys", key_block)] = torch.empty(1, n, dim // heads)
        tokens, _ = reduce_image(method, x, grid, stats, depth, heads)
    return int(tokens.shape[0])


def kept_tokens(hf_config, grid: Tuple[int, int, int]) -> Optional[int]:
    """Placeholders of an image of merged grid ``(t, h, w)`` with the config's method (None: no
    method): the method run once per grid on ``meta`` tensors (shapes only, cached)."""
    spec = spec_of_config(hf_config)
    if spec is None:
        return None
    vc = hf_config.vision_config
    grid = tuple(int(v) for v in grid)
    return _kept(json.dumps(spec, sort_keys=True), grid, int(vc.depth), int(vc.num_heads), int(vc.out_hidden_size))


def check_method(method: Method) -> None:
    """PROJECTOR methods only (the windowed tower runs no VIT method, as in transformers), and
    no pixel input (the tower's input is flattened patches)."""
    if method.stage != Stage.PROJECTOR:
        raise NotImplementedError(f"tokenreduce.vllm: {method.name} runs in stage {method.stage.value}; "
                                  "Qwen2.5-VL's windowed vision tower runs projector methods only")
    if Need.PIXELS in method.needs:
        raise NotImplementedError(f"tokenreduce.vllm: {method.name} needs the pixels; Qwen2.5-VL's vision input "
                                  "is flattened patches")
