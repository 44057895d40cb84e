"""TokenPacker's visual projector (Li et al., "TokenPacker: Efficient Visual Projector for
Multimodal LLM"; released code CircleRadon/TokenPacker, ``llava/model/multimodal_projector/builder.py``).

It replaces LLaVA's 2-layer MLP and emits ``(G / s)^2`` tokens for a ``G x G`` patch grid
(576 -> 144 with ``s = 2``, 576 -> 64 with ``s = 3``):

1. point queries: the select-layer features ``[B, G^2, Dv]`` bilinearly interpolated to a
   ``G/s x G/s`` grid, then ``LN(W_q x)``;
2. multi-level keys / values: the patch tokens of several ViT layers (CLIP-L layers 12, 16,
   22 and 23 in the release) concatenated on channels ``[B, G^2, levels Dv]``, each through
   ``LN(Linear, GELU, Linear)``;
3. region-to-point injection: multi-head attention (``nn.MultiheadAttention`` in the release,
   no residual) of every point query to the ``s x s`` window of keys it covers: one
   `tokenreduce.ops.region_attention` call between the attention's in- and out-projections;
4. ``Linear, GELU, Linear`` to the LLM width.

The levels are fused as the release fuses them: concatenated on channels before the key /
value projections, so the attention sees one key level (``L = 1``) with ``s^2`` keys per
query; `region_attention` also takes ``L > 1`` separate levels (``L s^2`` keys per query)
for a per-level variant, which the released weights do not describe.

`TokenPacker.from_released(folder)` reads the authors' checkpoint layout (the
``model.mm_projector.*`` tensors of a LLaVA checkpoint folder or of a stage-1
``mm_projector.bin``) and maps the released parameter names (`RELEASED_NAMES`; the packed
``clip_attn.in_proj_*`` is split into the q / k / v projections). Without a checkpoint the
weights are random (the released init: truncated normal 0.02, zero biases) and
``weights`` says so.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...errors import fail
from ...ops import region_attention

__all__ = ["TokenPacker", "RELEASED_NAMES", "RELEASED_LAYERS", "released_to_local", "local_to_released",
           "level_layers"]

#: the ViT hidden states the release concatenates (``hidden_states[l]``, 0 = the embeddings),
#: for CLIP ViT-L/14-336's 24 layers
RELEASED_LAYERS = (12, 16, 22, 23)
#: released parameter prefix -> this module's
RELEASED_NAMES = {
    "q_proj_1.": "query_proj.", "k_proj_1.": "key_proj.", "v_proj_1.": "value_proj.",
    "ln_q_1.": "query_norm.", "ln_k_1.": "key_norm.", "ln_v_1.": "value_norm.",
    "clip_attn.out_proj.": "attn_out.", "mlp.": "mlp.",
}
_WHERE = "models.projectors.tokenpacker"


def level_layers(num_layers: int, select_layer: int = -2) -> Tuple[int, ...]:
    """The hidden-state indices of the multi-level features for a tower of ``num_layers``:
    the released (12, 16, 22, 23) for 24 layers, scaled to shorter towers (each in
    ``[1, the select layer]``, kept distinct where the depth allows)."""
    top = select_layer % (num_layers + 1)
    if num_layers == 24:
        return tuple(min(l, top) for l in RELEASED_LAYERS)
    out: List[int] = []
    for l in RELEASED_LAYERS:
        out.append(min(top, max(1, round(l * num_layers / 24))))
    return tuple(out)


def released_to_local(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The released projector's tensors (prefix already stripped) -> this module's names."""
    out: Dict[str, Tensor] = {}
    for name, t in state.items():
        if name.startswith("clip_attn.in_proj_"):
            kind = name.rsplit("_", 1)[1]               # weight | bias
            for part, chunk in zip(("attn_q", "attn_k", "attn_v"), t.chunk(3, dim=0)):
                out[f"{part}.{kind}"] = chunk
            continue
        for old, new in RELEASED_NAMES.items():
            if name.startswith(old):
                out[new + name[len(old):]] = t
                break
        else:
            fail(_WHERE, f"unexpected tensor {name!r} in the released checkpoint")
    return out


def local_to_released(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The inverse of `released_to_local` (to write a checkpoint in the released layout)."""
    out: Dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        out[f"clip_attn.in_proj_{kind}"] = torch.cat([state[f"{p}.{kind}"] for p in ("attn_q", "attn_k", "attn_v")])
    back = {v: k for k, v in RELEASED_NAMES.items()}
    for name, t in state.items():
        if name.startswith(("attn_q.", "attn_k.", "attn_v.")):
            continue
        for new, old in back.items():
            if name.startswith(new):
                out[old + name[len(new):]] = t
                break
    return out


def _projector_tensors(folder: str) -> Dict[str, Tensor]:
    """Every ``*mm_projector.*`` tensor of a checkpoint folder, the prefix stripped."""
    files: List[str] = []
    for index in glob.glob(os.path.join(folder, "*.index.json")):
        with open(index) as f:
            wmap = json.load(f).get("weight_map", {})
        files += sorted({os.path.join(folder, v) for k, v in wmap.items() if "mm_projector." in k})
    if not files:
        files = [p for p in (os.path.join(folder, "mm_projector.bin"),) if os.path.isfile(p)]
        files = files or sorted(glob.glob(os.path.join(folder, "*.safetensors")) +
                                glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        fail(_WHERE, f"no checkpoint in {folder!r} (looked for *.index.json, mm_projector.bin, *.safetensors, "
                     "pytorch_model*.bin)", FileNotFoundError)
    out: Dict[str, Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for k, t in state.items():
            if "mm_projector." in k:
                out[k.split("mm_projector.", 1)[1]] = t
    if not out:
        fail(_WHERE, f"no mm_projector.* tensors in {folder!r}", FileNotFoundError)
    return out


class TokenPacker(nn.Module):
    """Image features ``[B, G^2, vision_dim]`` + multi-level features ``[B, G^2, levels
    vision_dim]`` -> ``[B, (G / region)^2, llm_dim]``.

    ``embed_dim`` defaults to ``vision_dim`` and ``heads`` to ``embed_dim // 128`` (the
    release: 1024 and 8); ``region`` is the release's ``scale_factor``."""

    def __init__(self, vision_dim: int = 1024, llm_dim: int = 4096, levels: int = 4, region: int = 2,
                 embed_dim: Optional[int] = None, heads: Optional[int] = None):
        super().__init__()
        embed_dim = embed_dim or vision_dim
        heads = heads or max(1, embed_dim // 128)
        if embed_dim % heads:
            fail(_WHERE, f"heads={heads} must divide embed_dim={embed_dim}")
        self.region, self.heads, self.levels, self.embed_dim = region, heads, levels, embed_dim
        self.weights = "random (no TokenPacker checkpoint given; outputs are not the trained projector's)"
        self.query_proj = nn.Linear(vision_dim, embed_dim, bias=False)
        self.key_proj = nn.Sequential(nn.Linear(levels * vision_dim, embed_dim), nn.GELU(),
                                      nn.Linear(embed_dim, embed_dim))
        self.value_proj = nn.Sequential(nn.Linear(levels * vision_dim, embed_dim), nn.GELU(),
                                        nn.Linear(embed_dim, embed_dim))
        self.query_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.key_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.value_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_q = nn.Linear(embed_dim, embed_dim)
        self.attn_k = nn.Linear(embed_dim, embed_dim)
        self.attn_v = nn.Linear(embed_dim, embed_dim)
        self.attn_out = nn.Linear(embed_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_released(cls, folder: str, region: Optional[int] = None, **kwargs) -> "TokenPacker":
        """Build from a checkpoint folder in the released layout. The widths come from the
        tensors; ``region`` from the folder's config.json ``scale_factor`` unless given."""
        state = released_to_local(_projector_tensors(folder))
        cfg_path = os.path.join(folder, "config.json")
        trained = None
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                trained = json.load(f).get("scale_factor")
        region = region or trained
        vision_dim = state["query_proj.weight"].shape[1]
        embed_dim = state["query_proj.weight"].shape[0]
        levels = state["key_proj.0.weight"].shape[1] // vision_dim
        llm_dim = state["mlp.0.weight"].shape[0]
        m = cls(vision_dim, llm_dim, levels, region or 2, embed_dim=embed_dim, **kwargs)
        missing, unexpected = m.load_state_dict(state, strict=False)
        if missing or unexpected:
            fail(_WHERE, f"checkpoint in {folder!r} does not fit: missing {missing}, unexpected {unexpected}")
        m.weights = f"released checkpoint {folder}"
        if trained is not None and trained != m.region:
            m.weights += f" (trained with scale_factor {trained}, run with region {m.region})"
        return m

    def queries(self, features: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """The point queries ``[B, (G / region)^2, Dv]`` (bilinear, as the release) and their grid."""
        B, N, D = features.shape
        g = int(round(N ** 0.5))
        if g * g != N or g % self.region:
            fail(_WHERE, f"{N} image tokens are not a square grid whose side is a multiple of region={self.region}")
        gq = g // self.region
        img = features.reshape(B, g, g, D).float().permute(0, 3, 1, 2)
        q = torch.nn.functional.interpolate(img, size=(gq, gq), mode="bilinear")
        return q.permute(0, 2, 3, 1).reshape(B, gq * gq, D).to(features.dtype), (gq, gq)

    def forward(self, features: Tensor, multi_level: Tensor) -> Tensor:
        q, grid = self.queries(features)
        query = self.attn_q(self.query_norm(self.query_proj(q)))
        key = self.attn_k(self.key_norm(self.key_proj(multi_level)))
        value = self.attn_v(self.value_norm(self.value_proj(multi_level)))
        out = region_attention(query, key[:, None], value[:, None], grid, region=self.region, heads=self.heads)
        return self.mlp(self.attn_out(out))


class LlavaTokenPacker(nn.Module):
    """TokenPacker in LLaVA's projector slot: called with the select-layer patch features
    ``[B, G^2, Dv]`` (as ``multi_modal_projector``), it takes the multi-level features from
    forward hooks on the vision tower's layers (``layers[l - 1]`` outputs ``hidden_states[l]``),
    recorded during the same call. ``layers``: the tower's blocks; ``levels``: hidden-state
    indices (`level_layers`); ``has_cls``: the tower's tokens start with [CLS] (dropped)."""

    def __init__(self, packer: TokenPacker, layers: Sequence[nn.Module], levels: Sequence[int], has_cls: bool = True):
        super().__init__()
        if len(levels) != packer.levels:
            fail(_WHERE, f"{len(levels)} levels given for a projector of {packer.levels}")
        self.packer, self.levels, self.has_cls = packer, tuple(levels), has_cls
        self.weights = packer.weights
        self._seen: Dict[int, Tensor] = {}
        self._hooks = [layers[l - 1].register_forward_hook(self._record(i)) for i, l in enumerate(self.levels)]

    def _record(self, i: int):
        def hook(module, args, out):
            self._seen[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def remove(self) -> None:
        """Remove the hooks from the tower."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def forward(self, features: Tensor) -> Tensor:
        if len(self._seen) != len(self.levels):
            fail(_WHERE, "the vision tower's multi-level features were not recorded in this call "
                         f"(layers {self.levels})", RuntimeError)
        start = 1 if self.has_cls else 0
        multi = torch.cat([self._seen[i][:, start:] for i in range(len(self.levels))], dim=-1)
        self._seen = {}
        if multi.shape[1] != features.shape[1]:
            fail(_WHERE, f"TokenPacker needs every patch token: {multi.shape[1]} multi-level tokens for "
                         f"{features.shape[1]} features (a vision-stage reduction cannot run before it)")
        return self.packer(features, multi.to(features.dtype))
