"""tokenreduce's vision-tower runner on vLLM's CLIP tower: ViT-stage and projector-stage
methods, attention statistics from the fused ``attention_with_scores`` op.

vLLM's `CLIPVisionTransformer` has the layout transformers' has (``embeddings``,
``pre_layrnorm``, ``encoder.layers``, ``config``), so `tokenreduce.models.vit.run_vision` runs
it block by block exactly as it runs the transformers tower (same layer plan, same
[CLS] / keys / values bookkeeping, ToMe's proportional attention). The one difference is the
attention call: each layer's ``self_attn.attn`` (vLLM's `MMEncoderAttention`, fed
``[B, N, H * Dh]`` q/k/v from the fused qkv projection) is wrapped by `ScoredEncoderAttention`,
which, while a `ScoreRecorder` is active, sends the call to
`tokenreduce.models.attention.tokenreduce_attention` (the fused op where statistics are
requested, sdpa elsewhere), and otherwise calls vLLM's attention unchanged.

Tensor parallel: vLLM shards the tower's heads over the ranks (``QKVParallelLinear``: rank r
holds heads ``[r * H / tp, (r + 1) * H / tp)``), so a rank's recorded statistics are means
over its own heads. `combine_head_shards` turns them into the mean over all heads: an
all-reduce sum of each rank's partial mean weighted by its share of the heads (``values``,
heads concatenated, are all-gathered instead). Every rank then holds the same statistics, runs
the same (deterministic) reduction and keeps the same tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..methods.base import Method
from ..models import attention
from ..models.vit import run_vision

__all__ = ["ScoredEncoderAttention", "combine_head_shards", "combine_recorded_shards", "install_scored_attention", "reduced_features",
           "kept_count"]

MEAN_KINDS = ("cls", "received", "query", "keys")   # head means: combined by a weighted all-reduce


def combine_head_shards(partial: Tensor, local_heads: int, total_heads: int,
                        all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The mean over all ``total_heads`` heads from this rank's mean over its ``local_heads``
    (``partial`` ``[B, N]`` scores or ``[B, N, Dh]`` keys): ``all_reduce(partial * local /
    total)``, ``all_reduce`` a sum over the tensor-parallel ranks (default vLLM's
    ``tensor_model_parallel_all_reduce``). Identity when one rank holds every head."""
    if local_heads == total_heads:
        return partial
    if all_reduce is None:
        from vllm.distributed import tensor_model_parallel_all_reduce as all_reduce
    return all_reduce(partial.float() * (local_heads / total_heads))


class ScoredEncoderAttention(nn.Module):
    """vLLM's encoder attention of one CLIP layer, scored while a recorder is active.

    forward(q, k, v ``[B, N, H_local * Dh]``) -> ``[B, N, H_local * Dh]``."""

    def __init__(self, inner: nn.Module, total_heads: int):
        super().__init__()
        self.inner = inner
        self.num_heads, self.head_size, self.scale = inner.num_heads, inner.head_size, inner.scale
        self.num_kv_heads = getattr(inner, "num_kv_heads", inner.num_heads)
        self.total_heads = total_heads

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        rec = attention.current_recorder()
        if rec is None or query.dim() != 3:
            return self.inner(query, key, value, *args, **kwargs)
        B, N, _ = query.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_size
        q = query.reshape(B, N, H, Dh).transpose(1, 2)
        k = key.reshape(B, key.shape[1], Hkv, Dh).transpose(1, 2)
        v = value.reshape(B, value.shape[1], Hkv, -1).transpose(1, 2)
        out, _ = attention.tokenreduce_attention(self, q, k, v, None, scaling=self.scale)   # [B, N, H, Dv]
        if H != self.total_heads:
            self._combine(rec)
        return out.reshape(B, N, -1)

    def _combine(self, rec: attention.ScoreRecorder) -> None:
        part, layer = getattr(self, "_tokenreduce_part", None), getattr(self, "_tokenreduce_layer", None)
        combine_recorded_shards(rec, part, layer, self.num_heads, self.total_heads)


def combine_recorded_shards(rec: attention.ScoreRecorder, part: str, layer: int, heads: int, total_heads: int) -> None:
    """Replace this rank's recorded statistics of ``(part, layer)`` (over its ``heads`` of
    ``total_heads``) by the whole layer's: head means by `combine_head_shards`, values by an
    all-gather over the channels. In a fixed order: every rank must issue the same collectives in
    the same order (a set's iteration order follows the per-process string hash seed)."""
    wanted = rec.wanted(part, layer)
    for kind in [k for k in attention.KINDS if k in wanted]:
        got = rec.get(kind, part, layer)
        if got is None:
            continue
        if kind in MEAN_KINDS:
            rec.put(kind, part, layer, combine_head_shards(got, heads, total_heads))
        elif kind == "values":
            from vllm.distributed import tensor_model_parallel_all_gather
            rec.put(kind, part, layer, tensor_model_parallel_all_gather(got.contiguous(), dim=-1))


def install_scored_attention(vision_model: nn.Module) -> None:
    """Wrap every layer's ``self_attn.attn`` of vLLM's `CLIPVisionTransformer` (idempotent) and
    switch its config to the ``"tokenreduce"`` attention `run_vision` checks for."""
    for layer in vision_model.encoder.layers:
        sa = layer.self_attn
        if not isinstance(sa.attn, ScoredEncoderAttention):
            sa.attn = ScoredEncoderAttention(sa.attn, sa.num_heads)
    attention.register()
    vision_model.config._attn_implementation = attention.NAME


@torch.no_grad()
def reduced_features(vision_model: nn.Module, pixel_values: Tensor, method: Method, feature_layer: int,
                     select_strategy: str) -> Tensor:
    """The tower's features of ``pixel_values`` ``[B, 3, H, W]`` reduced by ``method``, after
    LLaVA's feature select (``"default"`` drops [CLS]): ``[B, K, D_vision]``, as
    `tokenreduce.models.adapters.llava.LlavaAdapter` computes them in transformers."""
    if not isinstance(feature_layer, int):
        raise NotImplementedError("tokenreduce.vllm: a list of vision feature layers is not supported")
    install_scored_attention(vision_model)
    vis = run_vision(vision_model, pixel_values.to(vision_model.dtype), method, feature_layer=feature_layer)
    feats = vis.features
    size = vis.reduction.size if vis.reduction is not None else None
    if drops_cls(method, select_strategy):
        feats = feats[:, 1:]
        size = size[:, 1:] if size is not None else None
    if size is not None and bool((size <= 0).any()):
        raise ValueError(f"tokenreduce.vllm: {method.name} returned padding slots (size 0), which vLLM cannot "
                         "mask in the prompt; give a budget it fills")
    return feats


def kept_count(vision_config, method: Method, feature_layer: int, select_strategy: str) -> int:
    """Image features per image ``reduced_features`` returns for this tower config: the same
    `run_vision` on a transformers `CLIPVisionModel` of the config on the ``meta`` device (shapes
    only, about a second for CLIP-L; no weights, no data). A method's count can depend on the
    tower's depth (ToMe / Turbo merge after every layer that runs), so it is not read from
    ``method.keep_tokens`` alone. The caller caches it per config."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        tower = CLIPVisionModel(vision_config)
    attention.register()
    tower.set_attn_implementation(attention.NAME)
    size = vision_config.image_size
    vis = run_vision(tower, torch.empty(1, 3, size, size, device="meta"), method, feature_layer=feature_layer)
    return vis.features.shape[1] - int(drops_cls(method, select_strategy))


def drops_cls(method: Method, select_strategy: str) -> bool:
    """LLaVA's ``"default"`` feature select drops [CLS], except for a method whose released code
    sends it on into the projector (VisionZip: ``projects_cls``), as the transformers adapter."""
    return select_strategy == "default" and not getattr(method, "projects_cls", False)
