"""The ``"tokenreduce"`` attention implementation for transformers models.

Registered in transformers' `AttentionInterface` (and `AttentionMaskInterface`) under the
name ``"tokenreduce"``; select it with ``model.set_attn_implementation("tokenreduce")`` or
``attn_implementation="tokenreduce"``. It computes attention with the fused
``tokenreduce.ops.attention_with_scores`` op in the layers where the running reduction
method asked for attention statistics, and with ``torch.nn.functional.scaled_dot_product_attention``
(flash-class) elsewhere; the ``[B, H, N, N]`` probabilities are never materialised and
``output_attentions`` is never used.

What is recorded goes to the `ScoreRecorder` active in the current context
(`recording(rec)`), keyed by ``(part, layer)``: ``part`` is ``"vision"`` or ``"llm"``,
``layer`` the 0-based index of the block inside that part (set on the modules by
`tag_layers`). Kinds (see `ScoreRecorder.request`):

* ``"cls"``: [CLS]-row attention, head mean, ``[B, Nk]`` (score_rows=[0]);
* ``"received"``: attention received, mean over heads and every query row ``[B, Nk]``;
* ``"query"``: the last query row's attention (last text token in a VLM prefill),
  head mean ``[B, Nk]`` over *all* keys; the LLM hook slices it to the image positions
  and does not renormalise it (a per-sample constant factor, ranks are unchanged);
* ``"keys"``: head-mean keys ``[B, Nk, Dh]`` (after RoPE in an LLM);
* ``"values"``: values with the KV heads concatenated ``[B, Nk, Hkv * Dv]``.

Masks: with the ``"tokenreduce"`` mask function, transformers' causal / bidirectional
masks arrive as ``None`` (no padding) or as a boolean key-padding mask ``[B, 1, 1, Nk]``;
they become ``causal=True`` / ``key_bias`` (``-inf`` on padded keys). An additive or
boolean mask ``[B, 1|H, 1, Nk]`` is a key mask too. Any other mask (sliding window,
packed sequences, a full ``[B, 1, Nq, Nk]`` mask) cannot be expressed as a key bias: the
output then comes from sdpa with that mask, requested scores are computed in plain
PyTorch from the scored rows only (``"received"`` needs every row: eager), and the
recorder counts the fallback (`ScoreRecorder.fallbacks`). Under autograd (training)
the call falls back to sdpa too (the fused op is forward-only) and records it.

A per-part ``key_bias`` set on the recorder (ToMe's proportional attention,
``log(size)``) is added to every attention call of that part.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScoreRecorder", "recording", "current_recorder", "register", "tag_layers",
           "tokenreduce_attention", "tokenreduce_mask", "KINDS", "NAME"]

NAME = "tokenreduce"
KINDS = ("cls", "received", "query", "keys", "values")
_ROW_KINDS = ("received", "cls", "query")

_CURRENT: contextvars.ContextVar[Optional["ScoreRecorder"]] = contextvars.ContextVar(
    "tokenreduce_recorder", default=None)


@dataclass
class ScoreRecorder:
    """Per-forward store of the attention statistics a method asked for.

    ``request(part, layer, kinds)`` before the forward; after it, ``get(kind, part, layer)``.
    ``fallbacks`` counts the calls that could not use the fused op and why; ``calls``
    counts attention calls per path (``"fused"``, ``"sdpa"``).

    ``reindex_later`` records a reduction without gathering: the stored statistics of the
    part catch up when read (`get`, `layers`) or at `resolve`, with one gather per statistic
    through the composed index (the same values as a gather per reduction). ``data`` holds
    values behind those reductions until `resolve`.
    """
    requests: Dict[Tuple[str, int], Set[str]] = field(default_factory=dict)
    data: Dict[Tuple[str, str, int], Tensor] = field(default_factory=dict)
    key_bias: Dict[str, Tensor] = field(default_factory=dict)
    fallbacks: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    # per part, the reductions not yet applied (raw index [B, K]); per statistic, how many
    # of them its stored value already follows (absent: none)
    deferred: Dict[str, List[Tensor]] = field(default_factory=dict, repr=False)
    applied: Dict[Tuple[str, str, int], int] = field(default_factory=dict, repr=False)

    def request(self, part: str, layer: int, kinds: Iterable[str]) -> None:
        kinds = set(kinds)
        bad = kinds - set(KINDS)
        if bad:
            raise ValueError(f"tokenreduce.models.attention: unknown score kind(s) {sorted(bad)}; known: {KINDS}")
        self.requests.setdefault((part, int(layer)), set()).update(kinds)

    def wanted(self, part: Optional[str], layer: Optional[int]) -> Set[str]:
        if part is None or layer is None:
            return set()
        return self.requests.get((part, layer), set())

    def put(self, kind: str, part: str, layer: int, value: Tensor) -> None:
        key = (kind, part, layer)
        self.data[key] = value
        pending = self.deferred.get(part)
        if pending:
            self.applied[key] = len(pending)
        else:
            self.applied.pop(key, None)

    def get(self, kind: str, part: str, layer: int) -> Optional[Tensor]:
        key = (kind, part, layer)
        if part in self.deferred and key in self.data:
            self._catch_up([key])
        return self.data.get(key)

    def layers(self, kind: str, part: str) -> Dict[int, Tensor]:
        if part in self.deferred:
            self._catch_up([key for key in self.data if key[0] == kind and key[1] == part])
        return {l: v for (k, p, l), v in self.data.items() if k == kind and p == part}

    def reindex(self, part: str, index: Tensor) -> None:
        """After a reduction of ``part``'s tokens, keep the stored per-token statistics
        aligned with the new tokens: ``index`` ``[B, K]`` = each new token's source
        position (its representative; -1 -> position 0)."""
        self.resolve(part)
        idx = index.clamp_min(0)
        for key, v in list(self.data.items()):
            if key[1] != part:
                continue
            self.data[key] = _gather_tokens(v, idx)

    def reindex_later(self, part: str, index: Tensor) -> None:
        """`reindex`, deferred until the statistics are read or `resolve`d (no tensor op now)."""
        self.deferred.setdefault(part, []).append(index)

    def resolve(self, part: str) -> None:
        """Apply ``part``'s deferred reductions to every stored statistic of the part."""
        if part in self.deferred:
            self._catch_up([key for key in self.data if key[1] == part])
            self.deferred.pop(part)
            for key in [key for key in self.applied if key[1] == part]:
                del self.applied[key]

    def _catch_up(self, keys) -> None:
        """Bring the statistics ``keys`` (one part) up to date: one gather each, through the
        deferred indices composed from the last back (each composition shared)."""
        if not keys:
            return
        steps = self.deferred[keys[0][1]]
        n = len(steps)
        start = {key: self.applied.get(key, 0) for key in keys}
        todo = sorted({a for a in start.values() if a < n})
        if todo:
            composed: Dict[int, Tensor] = {}
            q = steps[n - 1].clamp_min(0)          # new token -> its position before step n - 1
            for a in range(n - 1, todo[0] - 1, -1):
                if a < n - 1:
                    q = torch.gather(steps[a].clamp_min(0), 1, q)
                composed[a] = q
            for key, a in start.items():
                if a < n:
                    self.data[key] = _gather_tokens(self.data[key], composed[a])
        for key in keys:
            self.applied[key] = n

    def clear(self) -> None:
        self.data.clear()
        self.key_bias.clear()
        self.fallbacks.clear()
        self.calls.clear()
        self.deferred.clear()
        self.applied.clear()


def _gather_tokens(v: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` ``[B, K]`` (>= 0) of a per-token statistic ``[B, N]`` or ``[B, N, C]``."""
    if v.dim() == 2:
        return torch.gather(v, 1, idx)
    return torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))


def current_recorder() -> Optional[ScoreRecorder]:
    return _CURRENT.get()


@contextlib.contextmanager
def recording(recorder: Optional[ScoreRecorder] = None) -> Iterator[ScoreRecorder]:
    """Make ``recorder`` (a new one if None) the active recorder inside the block."""
    rec = recorder if recorder is not None else ScoreRecorder()
    token = _CURRENT.set(rec)
    try:
        yield rec
    finally:
        _CURRENT.reset(token)


def tag_layers(layers: Iterable[nn.Module], part: str) -> None:
    """Mark every submodule of the i-th block with ``(part, i)`` so the attention function
    knows whose statistics it computes."""
    for i, layer in enumerate(layers):
        for m in layer.modules():
            m._tokenreduce_part = part
            m._tokenreduce_layer = i


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------

def tokenreduce_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=None, attention_mask: Optional[Tensor] = None,
                     local_size: Optional[int] = None, **kwargs):
    """Mask function of the ``"tokenreduce"`` implementation: plain causal or bidirectional
    masks become ``None`` (no padding) or a boolean key-padding mask ``[B, 1, 1, Nk]``
    (causality comes from the module's ``is_causal``); anything else is built by
    transformers' `sdpa_mask` and handled by the attention function's fallback."""
    from transformers import masking_utils
    simple = mask_function in (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)
    if simple and local_size is None and kv_offset == 0:
        if attention_mask is None:
            return None
        pm = attention_mask.to(torch.bool)
        if pm.shape[-1] < kv_length:
            pm = F.pad(pm, (0, kv_length - pm.shape[-1]))
        return pm[:, None, None, :kv_length]
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        local_size=local_size, **kwargs)


def _key_bias_from_mask(mask: Optional[Tensor], B: int, Nk: int) -> Tuple[bool, Optional[Tensor]]:
    """(expressible, key_bias [B, Nk] float32 or None)."""
    if mask is None:
        return True, None
    if mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[-1] == Nk:
        m = mask[:, 0, 0, :]   # heads identical for the masks transformers builds
        if mask.shape[1] != 1:
            return False, None
    elif mask.dim() == 2 and mask.shape[-1] == Nk:
        m = mask
    else:
        return False, None
    m = m.expand(B, Nk)
    if m.dtype == torch.bool:
        return True, torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    return True, m.float()


def _float(t: Tensor) -> Tensor:
    """``t`` as float32 (itself when it already is: no op)."""
    return t if t.dtype == torch.float32 else t.float()


def _add_bias(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# ---------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------

def _plain_scores(q: Tensor, k: Tensor, scale: float, rows: Optional[Tensor], mask: Optional[Tensor],
                  key_bias: Optional[Tensor], causal: bool) -> Tensor:
    """Scores of the requested rows in plain PyTorch (fallback path): head- and row-mean
    probabilities ``[B, Nk]`` float32."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if rows is None:
        rows = torch.arange(Nq, device=q.device)
    qr = q[:, :, rows].float()
    kk = k.float().repeat_interleave(H // Hkv, dim=1)
    logits = qr @ kk.transpose(-1, -2) * scale            # [B, H, R, Nk]
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    if mask is not None:
        mr = mask[:, :, rows] if mask.shape[-2] != 1 else mask
        logits = logits.masked_fill(~mr, float("-inf")) if mr.dtype == torch.bool else logits + mr.float()
    if causal:
        qpos = rows + (Nk - Nq)
        logits = logits.masked_fill(torch.arange(Nk, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p.mean(dim=(1, 2))


def _sdpa(module, query, key, value, mask, bias, causal, dropout, scaling, kwargs):
    """transformers' sdpa with one mask built from a full mask, a key bias ``[B, Nk]`` and
    causality (bottom-right aligned); no mask at all when none is needed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    Nq, Nk = query.shape[2], key.shape[2]
    if mask is None and bias is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)[0]
    if mask is None and not causal:
        # a key bias alone (ToMe's log(size)): used as it is, [B, 1, 1, Nk]
        m = _float(bias)
        m = (m if m.is_contiguous() else m.contiguous()).view(bias.shape[0], 1, 1, Nk)
        return sdpa_attention_forward(module, query, key, value, m if m.dtype == query.dtype else m.to(query.dtype),
                                      dropout=dropout, scaling=scaling, is_causal=False, **kwargs)[0]
    m = torch.zeros((), dtype=torch.float32, device=query.device)
    if bias is not None:
        m = m + _float(bias)[:, None, None, :]
    if mask is not None:
        m = m + (torch.zeros(mask.shape, device=query.device).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask.float())
    if causal:
        cm = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device).tril(Nk - Nq)
        m = m.masked_fill(~cm, float("-inf"))
    return sdpa_attention_forward(module, query, key, value, m.to(query.dtype), dropout=dropout,
                                  scaling=scaling, is_causal=False, **kwargs)[0]


def tokenreduce_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function: ``query [B, H, Nq, Dh]``, ``key/value [B, Hkv, Nk, D]``
    -> ``(out [B, Nq, H, Dv], None)``; records what the active `ScoreRecorder` asked for."""
    rec = _CURRENT.get()
    part = getattr(module, "_tokenreduce_part", None)
    layer = getattr(module, "_tokenreduce_layer", None)
    wanted = rec.wanted(part, layer) if rec is not None else set()
    extra_bias = rec.key_bias.get(part) if (rec is not None and part is not None) else None
    if extra_bias is not None and extra_bias.shape != (key.shape[0], key.shape[2]):
        extra_bias = None   # the bias belongs to another token set (e.g. a cache step)
    B, H, Nq, Dh = query.shape
    Nk = key.shape[2]
    scale = float(scaling) if scaling is not None else Dh ** -0.5
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)) and Nq > 1
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        expressible, mask_bias = False, None
    else:
        expressible, mask_bias = _key_bias_from_mask(attention_mask, B, Nk)

    if "keys" in wanted:
        rec.put("keys", part, layer, _float(key).mean(dim=1))
    if "values" in wanted:
        rec.put("values", part, layer, value.transpose(1, 2).reshape(B, Nk, -1))

    training = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    row_kinds = [k for k in _ROW_KINDS if k in wanted]

    if not row_kinds and expressible and not training:
        # nothing to score here: flash-class sdpa with the same (key-bias) semantics
        if rec is not None:
            rec.calls["sdpa"] += 1
        return _sdpa(module, query, key, value, None, _add_bias(mask_bias, extra_bias), causal,
                     dropout, scaling, kwargs), None

    if training or not expressible:
        reason = "training (the fused op is forward-only)" if training else "mask not expressible as a key bias"
        full_mask = None if expressible else attention_mask
        kb = _add_bias(mask_bias, extra_bias)
        if rec is not None:
            rec.fallbacks[f"sdpa: {reason}"] += 1
            rec.calls["sdpa"] += 1
        out = _sdpa(module, query, key, value, full_mask, kb, causal and full_mask is None, dropout, scaling, kwargs)
        with torch.no_grad():
            for kind in row_kinds:
                rows = {"cls": torch.tensor([0], device=query.device),
                        "query": torch.tensor([Nq - 1], device=query.device), "received": None}[kind]
                if kind == "received" and full_mask is not None:
                    rec.fallbacks["eager scores: attention received under an inexpressible mask"] += 1
                rec.put(kind, part, layer, _plain_scores(query, key, scale, rows, full_mask, kb,
                                                         causal and full_mask is None))
        return out, None

    from ..ops import attention_with_scores
    rec.calls["fused"] += 1
    bias = _add_bias(mask_bias, extra_bias)
    bias_f = _float(bias) if bias is not None else None
    main = row_kinds[0]
    rows = {"received": None, "cls": [0], "query": [-1]}[main]
    out, scores = attention_with_scores(query, key, value, scale=scale, causal=causal, key_bias=bias_f,
                                        score_rows=rows)
    rec.put(main, part, layer, scores)
    for kind in row_kinds[1:]:
        # one extra pass over the scored row only (cost O(Nk)): causal stays bottom-right aligned
        qr = query[:, :, :1] if kind == "cls" else query[:, :, -1:]
        c = causal if kind == "query" else False
        kb = bias_f
        if kind == "cls" and causal:   # row 0 of a causal layer sees key 0 only (after the first Nk - Nq)
            first = Nk - Nq
            kb = torch.zeros(B, Nk, device=query.device).masked_fill(
                torch.arange(Nk, device=query.device) > first, float("-inf"))[:, :] + (0 if bias_f is None else bias_f)
        _, s = attention_with_scores(qr, key, value, scale=scale, causal=c, key_bias=kb)
        rec.put(kind, part, layer, s)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> None:
    """Register ``"tokenreduce"`` in transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, tokenreduce_attention)
    AttentionMaskInterface.register(NAME, tokenreduce_mask)
    _REGISTERED = True
