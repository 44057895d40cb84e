"""VLA-Pruner ("VLA-Pruner: Temporal-Aware Dual-Level Visual Token Pruning for Efficient
Vision-Language-Action Inference", 2025): inside the LLM, before layer K, keep ``keep`` image
tokens chosen by two criteria under one budget:

* semantic level: the vision-language prefill attention of layer K-1 (every query row, head
  mean: ``ctx.attn_received[K-1]``; ``semantic="last"``: the last row, FastV's);
* action level: the attention the decoded (action) tokens paid to the image tokens at
  ``action_layer`` in the previous frames, smoothed over a window of ``window`` frames with decay
  ``gamma`` (the temporal guide);
* dual-level selection: the union of the top ``keep`` of each criterion; when it holds more than
  ``keep`` tokens, a greedy max-min (min-redundancy) pass over it by cosine distance picks
  ``keep`` (first pick: the member farthest from its nearest other member; `ops.kcenter`).
    ctx.x [B, N, D], ctx.attn_received[K-1] [B, N] -> [B, keep, D] (original order)

Temporal state (one stream per batch row, on the device): ``history`` ``[window, B, N]`` (the
last frames' action attention, oldest first), ``filled`` ``[B]`` (frames in it, at most
``window``), and the current frame's pending sum. The model feeds it through
`observe_decode` (the LLM runner calls it with the fused op's decode-row attention at
``decode_attention_layers``: the prefill's last row, then every decoding step; pruned image
tokens get 0, as the authors'); the frame is closed (its mean over the observed rows pushed into
the history) by `end_frame`, which the LLM runner calls when the next request (frame) begins. From frame t to t+1 only that
history carries over. Reset rules: `reset()` clears every stream (a new episode), ``reset(streams)``
(bool ``[B]``) only those; a call with a different batch size or image-token count starts
afresh. A stream whose history is not full yet (its first ``window`` frames) keeps the
semantic top ``keep`` (``warmup="semantic"``, the default) or every token (``warmup="full"``,
as the authors, for all streams together: the kept count is then a host-side function of the
frame count, never read from the device).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .. import ops
from ..errors import fail
from .base import Budget, Context, Method, Need, Reduction, Stage
from .helpers import gather_tokens, int_option, keep_indices, need, topk_indices

__all__ = ["VLAPruner", "temporal_guide", "dual_level_select"]


def temporal_guide(history: Tensor, gamma: float, order: str = "released") -> Tensor:
    """The smoothed action attention ``[B, N]`` of ``history`` ``[W, B, N]`` (oldest first),
    normalised to sum 1. ``order="released"``: the authors' weights (``gamma ** (W - 1 - i)`` on
    the i-th most recent frame, so the oldest weighs 1); ``"recent"``: the most recent weighs 1."""
    W = history.shape[0]
    j = torch.arange(W, dtype=torch.float32, device=history.device)
    w = gamma ** (j if order == "released" else (W - 1 - j))
    g = (history.float() * w[:, None, None]).sum(0)
    return g / g.sum(-1, keepdim=True).clamp_min(1e-30)


def dual_level_select(x: Tensor, semantic: Tensor, guide: Tensor, k: int) -> Tensor:
    """Dual-level selection: ``[B, k]`` image positions (in pick order) from the union of the top
    ``k`` of ``semantic`` and of ``guide`` (``[B, N]`` each), min-redundancy over ``x`` ``[B, N, D]``.
    The union (at most 2k tokens, a data-dependent count) is gathered into a static ``[B, 2k]``
    buffer, union members first in position order, the rest masked."""
    B, N, _ = x.shape
    union = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    union = union.scatter(1, topk_indices(semantic, k), True).scatter(1, topk_indices(guide, k), True)
    m = min(2 * k, N)
    ar = torch.arange(N, device=x.device)
    pos = ((~union).long() * N + ar).sort(dim=1).values[:, :m] % N                # [B, m] members first
    valid = union.gather(1, pos)
    xu = gather_tokens(x, pos).float()
    xn = F.normalize(xu, dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)                                     # [B, m, m] cosine distance
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye | ~valid[:, :, None], float("inf")).amin(dim=1)   # nearest other member
    first = nearest.masked_fill(~valid, float("-inf")).argmax(dim=1)
    index, _ = ops.kcenter(xu, k, metric="cosine", first=first, mask=valid)
    return pos.gather(1, index)


@register
class VLAPruner(Method):
    """VLA-Pruner: prefill attention + temporally smoothed action attention, dual-level top-k."""
    name = "vla-pruner"
    paper = ("VLA-Pruner: Temporal-Aware Dual-Level Visual Token Pruning for Efficient Vision-Language-"
             "Action Inference, 2025")
    code = "github.com/MINT-SJTU/VLA-Pruner"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.ATTN_RECEIVED})
    options = {
        "layer": "K: image tokens are pruned before LLM layer K, scored by layer K-1 (default 3)",
        "action_layer": "LLM layer whose decode-row attention is the action-level signal (default 15 of 32)",
        "window": "frames in the temporal window (default 3)",
        "gamma": "temporal decay (default 0.8)",
        "semantic": "'prefill' (every row, default) or 'last' (the last token's row, FastV)",
        "warmup": "before a stream's window is full: 'semantic' top-k (default) or 'full' (keep all)",
        "decay_order": "'released' (the oldest frame weighs 1, as the authors' code) or 'recent'",
    }
    budgets = ("keep=K or ratio=r of the image tokens (default ratio=0.5: the authors' fastv_r=0.5; their "
               "LIBERO scripts use 0.25 and 0.5)")
    faithful_to = ("MINT-SJTU/VLA-Pruner @fa5bfed src/openvla: modeling_llama.py fastv_forward (K=3, "
                   "use_prefil_attention, guide/current top-k, torch.unique, _redundancy_minization) and "
                   "modeling_prismatic.py predict_action / _extract_action_modality_attentions (av_hist "
                   "deque of window 3, decay 0.8, layer 15, mean over heads and action tokens)")
    deviations = ("batched, one stream per batch row (theirs: one episode, sample 0); selected tokens are "
                  "excluded explicitly in the redundancy pass (theirs: by their distance 0); without an LLM "
                  "runner (ctx.state has no input_embeddings) the redundancy pass uses ctx.x; the guide in "
                  "float32 (theirs bf16); ties to the smaller index; warm-up frames keep the semantic top-k "
                  "by default (theirs keep all: warmup='full'); the decode rows of a LLaVA-style VLM's "
                  "generated tokens stand for the action tokens")

    # the LLM runner puts the LLM's input embeddings at the image tokens into ctx.state
    # ["input_embeddings"] (the features of the authors' redundancy pass)
    wants_input_embeddings = True

    def configure(self) -> None:
        if not self.budget.given:
            self.budget = Budget(ratio=0.5, where=self.where)
        self.K = int_option(self, "layer", 3)
        self.action_layer = int_option(self, "action_layer", 15, minimum=0, rule="an int >= 0")
        self.window = int_option(self, "window", 3)
        gamma = self.opts.get("gamma", 0.8)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
            fail(self.where, f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        for opt, allowed, default in (("semantic", ("prefill", "last"), "prefill"),
                                      ("warmup", ("semantic", "full"), "semantic"),
                                      ("decay_order", ("released", "recent"), "released")):
            v = self.opts.get(opt, default)
            if v not in allowed:
                fail(self.where, f"{opt} must be one of {', '.join(allowed)}, got {v!r}")
            setattr(self, opt, v)
        if self.semantic == "last":
            self.needs = frozenset({Need.FEATURES, Need.QUERY_ATTN})
        self.reset()

    def default_budget_ok(self) -> bool:
        return True

    # -- declarations -------------------------------------------------------------------------
    def reduce_layers(self, num_layers: int) -> List[int]:
        if self.K > num_layers:
            fail(self.where, f"layer K={self.K} exceeds the {num_layers} LLM layers")
        return [self.K - 1]

    def attention_layers(self, num_layers: int) -> List[int]:
        return self.reduce_layers(num_layers)

    def decode_attention_layers(self, num_layers: int) -> List[int]:
        """LLM layers whose decode-row attention to the image tokens `observe_decode` wants (the
        model maps a layer beyond a short model's depth from the nominal 32 layers)."""
        return [self.action_layer]

    # -- the temporal state ----------------------------------------------------------------------
    def reset(self, streams: Optional[Tensor] = None) -> None:
        """Forget the history of every stream (``streams=None``) or of the streams where the bool
        ``streams`` ``[B]`` is True (their next frames are warm-up frames again)."""
        if streams is None or getattr(self, "history", None) is None:
            self.history: Optional[Tensor] = None     # [W, B, N] action attention, oldest first
            self.filled: Optional[Tensor] = None      # [B] int64 frames in the window
            self.frames = 0                           # frames closed since the last full reset (host)
            self.pending: Optional[Tensor] = None     # [B, N] sum over this frame's observed rows
            self.pending_rows = 0
            return
        if self.warmup == "full":
            fail(self.where, "warmup='full' resets all streams together: call reset() without streams")
        s = streams.to(device=self.history.device, dtype=torch.bool)
        self.history = self.history.masked_fill(s[None, :, None], 0.0)
        self.filled = self.filled.masked_fill(s, 0)
        if self.pending is not None:
            self.pending = self.pending.masked_fill(s[:, None], 0.0)

    def observe_decode(self, layer: int, attn: Tensor) -> None:
        """One decode row's attention to the image tokens, ``[B, N]`` (0 for pruned tokens)."""
        if attn.dim() != 2:
            fail(self.where, f"observe_decode wants [B, N] attention, got {tuple(attn.shape)}")
        if self.history is not None and tuple(attn.shape) != tuple(self.history.shape[1:]):
            self.reset()
        a = attn.float()
        self.pending = a if self.pending is None else self.pending + a
        self.pending_rows += 1

    def end_frame(self) -> None:
        """Close the current frame: its mean action attention joins the history."""
        if self.pending is None:
            return
        vec = self.pending / self.pending_rows
        B, N = vec.shape
        if self.history is None:
            self.history = torch.zeros(self.window, B, N, device=vec.device)
            self.filled = torch.zeros(B, dtype=torch.long, device=vec.device)
        self.history = torch.cat([self.history[1:], vec[None]], 0)
        self.filled = (self.filled + 1).clamp_max(self.window)
        self.frames += 1
        self.pending, self.pending_rows = None, 0

    # -- the work --------------------------------------------------------------------------------
    def reduce(self, ctx: Context) -> Reduction:
        x = ctx.x
        B, N, _ = x.shape
        if self.history is not None and tuple(self.history.shape[1:]) != (B, N):
            self.reset()          # another stream shape: start afresh
        k = self.keep_tokens(N)
        if self.semantic == "last":
            sem = need(ctx, self.where, "query_attn", self.K - 1)
        else:
            sem = need(ctx, self.where, "attn_received", self.K - 1)
        if self.warmup == "full" and self.frames < self.window:
            return keep_indices(ctx, torch.arange(N, device=x.device).expand(B, N))
        current = topk_indices(sem, k)
        if self.history is None or self.frames < self.window:   # host-side: no stream's window is full yet
            return keep_indices(ctx, current)
        guide = temporal_guide(self.history, self.gamma, self.decay_order)
        feats = ctx.state.get("input_embeddings")     # the LLM's input at the image tokens (the authors')
        if feats is None or tuple(feats.shape[:2]) != (B, N):
            feats = x
        dual = dual_level_select(feats, sem, guide, k)
        ready = (self.filled >= self.window)[:, None]
        return keep_indices(ctx, torch.where(ready, dual, current))
