"""Attention statistics of one LLM decoder layer computed from its own q/k projections on
given hidden states, with the fused ``attention_with_scores`` op (never eager attention).

Used by `tokenreduce.models.llm.LLMReducer` for

* `Need.LOOKAHEAD`: at a reduce call after layer ``l`` the statistics of layer ``l + 1`` on the
  current hidden states, before ``l + 1`` runs (its input norm, q/k projections, q/k norms
  where the model has them, RoPE where the statistic uses it);
* statistics the attention implementation cannot record during the forward: ``"visual"``
  (Need.VISUAL_ATTN) and ``"norope"`` (Need.QUERY_ATTN_NOROPE).

`layer_scores(layer, h, position_embeddings, key_bias, img_pos, kinds)` returns, per kind, a
tensor over the *whole current sequence* (``[B, N]``, or ``[B, N, C]`` for ``"keys"`` /
``"values"``; positions that are not image tokens are 0 for ``"visual"`` / ``"norope"``), so a
caller slices the image positions the same way for every kind:

* ``"query"``: last row, RoPE, softmax over every key (key padding masked), head mean;
* ``"received"``: every row, causal, head and row mean;
* ``"visual"``: image-token rows only, causal softmax over the whole sequence, head and image-row
  mean. The fused op takes one row set for the batch and bottom-right causality, so each sample's
  keys are re-aligned to end at its image run (keys before the run start are ``-inf``): exact
  when every sample's image tokens form one contiguous run (one image per sample: LLaVA-1.5,
  LLaVA-NeXT, Qwen2-VL);
* ``"norope"``: last row vs image keys, q/k *before* RoPE, softmax over the image keys only;
* ``"keys"``: head-mean keys after RoPE ``[B, N, Dh]``; ``"values"``: values, KV heads
  concatenated ``[B, N, Hkv * Dv]``;
* ``"rater"`` (Need.RATER_ATTN, SparseVLM): with ``raters`` ``[B, N]`` (per-token weights, 0 but
  on the rater text tokens, `rater_weights`), each of the last ``N - n`` rows' causal attention
  (RoPE, key padding masked) to every image key, per head, as the *output* of the fused op with
  one-hot image values (chunks of at most 256 columns), weighted by ``raters`` and head-meaned.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["LLM_KINDS", "layer_scores", "key_bias_of_mask", "rater_weights", "unused_values"]

LLM_KINDS = ("query", "received", "visual", "norope", "keys", "values", "rater")
RATER_CHUNK = 256          # image columns per fused call of "rater" (the CUDA kernels' Dv limit)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(attn: nn.Module, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The model's own ``apply_rotary_pos_emb`` (looked up in the attention module's file) on
    ``t`` ``[B, H, R, D]`` with ``cos/sin`` ``[B, R, D]``; the standard rotate-half otherwise."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        try:
            return fn(t, t, cos, sin)[0]
        except TypeError:
            pass
    return t * cos.unsqueeze(1) + _rotate_half(t) * sin.unsqueeze(1)


def key_bias_of_mask(mask, B: int, N: int, device) -> Optional[Tensor]:
    """Key-padding bias ``[B, N]`` float32 (``-inf`` on padded keys) from the mask a decoder
    layer receives: None, a boolean / additive key mask ``[B, 1, 1, N]``, or a full
    ``[B, 1, Nq, N]`` causal mask (its last row: the keys the last token may see)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise NotImplementedError("tokenreduce.models.llm_scores: per-layer-type mask dicts are not supported")
    m = mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    m = m[..., -N:].expand(B, N)
    if m.dtype == torch.bool:
        return torch.zeros(B, N, device=device).masked_fill(~m, float("-inf"))
    return m.float()


@torch.no_grad()
def rater_weights(h: Tensor, img_pos: Tensor, txt_pos: Tensor) -> Tensor:
    """SparseVLM's raters from the LLM input ``h`` ``[B, L, D]``: the text tokens after the image
    run (``txt_pos`` ``[B, T]`` ascending, ``img_pos`` ``[B, n]``) whose relevance
    ``softmax_t(v @ t^T).mean(image rows)`` exceeds the mean relevance of those text tokens.
    Returns weights over the text tokens ``[B, T]`` float32: ``1 / #raters`` on the raters, else 0."""
    v = _gather_rows(h, img_pos).float()                              # [B, n, D]
    t = _gather_rows(h, txt_pos).float()                              # [B, T, D]
    after = txt_pos > img_pos[:, -1:]                                 # [B, T] text after the image
    logits = (v @ t.transpose(1, 2)).masked_fill(~after[:, None, :], float("-inf"))
    rel = logits.softmax(dim=2).mean(dim=1)                           # [B, T], 0 off `after`
    mean = rel.sum(1, keepdim=True) / after.sum(1, keepdim=True).clamp_min(1)
    raters = after & (rel > mean)
    return raters.float() / raters.sum(1, keepdim=True).clamp_min(1)


def _gather_rows(t: Tensor, pos: Tensor) -> Tensor:
    """``t`` ``[B, N, C]`` at positions ``pos`` ``[B, R]`` -> ``[B, R, C]``."""
    return torch.gather(t, 1, pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def unused_values(k: Tensor) -> Tensor:
    """The values to give the fused op when only its scores are read: on the CPU a zero-width
    view of the keys ``[B, Hkv, N, 0]`` (the kernel then skips ``P V``: no second read of the
    keys, an empty output); elsewhere the keys themselves (the CUDA kernel takes Dv >= 1)."""
    return k[..., :0] if k.device.type == "cpu" else k


@torch.no_grad()
def layer_scores(layer: nn.Module, h: Tensor, position_embeddings: Optional[Tuple[Tensor, Tensor]],
                 key_bias: Optional[Tensor], img_pos: Tensor, kinds: Iterable[str],
                 counter=None, raters: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Statistics ``kinds`` of decoder ``layer`` (``input_layernorm`` + ``self_attn`` with
    ``q_proj`` / ``k_proj`` / ``v_proj``) on hidden states ``h`` ``[B, N, D]`` (the layer's
    input). ``position_embeddings``: ``(cos, sin)`` ``[B|1, N, Dh]`` of these tokens;
    ``key_bias`` ``[B, N]`` masks padded keys; ``img_pos`` ``[B, n]`` ascending image positions.
    ``counter``: a `collections.Counter` whose ``"fused"`` entry counts the fused-op calls.
    ``raters`` ``[B, N]``: the rater weights over these tokens (``"rater"`` only)."""
    from ..ops import attention_with_scores
    kinds = set(kinds)
    bad = kinds - set(LLM_KINDS)
    if bad:
        raise ValueError(f"tokenreduce.models.llm_scores: unknown kind(s) {sorted(bad)}; known: {LLM_KINDS}")
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    B, N, _ = x.shape
    n = img_pos.shape[1]
    hd = attn.head_dim
    scale = float(getattr(attn, "scaling", hd ** -0.5))
    cos = sin = None
    if position_embeddings is not None:
        cos, sin = (t.expand(B, *t.shape[1:]) for t in position_embeddings)

    def q_rows(pos: Optional[Tensor], rope: bool) -> Tensor:
        xr = x if pos is None else _gather_rows(x, pos)
        q = attn.q_proj(xr).view(B, xr.shape[1], -1, hd)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        if rope and cos is not None:
            c, s = (cos, sin) if pos is None else (_gather_rows(cos, pos), _gather_rows(sin, pos))
            q = _rope(attn, q, c, s)
        return q

    k0 = attn.k_proj(x).view(B, N, -1, hd)
    if hasattr(attn, "k_norm"):
        k0 = attn.k_norm(k0)
    k0 = k0.transpose(1, 2)                                           # [B, Hkv, N, hd], no RoPE
    k = _rope(attn, k0, cos, sin) if cos is not None else k0
    out: Dict[str, Tensor] = {}

    def fused(q, kk, **kw):
        if counter is not None:
            counter["fused"] += 1
        return attention_with_scores(q, kk, unused_values(kk), scale=scale, **kw)[1]   # scores only

    last = torch.full((B, 1), N - 1, dtype=torch.long, device=x.device)
    if "query" in kinds:
        out["query"] = fused(q_rows(last, True), k, key_bias=key_bias)
    if "received" in kinds:
        out["received"] = fused(q_rows(None, True), k, causal=True, key_bias=key_bias)
    if "visual" in kinds:
        end = img_pos[:, -1:] + 1                                       # [B, 1] end of the image run
        p = end - N + torch.arange(N, device=x.device)                  # keys re-aligned to end there
        valid = p >= 0
        pc = p.clamp_min(0)
        k_roll = torch.gather(k, 2, pc[:, None, :, None].expand(-1, k.shape[1], -1, hd))
        kb = torch.zeros(B, N, device=x.device) if key_bias is None else torch.gather(key_bias, 1, pc)
        kb = kb.masked_fill(~valid, float("-inf"))
        s = fused(q_rows(img_pos, True), k_roll, causal=True, key_bias=kb)[:, N - n:]
        out["visual"] = torch.zeros(B, N, device=x.device).scatter(1, img_pos, s)
    if "norope" in kinds:
        k_img = torch.gather(k0, 2, img_pos[:, None, :, None].expand(-1, k0.shape[1], -1, hd))
        s = fused(q_rows(last, False), k_img)
        out["norope"] = torch.zeros(B, N, device=x.device).scatter(1, img_pos, s)
    if "rater" in kinds:
        if raters is None:
            raise ValueError("tokenreduce.models.llm_scores: the rater kind needs the rater weights")
        R = N - n                                                       # the text rows end the sequence
        rows = torch.arange(N - R, N, device=x.device).expand(B, R)
        q = q_rows(rows, True)
        w = raters[:, N - R:].float()                                   # [B, R]
        parts = []
        for c0 in range(0, n, RATER_CHUNK):                             # one-hot values: out = P[rows, image]
            cols = img_pos[:, c0:c0 + RATER_CHUNK]
            onehot = torch.zeros(B, N, cols.shape[1], dtype=q.dtype, device=x.device)
            onehot = onehot.scatter(1, cols[:, None, :], 1.0).unsqueeze(1).expand(-1, k.shape[1], -1, -1)
            if counter is not None:
                counter["fused"] += 1
            p = attention_with_scores(q, k, onehot.contiguous(), scale=scale, causal=True, key_bias=key_bias)[0]
            parts.append((p.float().mean(dim=1) * w[:, :, None]).sum(dim=1))   # [B, cols]
        out["rater"] = torch.zeros(B, N, device=x.device).scatter(1, img_pos, torch.cat(parts, dim=1))
    if "keys" in kinds:
        out["keys"] = k.float().mean(dim=1)
    if "values" in kinds:
        v = attn.v_proj(x).view(B, N, -1, hd)
        out["values"] = v.reshape(B, N, -1)
    return out
