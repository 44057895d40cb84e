"""Attention statistics of the Qwen2-VL / Qwen2.5-VL vision towers, from the fused op.

The towers take every image of a batch as one packed sequence ``[sum N_i, D]`` of patches
(``N_i = t * h * w`` of its ``(t, h, w)`` grid, the 4 patches of each 2x2 merge group
consecutive), attend within segments (``cu_seqlens``: one per frame in Qwen2-VL and in the
full-attention layers of Qwen2.5-VL (``fullatt_block_indexes``); one per window of
``window_size`` pixels in the other Qwen2.5-VL layers, whose hidden states are permuted into
window order), have no [CLS] token and end in the 2x2 patch merger.

`WindowLayout.build(grid, vision_config)` computes, on the host from the grid sizes (the
processor's CPU ``image_grid_thw``: no device read-back), how each layer's segments pack into
a rectangular batch ``[S, H, w_max, Dh]`` (``-inf`` key bias on the padding keys), plus every
precomputed tensor transformers' tower accepts (window index, rotary position ids); `to`
moves them to the device once. `vision_kwargs(layout)` are the keyword arguments of
``visual(pixel_values, grid_thw=..., **kwargs)``: transformers then makes one attention call
per layer over the whole packed sequence (``cu_seqlens = [0, N]``) and `qwen_vision_attention`
(registered as the attention implementation ``"tokenreduce_qwen_vision"``, `install`) does
the real segmentation itself: one fused `attention_with_scores` call per layer over the
packed windows, no host sync.

Recorded into the active `ScoreRecorder` (part ``"vision"``, keyed by block index), every
tensor ``[1, sum N_i, ...]`` in the *original* patch order (window permutation undone):

* ``"received"``: attention received per patch: the head mean, summed over the query rows of
  its segment and divided by its frame's patch count, i.e. the mean over *every* query row of
  the frame of the attention the layer actually computes (zero outside a window); in a
  full-attention layer the usual "attention received"; it sums to 1 over each frame.
  (Padding rows of the packed batch are zero queries, whose uniform rows are subtracted.)
* ``"cls"``: the same tensor (the towers have no [CLS]: the mean attention received is the
  documented substitute for a [CLS] row);
* ``"keys"``: head-mean keys (after the vision RoPE) ``[1, N, Dh]``; ``"values"``:
  ``[1, N, H * Dh]``.

`merge_groups` turns a per-patch statistic into one per merged token (the 2x2 group of the
merger, in the merged features' order): ``"received"`` / ``"cls"`` are *summed* over the group
(the attention the merged token receives; still summing to 1 per frame), keys and values are
*averaged*. ``"query"`` (a text query) does not exist in a vision tower and is not recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention

__all__ = ["NAME", "WindowLayout", "Segments", "vision_kwargs", "qwen_vision_attention", "install", "register",
           "merge_groups", "split_images", "host_grid"]

NAME = "tokenreduce_qwen_vision"
KWARG = "tokenreduce_windows"


def host_grid(image_grid_thw) -> List[Tuple[int, int, int]]:
    """The ``(t, h, w)`` grid of each image as host ints: free for the processor's CPU tensor
    (or a list); a device tensor is read back once (a host sync, the only one)."""
    if isinstance(image_grid_thw, Tensor):
        return [tuple(int(v) for v in row) for row in image_grid_thw.cpu().tolist()]
    return [tuple(int(v) for v in row) for row in image_grid_thw]


@dataclass
class Segments:
    """One way the packed sequence splits into attention segments, as a padded batch.

    ``gather`` ``[S, w]`` long: the packed position at each slot (``N``: padding);
    ``key_bias`` ``[S, w]`` float32 (0 / ``-inf``); ``valid`` ``[S, w]`` bool; ``unpack`` ``[N]``:
    the flat slot ``s * w + j`` of each packed position; ``row_fill`` ``[S, 1]`` float32:
    ``(w - n_s) / n_s``, what the zero padding rows add to each key's row sum; ``lengths``
    (host ints)."""
    lengths: List[int]
    gather: Tensor
    key_bias: Tensor
    valid: Tensor
    unpack: Tensor
    row_fill: Tensor

    @classmethod
    def build(cls, lengths: Sequence[int]) -> "Segments":
        lengths = [int(n) for n in lengths if int(n) > 0]
        S, w, N = len(lengths), max(lengths), sum(lengths)
        gather = torch.full((S, w), N, dtype=torch.long)
        unpack = torch.empty(N, dtype=torch.long)
        start = 0
        for s, n in enumerate(lengths):
            gather[s, :n] = torch.arange(start, start + n)
            unpack[start:start + n] = s * w + torch.arange(n)
            start += n
        valid = gather < N
        key_bias = torch.zeros(S, w).masked_fill(~valid, float("-inf"))
        n = torch.tensor(lengths, dtype=torch.float32)[:, None]
        return cls(lengths, gather, key_bias, valid, unpack, (w - n) / n)

    def to(self, device) -> "Segments":
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=True)
                                for k in ("gather", "key_bias", "valid", "unpack", "row_fill")})


@dataclass
class WindowLayout:
    """The segmentation of one packed batch of images (see the module docstring).

    ``grid``: ``(t, h, w)`` per image; ``counts`` / ``merged_counts``: patches / merged tokens
    per image; ``full`` / ``window``: the frame and window `Segments` (``window`` None for
    Qwen2-VL); ``full_layers``: blocks attending over whole frames (None: all);
    ``frame_size`` ``[N]`` float32: patch count of each packed position's frame;
    ``to_original`` ``[N]`` long or None: the packed (window-order) position of each original
    patch; ``hf`` the precomputed tensors of transformers' tower for `qwen_vision_attention`
    (``cu_seqlens = [0, N]``: one call per layer), ``real_cu`` the true host ``cu_seqlens`` /
    ``cu_window_seqlens`` for any other attention implementation."""
    grid: List[Tuple[int, int, int]]
    merge: int
    counts: List[int]
    merged_counts: List[int]
    full: Segments
    window: Optional[Segments]
    full_layers: Optional[frozenset]
    frame_size: Tensor
    to_original: Optional[Tensor]
    hf: Dict[str, Tensor] = field(default_factory=dict)
    real_cu: Dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, image_grid_thw, vision_config) -> "WindowLayout":
        """From the grid (host ints, a CPU tensor, or a device tensor read back once) and the
        tower's config (``fullatt_block_indexes`` / ``window_size`` mark Qwen2.5-VL)."""
        from transformers import vision_utils
        grid = host_grid(image_grid_thw)
        m = int(vision_config.spatial_merge_size)
        unit = m * m
        g = torch.tensor(grid, dtype=torch.long)
        counts = [t * h * w for t, h, w in grid]
        frames = [h * w for t, h, w in grid for _ in range(t)]
        frame_size = torch.cat([torch.full((n,), float(n)) for n in frames])
        cu_full = vision_utils.get_vision_cu_seqlens(g)
        N = sum(counts)
        hf = {"cu_seqlens": torch.tensor([0, N], dtype=torch.int32),
              "position_ids": vision_utils.get_vision_position_ids(g, m)}
        real = {"cu_seqlens": cu_full}
        window = to_original = full_layers = None
        fullatt = getattr(vision_config, "fullatt_block_indexes", None)
        if fullatt is not None:     # Qwen2.5-VL: windows, hidden states in window order
            index, cu_win = vision_utils.get_vision_window_index(
                g, spatial_merge_size=m, window_size=vision_config.window_size, patch_size=vision_config.patch_size)
            window = Segments.build((cu_win[1:] - cu_win[:-1]).tolist())
            perm = (index[:, None] * unit + torch.arange(unit)).reshape(-1)     # packed -> original patch
            to_original = torch.argsort(perm)
            frame_size = frame_size[perm]
            full_layers = frozenset(int(i) for i in fullatt)
            hf.update(window_index=index, cu_window_seqlens=torch.tensor([0, N], dtype=torch.int32))
            real["cu_window_seqlens"] = cu_win
        full = Segments.build((cu_full[1:] - cu_full[:-1]).tolist())
        return cls(grid, m, counts, [c // unit for c in counts], full, window, full_layers, frame_size,
                   to_original, hf, real)

    def to(self, device) -> "WindowLayout":
        """The device copy (one transfer per tensor, before any forward); the host-side
        ``cu_seqlens`` stay on the CPU (transformers only splits by them on the host)."""
        hf = {k: (v if k.startswith("cu_") else v.to(device, non_blocking=True)) for k, v in self.hf.items()}
        return replace(self, full=self.full.to(device), window=self.window.to(device) if self.window else None,
                       frame_size=self.frame_size.to(device, non_blocking=True),
                       to_original=None if self.to_original is None else self.to_original.to(device,
                                                                                                non_blocking=True),
                       hf=hf)

    def segments(self, layer: int) -> Segments:
        """The segments block ``layer`` attends within."""
        if self.window is None or (self.full_layers is not None and layer in self.full_layers):
            return self.full
        return self.window

    def original_order(self, t: Tensor) -> Tensor:
        """A per-position tensor ``[N, ...]`` in packed order -> original patch order."""
        return t if self.to_original is None else t.index_select(0, self.to_original)


def vision_kwargs(layout: WindowLayout, fused: bool = True) -> Dict[str, object]:
    """Keyword arguments of ``visual(pixel_values, grid_thw=..., **kwargs)`` for ``layout``
    (already on the device): the tower's precomputed tensors (no read-back of the grid inside
    the tower) and, with ``fused`` (the tower runs `qwen_vision_attention`, see `install`), the
    layout itself; without it the true host ``cu_seqlens`` (any attention implementation)."""
    if fused:
        return {**layout.hf, KWARG: layout}
    return {**layout.hf, **layout.real_cu}


def _pack(t: Tensor, seg: Segments) -> Tensor:
    """``[1, H, N, D]`` -> ``[S, H, w, D]`` (zeros in the padding slots)."""
    x = t[0].transpose(0, 1)                                   # [N, H, D]
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])           # slot N: the padding row
    return x[seg.gather].permute(0, 2, 1, 3)


def qwen_vision_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function of the Qwen vision blocks: ``query/key/value
    [1, H, N, Dh]`` (the packed sequence) -> ``(out [1, N, H, Dh], None)``; records what the
    active `ScoreRecorder` asked for (see the module docstring). Without a layout in
    ``kwargs`` (the tower called without `vision_kwargs`), transformers has split the segments
    itself: plain sdpa per call, and a requested statistic is counted as a fallback."""
    layout: Optional[WindowLayout] = kwargs.get(KWARG)
    rec = attention.current_recorder()
    part = getattr(module, "_tokenreduce_part", None)
    layer = getattr(module, "_tokenreduce_layer", None)
    wanted = rec.wanted(part, layer) if rec is not None else set()
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if layout is None:
        if wanted and rec is not None:
            rec.fallbacks["qwen vision: no window layout (call the tower with qwen_vision.vision_kwargs)"] += 1
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        return out.transpose(1, 2).contiguous(), None
    if layer is None:
        raise RuntimeError("tokenreduce.models.qwen_vision: the vision blocks are not tagged "
                           "(tokenreduce.models.attention.tag_layers(visual.blocks, 'vision'))")
    seg = layout.segments(layer)
    q, k, v = _pack(query, seg), _pack(key, seg), _pack(value, seg)
    S, H, w, _ = q.shape
    N = query.shape[2]
    if wanted & {"received", "cls"}:
        from ..ops import attention_with_scores
        rec.calls["fused"] += 1
        out, scores = attention_with_scores(q, k, v, scale=scale, key_bias=seg.key_bias)
        # row sums of the valid query rows: the zero padding rows attend uniformly (1 / n_s)
        rows = (scores * w - seg.row_fill).reshape(-1)[seg.unpack]
        received = layout.original_order(rows / layout.frame_size)[None]
        for kind in ("received", "cls"):
            if kind in wanted:
                rec.put(kind, part, layer, received)
    else:
        if rec is not None:
            rec.calls["sdpa"] += 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.valid[:, None, None, :], scale=scale)
    if "keys" in wanted:
        rec.put("keys", part, layer, layout.original_order(key[0].float().mean(dim=0))[None])
    if "values" in wanted:
        rec.put("values", part, layer, layout.original_order(value[0].transpose(0, 1).reshape(N, -1))[None])
    out = out.permute(0, 2, 1, 3).reshape(S * w, H, -1)[seg.unpack]       # [N, H, Dh]
    return out[None], None


_REGISTERED = False


def register() -> None:
    """Register ``"tokenreduce_qwen_vision"`` in transformers' attention interface (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, qwen_vision_attention)
    _REGISTERED = True


def install(visual: nn.Module, part: str = "vision") -> nn.Module:
    """Make `qwen_vision_attention` the attention implementation of the tower ``visual``
    (``model.model.visual``) and tag its blocks with ``(part, index)``."""
    register()
    if visual.config._attn_implementation != NAME:
        visual.set_attn_implementation(NAME)
    attention.tag_layers(visual.blocks, part)
    return visual


def merge_groups(t: Tensor, kind: str, merge: int = 2) -> Tensor:
    """A per-patch statistic ``[1, N, ...]`` -> per merged token ``[1, N / merge**2, ...]``:
    attention (``"received"`` / ``"cls"``) summed over each 2x2 group, keys / values averaged."""
    unit = merge * merge
    g = t.reshape(t.shape[0], t.shape[1] // unit, unit, *t.shape[2:])
    return g.sum(dim=2) if kind in ("received", "cls") else g.mean(dim=2)


def split_images(t: Tensor, counts: Sequence[int]) -> List[Tensor]:
    """``[1, sum n_i, ...]`` -> one ``[n_i, ...]`` per image (host counts, no sync)."""
    return list(torch.split(t[0], list(counts)))
