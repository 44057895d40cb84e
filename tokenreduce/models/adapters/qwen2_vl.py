"""Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

The vision tower (packed ``[sum N_i, D]`` patches, windowed in Qwen2.5-VL, 2x2 patch merger)
runs with the window layout computed on the host from the grid (`qwen_vision.WindowLayout`:
the processor's CPU ``image_grid_thw`` needs no read-back; a device grid, or ``grid_host=`` a
list, is the caller's choice). PROJECTOR methods run on each image's merged features, with the
tower's statistics when they need them (`tokenreduce.models.qwen_vision`: attention received,
keys and values of the declared vision blocks from the fused op, per merged token: attention
summed over the 2x2 group, keys / values averaged):

* Need.ATTN_RECEIVED, Need.KEYS, Need.VALUES: given (windowed blocks: the window-local
  attention, see `qwen_vision`);
* Need.CLS_ATTN (the towers have no [CLS]): the *mean attention received* of the same block
  is the documented substitute; the method sees a synthetic [CLS] slot in front (features,
  keys and values the image means, score 0) that is dropped after it, so it keeps exactly its
  budget of image tokens;
* Need.PIXELS is refused (the tower's input is flattened patches); VIT methods are refused.

Budgets for dynamic resolution: ``keep=K`` is a count per image (an error when an image has
fewer merged tokens), ``ratio=r`` keeps ``round(r * N_i)`` of each image's ``N_i`` merged
tokens (the literature's 33.3 / 22.2 / 11.1 % for Qwen2.5-VL: ``ratio=1/3, 2/9, 1/9``); rows
with fewer kept tokens are padded with masked positions.

The 3D (t, h, w) M-RoPE position ids come from the model's ``get_rope_index`` on the full
input; a PROJECTOR reduction keeps the kept tokens' *original* positions (gathered before the
image-token runs are cut; ``Prepared.vision.kept_positions`` are the kept original sequence
positions) and the next decoding position is recomputed for the shorter sequence
(`next_position`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...methods.base import Context, Need, Stage
from .. import attention, qwen_vision
from ..positions import gather_positions
from ..stages import CONTEXT_FIELD, NOMINAL_DEPTH, check_needs, check_reduction, plan_layers
from .base import ModelParts, Prepared, VLMAdapter

__all__ = ["Qwen2VLAdapter", "QwenVision", "next_position", "rope_positions", "TOWER_NEED_KIND"]

# need -> what the Qwen vision attention records for it ("cls": the mean attention received)
TOWER_NEED_KIND = {Need.CLS_ATTN: "cls", Need.ATTN_RECEIVED: "received", Need.VALUES: "values"}
PAD = -2        # index of a padding slot (a row keeping fewer tokens than the longest row)


def tower_context(method, x: Tensor, shape: Tuple[int, int, int], stat_of, plan, key_layer: int, heads: int,
                  text: Optional[Tensor] = None) -> Context:
    """The method's `Context` for images of one merged grid ``shape`` = (t, h, w): features ``x``
    ``[B, M, D]``, ``stat_of(kind, layer)`` ``[B, M, ...]`` per merged token for the blocks of
    ``plan`` (`stages.plan_layers`) and the keys of block ``key_layer``; with Need.CLS_ATTN a
    synthetic [CLS] slot in front (features, keys and values the means, scores 0). Shared by
    `Qwen2VLAdapter` and the vLLM plugin (`tokenreduce.vllm.qwen_reduce`)."""
    t, gh, gw = shape
    cls = Need.CLS_ATTN in method.needs

    def stat(kind, layer, fill):
        v = stat_of(kind, layer)
        if not cls:
            return v
        first = v.mean(dim=1, keepdim=True) if fill == "mean" else torch.zeros_like(v[:, :1])
        return torch.cat([first, v], dim=1)

    ctx = Context(x=torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) if cls else x, has_cls=cls, cls_synthetic=cls,
                  grid=(gh, gw) if t == 1 else None, text=text, heads=heads)
    if not set(TOWER_NEED_KIND) & method.needs and Need.KEYS not in method.needs:
        return ctx
    ctx.num_layers = plan.Ln
    for l, r, a in plan.attention:
        for need, kind in TOWER_NEED_KIND.items():
            if need in method.needs:
                d = getattr(ctx, CONTEXT_FIELD[kind])
                d[r] = stat(kind, a, "mean" if kind == "values" else "zero")
                d[l] = d[r]
    if Need.KEYS in method.needs:
        ctx.keys = stat("keys", key_layer, "mean")
    return ctx


def rope_positions(is_img: Tensor, attention_mask: Tensor, image_grid_thw: Tensor, merge: int) -> Tensor:
    """The M-RoPE position ids ``[3, B, L]`` of rows holding one image each (``image_grid_thw``
    ``[B, 3]`` on the device, in row order), as the model's ``get_rope_index`` computes them,
    from device ops only (no read-back): counting only unmasked tokens (rank ``q``), text before
    the image at ``q``, the image's merged token ``r`` at ``s + (t_r, h_r, w_r)`` (``s`` its first
    rank), text after it at ``q - n + max(h, w)`` (``n`` its tokens); masked positions 0."""
    am = attention_mask.bool()
    rank = am.long().cumsum(1) - 1
    img = is_img & am
    big = torch.iinfo(torch.long).max
    s = torch.where(img, rank, torch.full_like(rank, big)).amin(dim=1, keepdim=True)      # [B, 1]
    g = image_grid_thw.to(rank.device).long()
    hm, wm = (g[:, 1] // merge)[:, None], (g[:, 2] // merge)[:, None]
    n = g[:, 0:1] * hm * wm
    r = (rank - s).clamp_min(0)
    t_img, h_img, w_img = s + r // (hm * wm), s + (r % (hm * wm)) // wm, s + r % wm
    after = rank - n + torch.maximum(hm, wm)
    text = torch.where(rank < s, rank, after)
    pos = torch.stack([torch.where(img, t_img, text), torch.where(img, h_img, text), torch.where(img, w_img, text)])
    return pos.masked_fill(~am.unsqueeze(0), 0)


def next_position(pos: Tensor, attention_mask: Tensor) -> Tensor:
    """M-RoPE positions ``[3, B, L]`` -> ``[B]`` the position of the next token."""
    p = pos.masked_fill(~attention_mask.bool().unsqueeze(0), -1)
    return p.amax(dim=(0, 2)) + 1


@dataclass
class QwenVision:
    """What the Qwen vision part did (``Prepared.vision``): per image the ``(t, h, w)`` grid,
    merged tokens in / kept; the window layout and the recorder of the tower's statistics;
    ``kept_positions`` ``[B, L']``: the original sequence position of each kept token (None
    without a reduction)."""
    grid: List[Tuple[int, int, int]]
    tokens_in: List[int]
    tokens_out: List[int]
    layout: qwen_vision.WindowLayout
    recorder: attention.ScoreRecorder
    kept_positions: Optional[Tensor] = None
    cls_substitute: Optional[str] = None
    statistics: Dict[Tuple[str, int], List[Tensor]] = field(default_factory=dict)
    # Qwen3-VL: per deepstack layer, per image ``[N_i, D_llm]`` (the tower's deepstack mergers);
    # per image the reduction's source map ``[N_i]`` (output slot of each merged token, -1 dropped)
    deepstack: Optional[List[List[Tensor]]] = None
    sources: Dict[int, Tensor] = field(default_factory=dict)
    deepstack_embeds: Optional[List[Tensor]] = None    # what the LLM adds, per layer [image positions, D_llm]


class Qwen2VLAdapter(VLMAdapter):
    kind = "qwen2-vl"
    class_prefixes = ("Qwen2VL", "Qwen2_5_VL")

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        inner, cfg = model.model, model.config
        return ModelParts(cls.kind, inner.visual.blocks, cfg.vision_config, cfg.vision_config.patch_size,
                          False, projector=getattr(inner.visual, "merger", None), lm=inner.language_model,
                          lm_head=model.lm_head, text_config=cfg.get_text_config())

    def check_method(self) -> None:
        method, name = self.method, type(self.model).__name__
        if method is not None and method.stage == Stage.PROJECTOR:
            check_needs(method, {
                Need.PIXELS: f"{name}'s vision input is flattened patches (no image tensor to give)"})
        if method is not None and method.stage == Stage.VIT:
            raise NotImplementedError(f"tokenreduce.models.vlm: Stage.VIT methods run in the CLIP towers of "
                                      f"LLaVA-1.5 / LLaVA-NeXT (per tile) and in vision encoders; not in {name}'s "
                                      "windowed vision tower")

    # -- the vision tower ---------------------------------------------------------------
    def vision_plan(self, method):
        """The method's vision layers on this tower (`stages.plan_layers`) and the block whose
        keys it reads (its last attention layer, else the last block)."""
        L = len(self.model.model.visual.blocks)
        plan = plan_layers(method, L, nominal_layers=self.vision_nominal, default_nominal=NOMINAL_DEPTH["vision"])
        att = [a for _, _, a in plan.attention]
        return plan, (att[-1] if att else L - 1)

    def window_layout(self, image_grid_thw, device) -> qwen_vision.WindowLayout:
        """The tower's `qwen_vision.WindowLayout` for a grid (host ints or the processor's CPU
        tensor), on ``device``: build it before a timed call and pass it as ``layout=`` to
        `prepare` / `run_tower` (then they move nothing from the host)."""
        return qwen_vision.WindowLayout.build(image_grid_thw, self.model.model.visual.config).to(device)

    def run_tower(self, pixel_values: Tensor, image_grid_thw: Tensor, grid_host=None, method=None,
                  layout: Optional[qwen_vision.WindowLayout] = None) -> Tuple[List[Tensor], QwenVision]:
        """The vision tower on every image -> (merged features ``[N_i, D_llm]`` per image,
        `QwenVision`); with ``method`` needing tower statistics they are recorded (fused op)
        and kept per image and merged token in ``QwenVision.statistics[(kind, block)]``.
        ``layout``: a ready `window_layout` (else built here from ``grid_host`` or the grid)."""
        visual = self.model.model.visual
        if layout is None:
            layout = self.window_layout(grid_host if grid_host is not None else image_grid_thw, pixel_values.device)
        rec = attention.ScoreRecorder()
        kinds = sorted({k for n, k in TOWER_NEED_KIND.items() if method is not None and n in method.needs})
        wants_keys = method is not None and Need.KEYS in method.needs
        if kinds or wants_keys:
            qwen_vision.install(visual)
            plan, key_layer = self.vision_plan(method)
            for _, _, a in plan.attention:
                if kinds:
                    rec.request("vision", a, kinds)
            if wants_keys:
                rec.request("vision", key_layer, ["keys"])
        fused = visual.config._attn_implementation == qwen_vision.NAME
        with attention.recording(rec):
            out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw,
                         **qwen_vision.vision_kwargs(layout, fused=fused))
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = list(torch.split(merged, layout.merged_counts))
        info = QwenVision(layout.grid, layout.merged_counts, list(layout.merged_counts), layout, rec)
        deep = getattr(out, "deepstack_features", None)
        if deep:
            info.deepstack = [list(torch.split(d, layout.merged_counts)) for d in deep]
        for (kind, part, layer), t in rec.data.items():
            info.statistics[(kind, layer)] = qwen_vision.split_images(
                qwen_vision.merge_groups(t, kind, layout.merge), layout.merged_counts)
        return feats, info

    # -- the LLM inputs -----------------------------------------------------------------
    def prepare(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                mm_token_type_ids: Optional[Tensor] = None, grid_host: Optional[Sequence] = None,
                layout: Optional[qwen_vision.WindowLayout] = None, **_) -> Prepared:
        """``grid_host``: the ``(t, h, w)`` grid per image as host ints when ``image_grid_thw``
        is already on the device (the processor's CPU tensor needs none: no read-back);
        ``layout``: a ready `window_layout` (then nothing moves between host and device here,
        with one image per row)."""
        m = self.model
        method = self.stage_method(Stage.PROJECTOR)
        feats, info = self.run_tower(pixel_values, image_grid_thw, grid_host, method, layout)
        counts, merge = info.tokens_in, self.cfg.vision_config.spatial_merge_size
        is_img = input_ids == self.image_token
        if len(counts) == input_ids.shape[0]:      # one image per row: positions from device ops
            pos = rope_positions(is_img, attention_mask, image_grid_thw, merge)
        else:
            if mm_token_type_ids is None:
                mm_token_type_ids = is_img.int()
            pos, _deltas = m.model.get_rope_index(input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None,
                                                  attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
        shapes = [(t, h // merge, w // merge) for t, h, w in info.grid]
        same = len(set(shapes)) == 1
        grid = shapes[0][1:] if same and shapes[0][0] == 1 else None
        steps: List[Dict[str, Any]] = []
        size = None
        if method is not None:
            tokens, index, size, keep = self._reduce(feats, shapes, input_ids, is_img, info)
            info.tokens_out = keep
            steps.append({"stage": "projector", "layer": None, "tokens_in": counts,
                          "tokens_out": keep[0] if len(set(keep)) == 1 else keep})
            input_ids, attention_mask, pos, is_img, feats_cat, size, sel = self._cut(
                input_ids, attention_mask, pos, is_img, counts, keep, tokens, index, size)
            info.kept_positions = sel
            if len(set(keep)) > 1:
                emb, attention_mask = self._insert_ragged(input_ids, attention_mask, is_img, feats_cat, size)
                return Prepared(emb, attention_mask, is_img, -1, pos, next_position(pos, attention_mask), None,
                                steps, info)
            n_img = keep[0]
        elif len(set(counts)) == 1:
            n_img = self.image_tokens if self.image_tokens is not None else counts[0]    # host counts
            feats_cat = torch.stack(feats)
        else:   # different grids, no reduction: each row's image tokens take its image's features
            K = max(counts)
            feats_cat = torch.stack([F.pad(f, (0, 0, 0, K - f.shape[0])) for f in feats])
            emb, attention_mask = self._insert_ragged(input_ids, attention_mask, is_img, feats_cat, None)
            return Prepared(emb, attention_mask, is_img, -1, pos, next_position(pos, attention_mask), None, steps,
                            info)
        emb, attention_mask, is_img = self.insert_image_features(input_ids, attention_mask, is_img, n_img, feats_cat,
                                                                 size)
        return Prepared(emb, attention_mask, is_img, n_img, pos, next_position(pos, attention_mask), grid, steps,
                        info)

    def _context(self, x: Tensor, rows: List[int], shape, text: Optional[Tensor], info: QwenVision) -> Context:
        """The method's `Context` for images ``rows`` (same merged grid ``shape``), with the
        tower statistics it declared (keyed as declared and resolved) and, for Need.CLS_ATTN,
        the synthetic [CLS] slot in front (see the module docstring)."""
        method = self.method
        plan, key_layer = self.vision_plan(method)
        ctx = tower_context(method, x, shape, lambda kind, layer: torch.stack([info.statistics[(kind, layer)][i]
                                                                               for i in rows]),
                            plan, key_layer, self.cfg.vision_config.num_heads, text)
        if Need.CLS_ATTN in method.needs:
            info.cls_substitute = "mean attention received (synthetic [CLS] slot, dropped after the method)"
        return ctx

    def _reduce(self, feats: List[Tensor], shapes, input_ids: Tensor, is_img: Tensor, info: QwenVision):
        """The PROJECTOR method on each image's merged features ``[N_i, D]``, one call per
        distinct merged grid (batched) -> (tokens ``[B, K, D]``, index ``[B, K]`` (-1: a
        synthesised token, `PAD`: a padding slot), size ``[B, K]``, kept count per image), ``K``
        the largest kept count."""
        method, counts = self.method, info.tokens_in
        cls = Need.CLS_ATTN in method.needs
        text = self.text_embeddings(input_ids, is_img, min(counts)) if Need.TEXT in method.needs else None
        if text is not None and len(set(counts)) > 1:
            text = None      # text positions differ per row: only given for one image-token count
        out: List[Optional[Tuple[Tensor, Tensor, Tensor]]] = [None] * len(feats)
        for shape in sorted(set(shapes)):
            rows = [i for i, s in enumerate(shapes) if s == shape]
            x = torch.stack([feats[i] for i in rows])
            ctx = self._context(x, rows, shape, text[rows] if text is not None else None, info)
            red = method(ctx)
            check_reduction(method, ctx.x, red, "on the merged image features")
            tokens, index, size, source = red.tokens, red.index, red.size.float(), red.source
            if cls:      # the synthetic [CLS] is kept first: drop it
                tokens, index, size = tokens[:, 1:], (index[:, 1:] - 1).clamp_min(-1), size[:, 1:]
                source = torch.where(source[:, 1:] >= 1, source[:, 1:] - 1, torch.full_like(source[:, 1:], -1))
            for j, i in enumerate(rows):
                out[i] = (tokens[j], index[j], size[j])
                info.sources[i] = source[j]
        keep = [o[0].shape[0] for o in out]
        K = max(keep)
        tokens = torch.stack([F.pad(t, (0, 0, 0, K - t.shape[0])) for t, _, _ in out])
        index = torch.stack([F.pad(ix, (0, K - ix.shape[0]), value=PAD) for _, ix, _ in out])
        size = torch.stack([F.pad(s, (0, K - s.shape[0])) for _, _, s in out])
        return tokens, index, size, keep

    def _cut(self, input_ids, attention_mask, pos, is_img, counts: List[int], keep: List[int], tokens, index, size):
        """Cut each row to its text and kept image tokens, keeping their own (t, h, w)
        positions: returns (input_ids, attention_mask, pos, is_img, tokens, size, kept original
        positions ``[B, L']``), the kept tokens in sequence order (padding slots last)."""
        B, L = input_ids.shape
        n_max, K = max(counts), tokens.shape[1]
        # image positions per sample (rows with a smaller image: never indexed past their count)
        order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices[:, :n_max]
        # synthesised tokens (index -1) take distinct unused image positions of their row
        valid = index >= 0
        used = torch.zeros(B, n_max + 1, dtype=torch.int8, device=index.device).scatter(
            1, torch.where(valid, index, torch.full_like(index, n_max)), 1)[:, :n_max]
        free = torch.sort(used, dim=1, stable=True).indices
        synth = index == -1
        rank = (synth.long().cumsum(1) - 1).clamp(0, n_max - 1)
        last = n_max + torch.arange(K, device=index.device).expand(B, K)
        index = torch.where(valid, index, torch.where(synth, free.gather(1, rank), last))
        srt = index.sort(dim=1)
        real = srt.values < n_max
        kept_img_pos = torch.where(real, order.gather(1, srt.values.clamp(max=n_max - 1)), torch.full_like(index, L))
        tokens = tokens.gather(1, srt.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        size = size.float().gather(1, srt.indices)
        keep_mask = torch.cat([~is_img, is_img.new_zeros(B, 1)], dim=1).scatter(
            1, kept_img_pos, torch.ones_like(kept_img_pos, dtype=torch.bool))[:, :L]
        # the longest kept row from the host counts (L - fewest dropped), no read-back; shorter
        # rows keep some dropped tokens as masked fillers
        Lp = L - min(n - k for n, k in zip(counts, keep))
        key = (~keep_mask).to(torch.int8)
        sel = torch.sort(key, dim=1, stable=True).indices[:, :Lp].sort(dim=1).values
        input_ids = input_ids.gather(1, sel)
        attention_mask = attention_mask.gather(1, sel) & keep_mask.gather(1, sel).to(attention_mask.dtype)
        pos = gather_positions(pos, sel, 2)
        is_img = keep_mask.gather(1, sel) & (input_ids == self.image_token)
        return input_ids, attention_mask, pos, is_img, tokens, size, sel

    def _insert_ragged(self, input_ids, attention_mask, is_img, tokens, size):
        """Rows holding different image-token counts: the i-th image token of a row gets its
        i-th (kept) feature (``tokens`` ``[B, K, D]`` in sequence order, padding slots last);
        kept tokens of size 0 are masked. -> (inputs_embeds, attention_mask)."""
        emb = self.model.get_input_embeddings()(input_ids)
        K = tokens.shape[1]
        rank = (is_img.long().cumsum(1) - 1).clamp(0, K - 1)
        at = tokens.gather(1, rank.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])).to(emb.dtype)
        emb = torch.where(is_img.unsqueeze(-1), at, emb)
        if size is None:
            return emb, attention_mask
        empty = is_img & (size.gather(1, rank) <= 0)
        return emb, attention_mask * (~empty).to(attention_mask.dtype)
