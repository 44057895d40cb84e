"""Stage.LLM reduction inside a decoder-only language model: `LLMReducer` hooks its layers.

After decoder layer K (``method.reduce_layers``) the image-token hidden states are replaced
by the method's kept/merged tokens and the sequence shrinks; every later layer gets the
rotary embeddings, position ids and key-padding mask of the kept tokens (their original
positions), so RoPE is unchanged for them; the KV cache of layers > K holds only the kept
tokens, decoding positions continue from the original length (layer 0's cache), and the
decoding mask of layers > K is re-gathered the same way, so ``generate`` works after the
reduction. Progressive methods (several reduce layers) compose. Every sample of the batch
holds the same number of image tokens (``n_img``).

Statistics: query_attn / attn_received / values / keys (recorded by the fused attention,
`tokenreduce.models.attention`), visual_attn and query_attn_norope (the layer's own q/k,
`tokenreduce.models.llm_scores`), and Need.LOOKAHEAD (the next layer's statistics on the
current states). Layer numbers that do not fit a short model are mapped from a nominal
depth (32 LLM layers; `tokenreduce.models.stages.LayerPlan`).

A method must return distinct token positions (``Reduction.index >= 0``): kept tokens keep
their own positions; a merged token takes its representative's position.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..methods.base import Context, Method, Need, Stage
from . import attention
from .llm_scores import key_bias_of_mask, layer_scores, rater_weights
from .positions import gather_positions, split_positions
from .stages import CONTEXT_FIELD, LLM_NEED_KIND, NOMINAL_DEPTH, LayerPlan, check_needs, check_reduction, \
    plan_layers, request_scores, resolve_layer

__all__ = ["LLMReducer"]

_OWN_KINDS = ("visual", "norope", "rater")   # not recordable by the attention function: computed in a pre-hook


class LLMReducer:
    """Stage.LLM reduction inside a decoder-only language model (hooks on its layers).

    ``with LLMReducer(lm, method).active(is_img, n_img, grid): model(...) / generate(...)``.
    ``lm`` is the decoder stack (``model.model.language_model``: `LlamaModel`,
    `Qwen2VLTextModel`, ...), whose ``layers`` are called with ``attention_mask``,
    ``position_ids`` and ``position_embeddings`` keyword arguments.

    Statistics: ``query_attn`` / ``attn_received`` / ``values`` / ``keys`` of a layer are
    recorded by the ``"tokenreduce"`` attention function during the forward; ``visual_attn``
    and ``query_attn_norope`` are computed from the layer's q/k in a pre-hook
    (`tokenreduce.models.llm_scores`). With `Need.LOOKAHEAD` the statistics keyed ``l + 1`` at a
    reduce call after layer ``l`` (and ``ctx.keys``) come from layer ``l + 1``'s projections on
    the current hidden states, before it runs. Layer numbers that do not fit a short model are
    mapped (`tokenreduce.models.stages.LayerPlan`, nominal depth 32 by default, ``nominal_layers``).
    """

    def __init__(self, lm: nn.Module, method: Method, part: str = "llm", nominal_layers: Optional[int] = None):
        if method.stage != Stage.LLM:
            raise ValueError(f"tokenreduce.models.vlm: {method.name} is a {method.stage.value} method, not llm")
        check_needs(method, {Need.CLS_ATTN: "an LLM has no [CLS] token (cls_attn is a vision-encoder statistic)",
                             Need.PIXELS: "pixels are not given to LLM-stage methods"})
        self.lm, self.method, self.part = lm, method, part
        self.layers = lm.layers
        self.L = len(self.layers)
        self.lookahead = Need.LOOKAHEAD in method.needs
        self.plan = plan_layers(method, self.L, nominal_layers=nominal_layers, default_nominal=NOMINAL_DEPTH["llm"],
                                reduce_top=self.L - 2 if self.lookahead else self.L - 1)
        self.reduce_at = self.plan.reduce_at()          # model layer -> nominal layers
        if not self.reduce_at:
            raise ValueError(f"tokenreduce.models.vlm: {method.name} names no LLM layer to reduce after")
        self.kinds = [k for n, k in LLM_NEED_KIND.items() if n in method.needs]
        self.look_layers = {r + 1 for r, _ in self.plan.reduce} if self.lookahead else set()
        self.rec = attention.ScoreRecorder()
        request_scores(self.rec, method, part, self.L, key_layers=[] if self.lookahead else sorted(self.reduce_at),
                       plan=self.plan, skip_layers=tuple(self.look_layers))
        for kk in list(self.rec.requests):   # visual / norope are never recorder kinds
            self.rec.requests[kk] = {k for k in self.rec.requests[kk] if k not in _OWN_KINDS}
        self.own_at: Dict[int, List[str]] = {}
        for _, r, a in self.plan.attention:
            if r not in self.look_layers:
                own = [k for k in self.kinds if k in _OWN_KINDS]
                if own:
                    self.own_at.setdefault(a, [])
                    self.own_at[a] += [k for k in own if k not in self.own_at[a]]
        self._requests = {k: v for k, v in self.rec.requests.items() if v}
        # stateful methods (VLA-Pruner): the last query row's attention at decode_attention_layers,
        # in the prefill and in every decoding step, handed to method.observe_decode
        # (layer numbers that do not fit the plan's depth are read at the nominal LLM depth)
        dec = getattr(method, "decode_attention_layers", None)
        dec = [] if dec is None else dec(self.plan.Ln)
        fits = all(-self.plan.Ln <= l < self.plan.Ln for l in dec)
        dplan = self.plan if fits else LayerPlan(self.L, max(NOMINAL_DEPTH["llm"], self.L), [], [])
        self.decode_at = {dplan.model_layer(resolve_layer(l, dplan.Ln, f"{method.name} decode")): l for l in dec}
        self._decode_requests = {(part, a): {"query"} for a in self.decode_at}
        for key, kinds in self._decode_requests.items():
            self._requests[key] = self._requests.get(key, set()) | kinds
        self.rec.requests = dict(self._requests)
        cfg = getattr(lm, "config", None)
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
        self.steps: List[Dict[str, Any]] = []

    # -- state of one prefill -----------------------------------------------------------
    def _begin(self, is_img: Tensor, n_img: int, grid) -> None:
        self.is_img0, self.n_img0, self.grid = is_img, n_img, grid
        self.seq_len0 = is_img.shape[1]
        self.cur = None            # [B, L'] original positions of the current tokens (None: all)
        self.img_pos, self.txt_pos = split_positions(is_img, n_img)
        self.layer_pos: Dict[int, Tensor] = {}   # layer -> original positions its cache holds
        self.state: Dict[str, Any] = {}
        self.steps = []
        self.in_prefill = False
        self.kw0: Dict[str, Any] = {}
        end_frame = getattr(self.method, "end_frame", None)   # a stateful method: the last request is over
        if end_frame is not None:
            end_frame()

    def _pre_hook(self, j: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if j == 0:
                prefill = h.shape[1] == self.seq_len0 and not self.layer_pos and self.cur is None
                self.in_prefill = prefill
                self.rec.requests = dict(self._requests) if prefill else dict(self._decode_requests)
                if prefill:
                    self.rec.data.clear()
                    self.kw0 = {k: kwargs.get(k) for k in ("position_embeddings", "attention_mask")}
                    if getattr(self.method, "wants_input_embeddings", False):   # VLA-Pruner's redundancy
                        self.state["input_embeddings"] = gather_positions(h, self.img_pos, 1)
                    if "rater" in self.kinds:     # SparseVLM's raters, from the LLM input
                        self.rater_txt = rater_weights(h, self.img_pos, self.txt_pos)
            if self.in_prefill:
                kw = kwargs
                if self.cur is not None:
                    self.layer_pos[j] = self.cur
                    kw = self._gather_kwargs(kwargs, self.cur, prefill=True)
                if j in self.own_at:
                    self._own_scores(module, h, kw, j)
                return None if self.cur is None else (args, kw)
            pos = self.layer_pos.get(j)
            if pos is None:
                return None
            return args, self._gather_kwargs(kwargs, pos, prefill=False)
        return hook

    def _current_kw(self) -> Dict[str, Any]:
        """position embeddings and mask of the current tokens (from layer 0's)."""
        return self.kw0 if self.cur is None else self._gather_kwargs(self.kw0, self.cur, prefill=True)

    def _scores(self, layer: nn.Module, h: Tensor, kw: Dict[str, Any], kinds) -> Dict[str, Tensor]:
        kb = key_bias_of_mask(kw.get("attention_mask"), h.shape[0], h.shape[1], h.device)
        raters = None
        if "rater" in kinds:
            raters = torch.zeros(h.shape[:2], device=h.device).scatter(1, self.txt_pos, self.rater_txt)
        return layer_scores(layer, h, kw.get("position_embeddings"), kb, self.img_pos, kinds,
                            counter=self.rec.calls, raters=raters)

    def _own_scores(self, module: nn.Module, h: Tensor, kw: Dict[str, Any], j: int) -> None:
        for kind, v in self._scores(module, h, kw, self.own_at[j]).items():
            self.rec.put(kind, self.part, j, v)

    def _gather_kwargs(self, kw: Dict[str, Any], pos: Tensor, prefill: bool) -> Dict[str, Any]:
        kw = dict(kw)
        L0 = self.seq_len0
        if prefill:
            pe = kw.get("position_embeddings")
            if pe is not None:
                kw["position_embeddings"] = tuple(gather_positions(t, pos, t.dim() - 2) for t in pe)
            pid = kw.get("position_ids")
            if pid is not None and pid.shape[-1] == L0:
                kw["position_ids"] = gather_positions(pid, pos, pid.dim() - 1)
        m = kw.get("attention_mask")
        if isinstance(m, Tensor) and m.dim() == 4:
            B = pos.shape[0]
            m = m.expand(B, *m.shape[1:])
            if m.shape[-1] >= L0:
                keys = torch.gather(m[..., :L0], 3, pos[:, None, None, :].expand(B, m.shape[1], m.shape[2], -1))
                m = torch.cat([keys, m[..., L0:]], dim=-1)
            if prefill and m.shape[-2] == L0 and L0 > 1:
                m = torch.gather(m, 2, pos[:, None, :, None].expand(B, m.shape[1], -1, m.shape[3]))
            kw["attention_mask"] = m
        elif isinstance(m, dict):
            raise NotImplementedError("tokenreduce.models.vlm: per-layer-type mask dicts are not supported")
        return kw

    def _observe(self, j: int) -> None:
        """Hand the recorded last-row attention of layer ``j`` to the method, aligned with the
        original image tokens ``[B, n_img]`` (tokens pruned before ``j`` get 0)."""
        key = ("query", self.part, j)
        v = self.rec.data.get(key) if self.in_prefill else self.rec.data.pop(key, None)
        if v is None:
            return
        B = v.shape[0]
        pos = self.layer_pos.get(j)
        if pos is None:
            pos = torch.arange(self.seq_len0, device=v.device).expand(B, self.seq_len0)
        img = self.is_img0.gather(1, pos)
        slot = (self.is_img0.long().cumsum(1) - 1).gather(1, pos).clamp_min(0)
        a = v[:, :pos.shape[1]].float() * img
        self.method.observe_decode(self.decode_at[j], a.new_zeros(B, self.n_img0).scatter_add(1, slot, a))

    def _post_hook(self, j: int):
        def hook(module, args, kwargs, out):
            if j in self.decode_at:
                self._observe(j)
            if not self.in_prefill or j not in self.reduce_at:
                return None
            h = out[0] if isinstance(out, tuple) else out
            for nominal in self.reduce_at[j]:
                h = self._reduce(h, j, nominal)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        return hook

    def _context(self, h: Tensor, layer: int, nominal: int) -> Context:
        m, img_pos = self.method, self.img_pos
        x = gather_positions(h, img_pos, 1)
        full = x.shape[1] == self.n_img0
        ctx = Context(x=x, has_cls=False, grid=self.grid if full else None, layer=nominal, num_layers=self.plan.Ln,
                      state=self.state, size=self.state.get("size"), heads=self.kv_heads,
                      lazy_tokens=True)   # `_reduce` reads a pruning Reduction's index only
        sl = lambda s: gather_positions(s, img_pos, 1)   # noqa: E731  (whole sequence -> image tokens)
        for l, r, a in self.plan.attention:
            if r in self.look_layers:
                continue
            for kind in self.kinds:
                v = self.rec.get(kind, self.part, a)
                if v is not None:
                    d = getattr(ctx, CONTEXT_FIELD[kind])
                    d[r] = sl(v)
                    d[l] = d[r]
        look_kinds = list(self.kinds)
        if Need.KEYS in m.needs:
            if self.lookahead:
                look_kinds.append("keys")
            else:
                k = self.rec.get("keys", self.part, layer)
                ctx.keys = sl(k) if k is not None else None
        if self.lookahead and nominal + 1 in self.look_layers:
            if layer + 1 >= self.L:
                raise ValueError(f"tokenreduce.models.vlm: {m.name} needs lookahead to layer {layer + 1} "
                                 f"but the LLM has {self.L} layers")
            got = self._scores(self.layers[layer + 1], h, self._current_kw(), look_kinds)
            for l, r, a in self.plan.attention:
                if r != nominal + 1:
                    continue
                for kind in self.kinds:
                    d = getattr(ctx, CONTEXT_FIELD[kind])
                    d[r] = sl(got[kind])
                    d[l] = d[r]
            if "keys" in got:
                ctx.keys = sl(got["keys"])
        if Need.TEXT in m.needs:
            ctx.text = gather_positions(h, self.txt_pos, 1)
        return ctx

    def _reduce(self, h: Tensor, layer: int, nominal: Optional[int] = None) -> Tensor:
        m = self.method
        nominal = layer if nominal is None else nominal
        img_pos, txt_pos = self.img_pos, self.txt_pos
        ctx = self._context(h, layer, nominal)
        x = ctx.x
        red = m(ctx)
        check_reduction(m, x, red, f"after LLM layer {layer}")
        K = red.index.shape[1]
        kept_img = img_pos.gather(1, red.index.clamp_min(0))             # positions in the current sequence
        if not red.kept_rows:   # merged / synthesised tokens replace their representatives' rows
            h = h.scatter(1, kept_img.unsqueeze(-1).expand(-1, -1, h.shape[-1]), red.tokens.to(h.dtype))
        keep = torch.cat([txt_pos, kept_img], dim=1).sort(dim=1).values  # [B, L'] current positions
        h = gather_positions(h, keep, 1)
        cur = keep if self.cur is None else self.cur.gather(1, keep)
        is_img_cur = self.is_img0.gather(1, cur)
        self.img_pos, self.txt_pos = split_positions(is_img_cur, K)
        self.cur = cur
        self.state["size"] = red.size
        self.rec.reindex(self.part, keep)
        self.steps.append({"stage": "llm", "layer": layer, "method_layer": nominal, "tokens_in": int(x.shape[1]),
                           "tokens_out": K})
        return h

    def begin(self, is_img: Tensor, n_img: int, grid=None) -> None:
        """Start one request (its prefill, then its decoding steps): ``is_img`` bool ``[B, L]``
        of the prefill input, ``n_img`` image tokens per sample."""
        self._begin(is_img, n_img, grid)

    def install(self) -> List[Any]:
        """Put the hooks on the decoder layers (they stay until each handle's ``remove()``);
        `begin` starts each request, and the forwards run inside ``attention.recording(rec)``."""
        attention.register()
        attention.tag_layers(self.layers, self.part)
        hs = []
        for j, layer in enumerate(self.layers):
            hs.append(layer.register_forward_pre_hook(self._pre_hook(j), with_kwargs=True))
            hs.append(layer.register_forward_hook(self._post_hook(j), with_kwargs=True))
        return hs

    @contextlib.contextmanager
    def active(self, is_img: Tensor, n_img: int, grid=None):
        """Install the hooks for one request (prefill + decoding steps)."""
        self._begin(is_img, n_img, grid)
        hs = self.install()
        try:
            with attention.recording(self.rec):
                yield self
        finally:
            for h in hs:
                h.remove()
            self.rec.requests = dict(self._requests)
