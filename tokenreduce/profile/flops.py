"""Analytic FLOPs and KV-cache sizes of transformer stacks, from the token counts each layer saw.

FastV's formula (Chen et al., ECCV 2024, Sec. 4) for one decoder layer with ``n`` tokens,
hidden size ``d`` and FFN intermediate size ``m``::

    4 n d^2  +  2 n^2 d  +  2 n d m
    (q/k/v/o projections, attention scores and weighted sum, the two FFN matrices)

Counted as FastV counts (one multiply-accumulate = 1; gated FFNs and grouped-query K/V
are not special-cased), so numbers are comparable to the papers that quote it. The same
formula with the encoder's own widths gives the vision encoder's FLOPs (patch embedding
and norms are not counted). A decoding step with ``c`` cached tokens costs
``4 d^2 + 2 c d + 2 d m`` per layer (one query row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

__all__ = ["layer_flops", "stack_flops", "decode_step_flops", "kv_cache_bytes", "Dims", "vision_dims",
           "text_dims"]


def layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer count ``4nd^2 + 2n^2d + 2ndm`` for one sequence of ``n`` tokens."""
    if n < 0 or d < 1 or m < 0:
        raise ValueError(f"tokenreduce.profile.flops: bad layer size n={n}, d={d}, m={m}")
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def stack_flops(tokens_per_layer: Iterable[int], d: int, m: int, batch: int = 1) -> int:
    """Sum of `layer_flops` over the layers (``tokens_per_layer``: per sequence), times ``batch``."""
    return batch * sum(layer_flops(int(n), d, m) for n in tokens_per_layer)


def decode_step_flops(cached_per_layer: Iterable[int], d: int, m: int, batch: int = 1) -> int:
    """One generated token: per layer ``4d^2 + 2(c+1)d + 2dm`` with ``c`` cached tokens
    (the new token attends to the cache and to itself)."""
    return batch * sum(4 * d * d + 2 * (int(c) + 1) * d + 2 * d * m for c in cached_per_layer)


def kv_cache_bytes(tokens_per_layer: Iterable[int], kv_heads: int, head_dim: int, elem_bytes: int,
                   batch: int = 1) -> int:
    """Keys + values held by a KV cache: ``sum_l 2 * batch * n_l * kv_heads * head_dim * bytes``."""
    return sum(2 * batch * int(n) * kv_heads * head_dim * elem_bytes for n in tokens_per_layer)


@dataclass(frozen=True)
class Dims:
    d: int                     # hidden size
    m: int                     # FFN intermediate size
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 1


def _get(cfg: Any, *names: str, default: Optional[Any] = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def vision_dims(cfg: Any) -> Dims:
    """Widths of a vision encoder config (CLIP, SigLIP, DINOv2, Qwen2-VL / 2.5-VL vision)."""
    d = int(_get(cfg, "embed_dim", "hidden_size"))
    if type(cfg).__name__.startswith("Qwen2VL"):      # Qwen2-VL: hidden_size is the LLM width
        d = int(cfg.embed_dim)
    m = _get(cfg, "intermediate_size")
    if m is None:
        m = int(round(d * float(_get(cfg, "mlp_ratio", default=4))))
    heads = int(_get(cfg, "num_attention_heads", "num_heads", default=1))
    return Dims(d, int(m), heads, heads, d // heads)


def text_dims(cfg: Any) -> Dims:
    """Widths of a decoder-only LLM config (Llama, Qwen2, ...)."""
    d = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(_get(cfg, "head_dim", default=d // heads))
    return Dims(d, int(cfg.intermediate_size), heads, kv, hd)
