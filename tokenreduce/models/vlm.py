"""Token reduction in vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL.

Two places (the method's ``stage`` picks one):

* **PROJECTOR** (between encoder and LLM): the image features are reduced before they are
  inserted, and the inputs are rebuilt consistently: each sample's run of image tokens in
  ``input_ids`` is cut to the kept count, ``attention_mask`` follows, and for Qwen2-VL the
  3D (t, h, w) M-RoPE position ids of the kept tokens are their *original* grid positions
  (computed by the model's ``get_rope_index`` on the full input, then gathered), with the
  ``rope_deltas`` of later decoding steps recomputed for the shorter sequence.
* **LLM** (inside the language model, after decoder layer K): `LLMReducer` hooks the decoder
  layers. After layer K (``method.reduce_layers``) the image-token hidden states are replaced
  by the method's kept/merged tokens and the sequence shrinks; every later layer gets the
  rotary embeddings, position ids and key-padding mask of the kept tokens (their original
  positions), so RoPE is unchanged for them; the KV cache of layers > K holds only the kept
  tokens, decoding positions continue from the original length (layer 0's cache), and the
  decoding mask of layers > K is re-gathered the same way, so ``generate`` works after the
  reduction. Progressive methods (several reduce layers) compose.

Batches: every sample keeps the same number of image tokens (a static budget), so the batch
stays rectangular. Inputs are left-padded (as ``generate`` wants); padding keys are masked by
a ``-inf`` key bias and padded query rows produce zeros. The LLM stage needs the same number
of image tokens in every sample of the batch (true for LLaVA-1.5; for Qwen2-VL with different
grids or LLaVA-NeXT with different tile counts, reduce at the PROJECTOR stage to a common
budget first, or batch equal sizes). Counting image tokens per sample while assembling the
inputs reads a small count from the device (outside the timed reduction); the reductions
themselves are batched gathers with no host sync.

Statistics and layers: the LLM stage provides query_attn / attn_received / values / keys
(recorded by the fused attention), visual_attn and query_attn_norope (the layer's own q/k,
`tokenreduce.models.llm_scores`), and Need.LOOKAHEAD (the next layer's statistics on the
current states). Layer numbers that do not fit a short model (``--layers``) are mapped from a
nominal depth (32 LLM / 24 vision layers; `tokenreduce.models.vit.LayerPlan`): e.g.
PyramidDrop's 8/16/24 run after layers 0/1/2 of a 4-layer LLM, and stages landing on the same
layer run one after the other there. PROJECTOR padding slots (size 0) become masked positions
(attention_mask 0). LLaVA-NeXT: a VIT / PROJECTOR method needing vision-tower statistics, the
grid or pixels runs per anyres tile (budget per tile, tiles concatenated); features-only
methods run on the packed features. Qwen2-VL's vision tower gives features only (no [CLS]):
methods needing [CLS] / attention statistics there raise a clear error.

An LLM-stage method must return distinct token positions (``Reduction.index >= 0``): kept
tokens keep their own positions; a merged token takes its representative's position.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..methods.base import Context, Method, Need, Reduction, Stage
from . import attention as A
from .llm_scores import key_bias_of_mask, layer_scores
from .vit import (NOMINAL_DEPTH, _check_method, _resolve, check_needs, fill_context_scores, plan_layers,  # noqa: F401
                  request_scores, run_vision)

__all__ = ["LLMReducer", "VLMRunner", "greedy_generate", "split_positions", "cut_image_tokens"]


def split_positions(is_img: Tensor, n_img: int) -> Tuple[Tensor, Tensor]:
    """``is_img`` bool ``[B, L]`` with ``n_img`` image tokens per row -> (image positions
    ``[B, n_img]``, other positions ``[B, L - n_img]``), both ascending (stable sort, no sync)."""
    order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices
    return order[:, :n_img], order[:, n_img:]


def cut_image_tokens(is_img: Tensor, n_img: int, keep: int) -> Tensor:
    """Positions ``[B, L - n_img + keep]`` kept when each row's run of ``n_img`` image tokens
    is cut to its first ``keep`` (ascending)."""
    rank = is_img.long().cumsum(1) - 1
    drop = is_img & (rank >= keep)
    L = is_img.shape[1]
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    return order[:, :L - n_img + keep]


def _gather_seq(t: Tensor, pos: Tensor, dim: int) -> Tensor:
    """Gather ``pos`` ``[B, L']`` along the sequence dim ``dim`` of ``t`` (batch at dim-1,
    broadcast batch of 1 expanded)."""
    B = pos.shape[0]
    shape = list(t.shape)
    bdim = dim - 1
    if shape[bdim] != B:
        shape[bdim] = B
        t = t.expand(*shape)
    idx_shape = [1] * t.dim()
    idx_shape[bdim] = B
    idx_shape[dim] = pos.shape[1]
    idx = pos.view(idx_shape)
    expand = list(t.shape)
    expand[dim] = pos.shape[1]
    return torch.gather(t, dim, idx.expand(expand))


_LLM_NEED_KIND = {Need.QUERY_ATTN: "query", Need.ATTN_RECEIVED: "received", Need.VISUAL_ATTN: "visual",
                  Need.QUERY_ATTN_NOROPE: "norope", Need.VALUES: "values"}
_LLM_CTX_FIELD = {"query": "query_attn", "received": "attn_received", "visual": "visual_attn",
                  "norope": "query_attn_norope", "values": "values"}
_OWN_KINDS = ("visual", "norope")   # not recordable by the attention function: computed in a pre-hook


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
    mapped (`tokenreduce.models.vit.LayerPlan`, nominal depth 32 by default, ``nominal_layers``).
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
        self.kinds = [k for n, k in _LLM_NEED_KIND.items() if n in method.needs]
        self.look_layers = {r + 1 for r, _ in self.plan.reduce} if self.lookahead else set()
        self.rec = A.ScoreRecorder()
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

    def _pre_hook(self, j: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if j == 0:
                prefill = h.shape[1] == self.seq_len0 and not self.layer_pos and self.cur is None
                self.in_prefill = prefill
                self.rec.requests = dict(self._requests) if prefill else {}
                if prefill:
                    self.rec.data.clear()
                    self.kw0 = {k: kwargs.get(k) for k in ("position_embeddings", "attention_mask")}
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
        return layer_scores(layer, h, kw.get("position_embeddings"), kb, self.img_pos, kinds,
                            counter=self.rec.calls)

    def _own_scores(self, module: nn.Module, h: Tensor, kw: Dict[str, Any], j: int) -> None:
        for kind, v in self._scores(module, h, kw, self.own_at[j]).items():
            self.rec.put(kind, self.part, j, v)

    def _gather_kwargs(self, kw: Dict[str, Any], pos: Tensor, prefill: bool) -> Dict[str, Any]:
        kw = dict(kw)
        L0 = self.seq_len0
        if prefill:
            pe = kw.get("position_embeddings")
            if pe is not None:
                kw["position_embeddings"] = tuple(_gather_seq(t, pos, t.dim() - 2) for t in pe)
            pid = kw.get("position_ids")
            if pid is not None and pid.shape[-1] == L0:
                kw["position_ids"] = _gather_seq(pid, pos, pid.dim() - 1)
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

    def _post_hook(self, j: int):
        def hook(module, args, kwargs, out):
            if not self.in_prefill or j not in self.reduce_at:
                return None
            h = out[0] if isinstance(out, tuple) else out
            for nominal in self.reduce_at[j]:
                h = self._reduce(h, j, nominal)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        return hook

    def _context(self, h: Tensor, layer: int, nominal: int) -> Context:
        m, img_pos = self.method, self.img_pos
        x = _gather_seq(h, img_pos, 1)
        full = x.shape[1] == self.n_img0
        ctx = Context(x=x, has_cls=False, grid=self.grid if full else None, layer=nominal, num_layers=self.plan.Ln,
                      state=self.state, size=self.state.get("size"), heads=self.kv_heads)
        sl = lambda s: _gather_seq(s, img_pos, 1)   # noqa: E731  (whole sequence -> image tokens)
        for l, r, a in self.plan.attention:
            if r in self.look_layers:
                continue
            for kind in self.kinds:
                v = self.rec.get(kind, self.part, a)
                if v is not None:
                    d = getattr(ctx, _LLM_CTX_FIELD[kind])
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
                    d = getattr(ctx, _LLM_CTX_FIELD[kind])
                    d[r] = sl(got[kind])
                    d[l] = d[r]
            if "keys" in got:
                ctx.keys = sl(got["keys"])
        if Need.TEXT in m.needs:
            ctx.text = _gather_seq(h, self.txt_pos, 1)
        return ctx

    def _reduce(self, h: Tensor, layer: int, nominal: Optional[int] = None) -> Tensor:
        m = self.method
        nominal = layer if nominal is None else nominal
        img_pos, txt_pos = self.img_pos, self.txt_pos
        ctx = self._context(h, layer, nominal)
        x = ctx.x
        red = m(ctx)
        _check_method(m, x, red, f"after LLM layer {layer}")
        K = red.tokens.shape[1]
        kept_img = img_pos.gather(1, red.index.clamp_min(0))             # positions in the current sequence
        h = h.scatter(1, kept_img.unsqueeze(-1).expand(-1, -1, h.shape[-1]), red.tokens.to(h.dtype))
        keep = torch.cat([txt_pos, kept_img], dim=1).sort(dim=1).values  # [B, L'] current positions
        h = _gather_seq(h, keep, 1)
        cur = keep if self.cur is None else self.cur.gather(1, keep)
        is_img_cur = self.is_img0.gather(1, cur)
        self.img_pos, self.txt_pos = split_positions(is_img_cur, K)
        self.cur = cur
        self.state["size"] = red.size
        self.rec.reindex(self.part, keep)
        self.steps.append({"stage": "llm", "layer": layer, "method_layer": nominal, "tokens_in": int(x.shape[1]),
                           "tokens_out": K})
        return h

    @contextlib.contextmanager
    def active(self, is_img: Tensor, n_img: int, grid=None):
        """Install the hooks for one request (prefill + decoding steps)."""
        A.register()
        A.tag_layers(self.layers, self.part)
        self._begin(is_img, n_img, grid)
        hs = []
        for j, layer in enumerate(self.layers):
            hs.append(layer.register_forward_pre_hook(self._pre_hook(j), with_kwargs=True))
            hs.append(layer.register_forward_hook(self._post_hook(j), with_kwargs=True))
        try:
            with A.recording(self.rec):
                yield self
        finally:
            for h in hs:
                h.remove()
            self.rec.requests = dict(self._requests)


@torch.no_grad()
def greedy_generate(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int,
                    position_ids: Optional[Tensor] = None, next_position: Optional[Tensor] = None) -> Tensor:
    """A plain greedy loop with a KV cache (used where ``generate``'s own position logic
    cannot be told about reduced M-RoPE positions): ``[B, max_new_tokens]`` token ids.
    ``position_ids`` are the prefill positions (``[3, B, L]`` for M-RoPE), ``next_position``
    ``[B]`` the position of the first generated token."""
    from transformers import DynamicCache
    B = inputs_embeds.shape[0]
    cache = DynamicCache(config=model.config.get_text_config())
    out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks = [out.logits[:, -1].argmax(-1)]
    embed = model.get_input_embeddings()
    mask = attention_mask
    nxt = next_position
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pid = None
        if nxt is not None:
            pid = nxt.view(1, B, 1).expand(3, B, 1) if position_ids is not None and position_ids.dim() == 3 \
                else nxt.view(B, 1)
            nxt = nxt + 1
        out = model(inputs_embeds=embed(toks[-1][:, None]), attention_mask=mask, position_ids=pid,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, dim=1)


@dataclass
class Prepared:
    """Inputs of the LLM after the vision part (and any PROJECTOR reduction)."""
    inputs_embeds: Tensor
    attention_mask: Tensor
    is_img: Tensor                      # bool [B, L]
    n_img: int                          # image tokens per sample
    position_ids: Optional[Tensor] = None      # [3, B, L] for M-RoPE
    next_position: Optional[Tensor] = None     # [B] M-RoPE text position of the next token
    grid: Optional[Tuple[int, int]] = None
    steps: List[Dict[str, Any]] = field(default_factory=list)
    vision: Any = None


class VLMRunner:
    """Full / reduced forward and generation for LLaVA-1.5 (`LlavaForConditionalGeneration`),
    LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and Qwen2-VL / Qwen2.5-VL.

        r = VLMRunner(model, method)                # method None: the full model
        logits = r.next_token_logits(**batch)       # [B, V]
        ids = r.generate(max_new_tokens=8, **batch)
    """

    def __init__(self, model: nn.Module, method: Optional[Method] = None, nominal_layers: Optional[int] = None,
                 vision_nominal_layers: Optional[int] = None):
        """``nominal_layers`` / ``vision_nominal_layers``: the LLM / vision-tower depth the
        method's layer numbers refer to (default: the model's when they fit, else 32 / 24;
        see `tokenreduce.models.vit.LayerPlan`)."""
        self.model, self.method = model, method
        self.vision_nominal = vision_nominal_layers
        name = type(model).__name__
        if name.startswith("LlavaNext"):
            self.kind = "llava-next"
        elif name.startswith("Llava"):
            self.kind = "llava"
        elif name.startswith("Qwen2VL") or name.startswith("Qwen2_5_VL"):
            self.kind = "qwen2-vl"
        else:
            raise TypeError(f"tokenreduce.models.vlm: unsupported model {name}")
        self.cfg = model.config
        self.image_token = self.cfg.image_token_id
        self.lm = model.model.language_model
        if method is not None and (method.stage == Stage.LLM or method.needs & {
                Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.QUERY_ATTN, Need.KEYS}):
            A.register()
            model.set_attn_implementation(A.NAME)
        self.llm_reducer = (LLMReducer(self.lm, method, nominal_layers=nominal_layers)
                            if method is not None and method.stage == Stage.LLM else None)
        if method is not None and method.stage == Stage.PROJECTOR and self.kind == "qwen2-vl":
            check_needs(method, {
                Need.CLS_ATTN: f"{name}'s vision tower has no [CLS] token (no cls_attn to give); run it on "
                               "LLaVA-1.5 / LLaVA-NeXT or a CLIP / DINOv2 encoder",
                Need.ATTN_RECEIVED: f"attention statistics of {name}'s vision tower (windowed, pre-merge patches) "
                                    "are not collected; only features / grid / text are given",
                Need.VALUES: f"attention values of {name}'s vision tower are not collected",
                Need.KEYS: f"attention keys of {name}'s vision tower are not collected"})
        if method is not None and method.stage == Stage.VIT and self.kind == "qwen2-vl":
            raise NotImplementedError(f"tokenreduce.models.vlm: Stage.VIT methods run in the CLIP towers of "
                                      f"LLaVA-1.5 / LLaVA-NeXT (per tile) and in vision encoders; not in {name}'s "
                                      "windowed vision tower")
        if method is not None and method.stage == Stage.LLM and self.kind == "llava-next":
            check_needs(method, {Need.GRID: "LLaVA-NeXT's packed anyres image tokens (tiles, unpadding, row "
                                            "newline tokens) have no single patch grid"})

    # -- inputs -----------------------------------------------------------------------
    def _n_img(self, is_img: Tensor) -> int:
        counts = is_img.sum(1)
        n = int(counts[0])                     # input assembly, outside the timed reduction
        if not bool((counts == n).all()):
            raise ValueError(f"tokenreduce.models.vlm: samples hold different image-token counts "
                             f"{counts.tolist()}; the batch must keep one count per sample")
        return n

    @torch.no_grad()
    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, **extra) -> Prepared:
        if self.kind == "llava":
            return self._prepare_llava(input_ids, attention_mask, pixel_values)
        if self.kind == "qwen2-vl":
            return self._prepare_qwen(input_ids, attention_mask, pixel_values, **extra)
        return self._prepare_generic(input_ids, attention_mask, pixel_values, **extra)

    def _text(self, input_ids: Tensor, is_img: Tensor, n_img: int) -> Optional[Tensor]:
        """Need.TEXT at the PROJECTOR stage: the LLM input embeddings of the non-image tokens
        ``[B, T, D_llm]`` (left padding included, as in the input)."""
        if self.method is None or Need.TEXT not in self.method.needs:
            return None
        _, txt = split_positions(is_img, n_img)
        return self.model.get_input_embeddings()(input_ids.gather(1, txt))

    @staticmethod
    def _mask_padding(attention_mask: Tensor, is_img: Tensor, K: int, size: Optional[Tensor]) -> Tensor:
        """Padding slots (size 0) of a PROJECTOR reduction become masked positions."""
        if size is None:
            return attention_mask
        img_pos, _ = split_positions(is_img, K)
        pad = (size <= 0).to(attention_mask.dtype)
        return attention_mask.scatter(1, img_pos, attention_mask.gather(1, img_pos) * (1 - pad))

    def _projector_cut(self, input_ids, attention_mask, is_img, n_img, keep):
        pos = cut_image_tokens(is_img, n_img, keep)
        return pos, input_ids.gather(1, pos), attention_mask.gather(1, pos)

    def _prepare_llava(self, input_ids, attention_mask, pixel_values) -> Prepared:
        m, cfg = self.model, self.cfg
        if not isinstance(cfg.vision_feature_layer, int):
            raise NotImplementedError("tokenreduce.models.vlm: a list of vision feature layers is not supported")
        vm = self.method if self.method is not None and self.method.stage in (Stage.VIT, Stage.PROJECTOR) else None
        if vm is not None and vm.needs & {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS}:
            A.register()
            m.model.vision_tower.set_attn_implementation(A.NAME)
        is_img = input_ids == self.image_token
        n_img = self._n_img(is_img)
        vis = run_vision(m.model.vision_tower, pixel_values.to(m.dtype), vm, feature_layer=cfg.vision_feature_layer,
                         nominal_layers=self.vision_nominal, text=self._text(input_ids, is_img, n_img))
        feats = vis.features
        size = vis.reduction.size if vis.reduction is not None else None
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
            size = size[:, 1:] if size is not None else None
        feats = m.model.multi_modal_projector(feats)
        K = feats.shape[1]
        if K > n_img:
            raise ValueError(f"tokenreduce.models.vlm: {K} image features for {n_img} image tokens")
        if K < n_img:
            _, input_ids, attention_mask = self._projector_cut(input_ids, attention_mask, is_img, n_img, K)
            is_img = input_ids == self.image_token
        emb = m.get_input_embeddings()(input_ids)
        img_pos, _ = split_positions(is_img, K)
        emb = emb.scatter(1, img_pos.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), feats.to(emb.dtype))
        attention_mask = self._mask_padding(attention_mask, is_img, K, size)
        return Prepared(emb, attention_mask, is_img, K, grid=vis.grid if K == vis.grid[0] * vis.grid[1] else None,
                        steps=vis.steps, vision=vis)

    def _prepare_generic(self, input_ids, attention_mask, pixel_values, **extra) -> Prepared:
        """LLaVA-NeXT: the model's own anyres feature path; a PROJECTOR method then reduces
        each image's packed features (tiles + newline tokens) to its budget."""
        m = self.model
        meth = self.method
        if meth is not None and meth.stage in (Stage.VIT, Stage.PROJECTOR) and (
                meth.stage == Stage.VIT or meth.needs & {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS,
                                                         Need.GRID, Need.PIXELS}):
            return self._prepare_next_tiles(input_ids, attention_mask, pixel_values, extra["image_sizes"])
        feats = m.model.get_image_features(pixel_values=pixel_values, image_sizes=extra["image_sizes"],
                                           vision_feature_layer=self.cfg.vision_feature_layer,
                                           vision_feature_select_strategy=self.cfg.vision_feature_select_strategy)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        if isinstance(feats, (list, tuple)):
            n = {f.shape[0] for f in feats}
            if len(n) != 1 and self.method is not None and self.method.stage == Stage.PROJECTOR:
                raise ValueError("tokenreduce.models.vlm: images with different tile counts: the PROJECTOR "
                                 f"budget is applied per image, got feature counts {sorted(n)}; they must be equal "
                                 "per batch here (batch equal tile counts)")
            feats = torch.stack(list(feats)) if len(n) == 1 else feats
        steps = []
        size = None
        is_img = input_ids == self.image_token
        n_img = self._n_img(is_img)
        if self.method is not None and self.method.stage == Stage.PROJECTOR:
            ctx = Context(x=feats, has_cls=False, text=self._text(input_ids, is_img, n_img))
            red = self.method(ctx)
            _check_method(self.method, feats, red, "on the projected image features")
            steps.append({"stage": "projector", "layer": None, "tokens_in": feats.shape[1],
                          "tokens_out": red.tokens.shape[1]})
            feats, size = red.tokens, red.size
        K = feats.shape[1]
        if K < n_img:
            _, input_ids, attention_mask = self._projector_cut(input_ids, attention_mask, is_img, n_img, K)
            is_img = input_ids == self.image_token
        emb = m.get_input_embeddings()(input_ids)
        img_pos, _ = split_positions(is_img, K)
        emb = emb.scatter(1, img_pos.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), feats.to(emb.dtype))
        attention_mask = self._mask_padding(attention_mask, is_img, K, size)
        return Prepared(emb, attention_mask, is_img, K, steps=steps)

    def _prepare_next_tiles(self, input_ids, attention_mask, pixel_values, image_sizes) -> Prepared:
        """LLaVA-NeXT with a VIT / PROJECTOR method that needs the vision tower ([CLS] attention,
        attention received, values, keys, the patch grid, pixels): the method runs on every
        anyres tile (base image + crops, batched as ``B * tiles`` images, each a full patch grid
        with [CLS]), with its budget per tile; the kept tokens of the tiles are concatenated in
        tile order (the spatial unpadding and row-newline tokens of the full path do not apply
        to a reduced set, as in VisionZip's LLaVA-NeXT integration)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        m, cfg = self.model, self.cfg
        tiles = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for s in image_sizes.tolist()]
        if len(set(tiles)) != 1:
            raise ValueError(f"tokenreduce.models.vlm: images with different tile counts {tiles}: batch equal "
                             "tile counts for a per-tile method")
        t = tiles[0]
        B = pixel_values.shape[0]
        px = pixel_values[:, :t].reshape(B * t, *pixel_values.shape[2:]).to(m.dtype)
        vm = self.method
        if vm.needs & {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS}:
            A.register()
            m.model.vision_tower.set_attn_implementation(A.NAME)
        is_img = input_ids == self.image_token
        n_img = self._n_img(is_img)
        text = self._text(input_ids, is_img, n_img)
        vis = run_vision(m.model.vision_tower, px, vm, feature_layer=cfg.vision_feature_layer,
                         nominal_layers=self.vision_nominal,
                         text=text.repeat_interleave(t, dim=0) if text is not None else None)
        feats = vis.features
        size = vis.reduction.size if vis.reduction is not None else torch.ones(feats.shape[:2], device=feats.device)
        if cfg.vision_feature_select_strategy == "default":
            feats, size = feats[:, 1:], size[:, 1:]
        feats = m.model.multi_modal_projector(feats)
        feats = feats.reshape(B, -1, feats.shape[-1])
        size = size.reshape(B, -1)
        K = feats.shape[1]
        if K > n_img:
            raise ValueError(f"tokenreduce.models.vlm: {K} image features for {n_img} image tokens")
        if K < n_img:
            _, input_ids, attention_mask = self._projector_cut(input_ids, attention_mask, is_img, n_img, K)
            is_img = input_ids == self.image_token
        emb = m.get_input_embeddings()(input_ids)
        img_pos, _ = split_positions(is_img, K)
        emb = emb.scatter(1, img_pos.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), feats.to(emb.dtype))
        attention_mask = self._mask_padding(attention_mask, is_img, K, size)
        steps = [dict(st, tiles=t) for st in vis.steps]
        return Prepared(emb, attention_mask, is_img, K, steps=steps, vision=vis)

    def _prepare_qwen(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids=None,
                      **_) -> Prepared:
        m = self.model
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token).int()
        pos, _deltas = m.model.get_rope_index(input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None,
                                              attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
        out = m.model.get_image_features(pixel_values, image_grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        merge = self.cfg.vision_config.spatial_merge_size
        thw = image_grid_thw.tolist()                     # host metadata from the processor
        counts = [t * (h // merge) * (w // merge) for t, h, w in thw]
        if len(feats) == 1 and len(counts) > 1:
            feats = list(torch.split(feats[0], counts))
        is_img = input_ids == self.image_token
        steps: List[Dict[str, Any]] = []
        grid = None
        if self.method is not None and self.method.stage == Stage.PROJECTOR:
            keep = self.method.keep_tokens(min(counts))
            if len(set(counts)) == 1:
                x = torch.stack(feats)
                t, h, w = thw[0]
                grid = (h // merge, w // merge) if t == 1 else None
                red = self.method(Context(x=x, has_cls=False, grid=grid,
                                          text=self._text(input_ids, is_img, counts[0])))
                _check_method(self.method, x, red, "on the merged image features")
                red_tokens, red_index, red_size = red.tokens, red.index, red.size
            else:
                # different grids: pad the features to the largest image and mask nothing the
                # method can see; one method call per distinct size keeps the method batched.
                red_tokens = feats[0].new_empty(len(feats), keep, feats[0].shape[-1])
                red_index = torch.empty(len(feats), keep, dtype=torch.long, device=feats[0].device)
                red_size = torch.ones(len(feats), keep, device=feats[0].device)
                for n in sorted(set(counts)):
                    rows = [i for i, c in enumerate(counts) if c == n]
                    x = torch.stack([feats[i] for i in rows])
                    r = self.method.__class__(keep=keep, **self.method.opts)(Context(x=x, has_cls=False))
                    _check_method(self.method, x, r, "on the merged image features")
                    red_tokens[rows] = r.tokens
                    red_index[rows] = r.index
                    red_size[rows] = r.size.float()
            if red_tokens.shape[1] != keep:
                raise ValueError(f"tokenreduce.models.vlm: {self.method.name} returned {red_tokens.shape[1]} tokens, "
                                 f"expected {keep}")
            steps.append({"stage": "projector", "layer": None, "tokens_in": counts, "tokens_out": keep})
            # keep the kept tokens' own (t, h, w) positions: gather them before cutting
            n_max = max(counts)
            B, L = input_ids.shape
            rank = is_img.long().cumsum(1) - 1
            # image positions per sample (padded with the last one for smaller images)
            order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices[:, :n_max]
            # padding slots (index -1) take distinct unused image positions (then masked)
            valid = red_index >= 0
            used = torch.zeros(B, n_max + 1, dtype=torch.int8, device=red_index.device).scatter(
                1, torch.where(valid, red_index, torch.full_like(red_index, n_max)), 1)[:, :n_max]
            free = torch.sort(used, dim=1, stable=True).indices
            pad_rank = ((~valid).long().cumsum(1) - 1).clamp(0, n_max - 1)
            red_index = torch.where(valid, red_index, free.gather(1, pad_rank))
            srt = red_index.sort(dim=1)
            kept_img_pos = order.gather(1, srt.values)
            red_tokens = red_tokens.gather(1, srt.indices.unsqueeze(-1).expand(-1, -1, red_tokens.shape[-1]))
            red_size = red_size.float().gather(1, srt.indices)
            keep_mask = ~is_img
            keep_mask = keep_mask.scatter(1, kept_img_pos, torch.ones_like(kept_img_pos, dtype=torch.bool))
            Lp = int(keep_mask.sum(1).max())              # equal per row unless sizes differ (then pad)
            key = (~keep_mask).to(torch.int8)
            sel = torch.sort(key, dim=1, stable=True).indices[:, :Lp].sort(dim=1).values
            # rows with fewer kept tokens (smaller text) are left-padded by rolling pads in front
            input_ids = input_ids.gather(1, sel)
            attention_mask = attention_mask.gather(1, sel) & keep_mask.gather(1, sel).to(attention_mask.dtype)
            pos = _gather_seq(pos, sel, 2)
            is_img = keep_mask.gather(1, sel) & (input_ids == self.image_token)
            feats_cat = red_tokens
            n_img = keep
            attention_mask = self._mask_padding(attention_mask, is_img, keep, red_size)
        else:
            n_img = self._n_img(is_img) if len(set(counts)) == 1 else None
            feats_cat = torch.stack(feats) if len(set(counts)) == 1 else None
            t, h, w = thw[0]
            grid = (h // merge, w // merge) if len(set(counts)) == 1 and t == 1 else None
            if feats_cat is None:
                emb = m.get_input_embeddings()(input_ids)
                emb = emb.masked_scatter(is_img.unsqueeze(-1), torch.cat(feats).to(emb.dtype))
                nxt = self._next_pos(pos, attention_mask)
                return Prepared(emb, attention_mask, is_img, -1, pos, nxt, None, steps)
        emb = m.get_input_embeddings()(input_ids)
        img_pos, _ = split_positions(is_img, n_img)
        emb = emb.scatter(1, img_pos.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), feats_cat.to(emb.dtype))
        return Prepared(emb, attention_mask, is_img, n_img, pos, self._next_pos(pos, attention_mask), grid, steps)

    @staticmethod
    def _next_pos(pos: Tensor, attention_mask: Tensor) -> Tensor:
        p = pos.masked_fill(~attention_mask.bool().unsqueeze(0), -1)
        return p.amax(dim=(0, 2)) + 1

    # -- running ------------------------------------------------------------------------
    def _ctx(self, p: Prepared):
        if self.llm_reducer is None:
            return contextlib.nullcontext()
        if p.n_img < 0:
            raise ValueError("tokenreduce.models.vlm: the LLM stage needs the same image-token count per sample")
        return self.llm_reducer.active(p.is_img, p.n_img, p.grid)

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask, pixel_values, **extra) -> Tensor:
        p = self.prepare(input_ids, attention_mask, pixel_values, **extra)
        self.last = p
        with self._ctx(p):
            out = self.model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask,
                             position_ids=p.position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int = 8, **extra) -> Tensor:
        """Greedy generation, ``[B, max_new_tokens]``. LLaVA uses transformers' ``generate``;
        Qwen2-VL a plain greedy loop (`greedy_generate`) that carries the reduced M-RoPE positions."""
        p = self.prepare(input_ids, attention_mask, pixel_values, **extra)
        self.last = p
        with self._ctx(p):
            if p.position_ids is None:
                return self.model.generate(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask,
                                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=0)
            return greedy_generate(self.model, p.inputs_embeds, p.attention_mask, max_new_tokens,
                                   position_ids=p.position_ids, next_position=p.next_position)
