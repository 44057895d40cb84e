"""What every reduction method shares: where it runs, what it needs, what it returns.

A method is a small class registered under a name. The model integration
(`tokenreduce.models`, `tokenreduce profile`) reads three declarations from it and
feeds it without special cases:

* ``stage``: where it runs (`Stage.VIT` between vision-encoder blocks,
  `Stage.PROJECTOR` on the encoder's output before the projector/LLM, `Stage.LLM`
  on the image-token hidden states inside the LLM after a decoder layer);
* ``needs``: what the model must hand over (`Need`);
* ``reduce_layers(num_layers)`` / ``attention_layers(num_layers)``: after which
  layers `reduce` is called (several for progressive methods) and which layers'
  attention statistics must be collected (by the fused ``attention_with_scores`` op,
  never by eager attention).

`reduce(ctx)` receives a `Context` and returns a `Reduction`. Both are batched: no
per-sample Python loop, no host sync (no ``.item()``, no data-dependent shapes), so
methods run on the CPU and CUDA, in fp32/fp16/bf16, under ``torch.compile``.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "Stage", "Need", "Context", "Reduction", "Method", "Budget",
    "resolve_keep", "gather_tokens", "keep_indices", "source_from_index",
]


class Stage(str, enum.Enum):
    """Where a method runs."""
    VIT = "vit"              # inside the vision encoder, between blocks
    PROJECTOR = "projector"  # after the vision encoder, before the projector / LLM
    LLM = "llm"              # inside the LLM, after decoder layer K (image tokens only)


class Need(str, enum.Enum):
    """What a method needs from the model (the keys of `Context`)."""
    FEATURES = "features"            # ctx.x: the tokens being reduced [B, N, D]
    KEYS = "keys"                    # ctx.keys: head-mean keys of the last attention [B, N, Dk]
    CLS_ATTN = "cls_attn"            # ctx.cls_attn[layer]: [CLS]-row attention, head mean [B, N]
    ATTN_RECEIVED = "attn_received"  # ctx.attn_received[layer]: attention received, head/row mean [B, N]
    QUERY_ATTN = "query_attn"        # ctx.query_attn[layer]: last text token -> image tokens [B, N]
    VALUES = "values"                # ctx.values[layer]: attention values, heads concatenated [B, N, Dv]
    GRID = "grid"                    # ctx.grid: the patch grid (h, w) of the image tokens
    TEXT = "text"                    # ctx.text: text-token features [B, T, D]
    PIXELS = "pixels"                # ctx.pixels: the image [B, C, H, W]
    # -- added for the LLM-stage methods of PyramidDrop / VisionDrop / FEATHER (additive) --
    # LOOKAHEAD: at a reduce call after layer L, the attention statistics keyed L + 1 are
    # those of layer L + 1 computed on the current hidden states *before* layer L + 1 runs
    # (its input norm, q/k projections and RoPE; fused attention_with_scores, no eager
    # softmax), as PyramidDrop, VisionDrop and FEATHER score tokens; attention_layers()
    # then lists L + 1 while reduce_layers() lists L.
    LOOKAHEAD = "lookahead"
    # ctx.visual_attn[layer]: [B, N] attention each image token receives from the image-token
    # queries only (softmax over the whole causal sequence, mean over heads and image rows;
    # i.e. attention_with_scores with score_rows = the image positions, image keys sliced),
    # VisionDrop's visual-only score.
    VISUAL_ATTN = "visual_attn"
    # ctx.query_attn_norope[layer]: [B, N] last token -> image tokens computed from q/k
    # *without* RoPE, softmax over the image keys only (not the whole sequence), head mean:
    # FEATHER's score (attention_with_scores on (q_last, k_image) before rotary embedding).
    QUERY_ATTN_NOROPE = "query_attn_norope"


@dataclass
class Context:
    """Everything a method may read at one reduction point.

    ``x`` is the sequence the method reduces: for `Stage.VIT` / `Stage.PROJECTOR` the
    vision tokens (``[CLS]`` first when ``has_cls``), for `Stage.LLM` the image-token
    slice of the hidden states. Every per-token tensor below is aligned with ``x``
    (same N, same order). Attention statistics are keyed by the layer that produced
    them (0-based, in the model that runs the method); they are head means, as the
    fused op returns them (a head *sum*, as some authors use, ranks identically).
    """
    x: Tensor                                   # [B, N, D]
    has_cls: bool = False                       # x[:, 0] is [CLS]: always kept, not in the budget
    grid: Optional[Tuple[int, int]] = None      # (h, w) with h * w == N - has_cls
    keys: Optional[Tensor] = None               # [B, N, Dk]
    cls_attn: Dict[int, Tensor] = field(default_factory=dict)       # layer -> [B, N]
    attn_received: Dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, N]
    query_attn: Dict[int, Tensor] = field(default_factory=dict)     # layer -> [B, N]
    values: Dict[int, Tensor] = field(default_factory=dict)         # layer -> [B, N, Dv]
    visual_attn: Dict[int, Tensor] = field(default_factory=dict)    # layer -> [B, N] (Need.VISUAL_ATTN)
    query_attn_norope: Dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, N] (Need.QUERY_ATTN_NOROPE)
    text: Optional[Tensor] = None               # [B, T, D]
    pixels: Optional[Tensor] = None             # [B, C, H, W]
    size: Optional[Tensor] = None               # [B, N] tokens each input already stands for
    layer: Optional[int] = None                 # layer after which this call happens
    num_layers: Optional[int] = None            # layers of the model part the method runs in
    state: Dict[str, Any] = field(default_factory=dict)  # per-forward scratch of progressive methods
    heads: Optional[int] = None                 # attention heads of the layers ``values`` come from

    @property
    def n_image(self) -> int:
        return self.x.shape[1] - int(self.has_cls)


@dataclass
class Reduction:
    """The output of every method.

    tokens: ``[B, K, D]`` the kept / merged tokens ([CLS] first when the input had one).
    index:  int64 ``[B, K]``: position in the input ``x`` of each output token's
            representative (the kept token itself; for a merged token the token it was
            merged into); ``-1`` for a synthesised token with no single source (pooling).
    source: int64 ``[B, N]``: the output slot each input token ended in, ``-1`` if dropped
            (so features can be un-merged and provenance tracked).
    size:   ``[B, K]`` float32: how many original tokens each output stands for (1 for a
            kept token when the input had no sizes; ToMe's size for merged tokens).
    """
    tokens: Tensor
    index: Tensor
    source: Tensor
    size: Tensor

    def unmerge(self, y: Tensor) -> Tensor:
        """Map per-output features ``y`` ``[B, K, C]`` back to the input positions
        ``[B, N, C]``; dropped positions get zeros."""
        src = self.source
        g = torch.gather(y, 1, src.clamp_min(0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return g * (src >= 0).unsqueeze(-1).to(g.dtype)


@dataclass(frozen=True)
class Budget:
    """A budget as users state it: keep ``keep`` tokens, or a ``ratio`` of the image tokens."""
    keep: Optional[int] = None
    ratio: Optional[float] = None

    def tokens(self, n: int) -> int:
        return resolve_keep(n, self.keep, self.ratio)


def resolve_keep(n: int, keep: Optional[int] = None, ratio: Optional[float] = None,
                 method: str = "method") -> int:
    """Number of image tokens to keep out of ``n`` (a Python int, static)."""
    if keep is not None and ratio is not None:
        raise ValueError(f"tokenreduce.methods.{method}: give keep or ratio, not both")
    if keep is None and ratio is None:
        raise ValueError(f"tokenreduce.methods.{method}: a budget is needed (keep=K or ratio=r)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"tokenreduce.methods.{method}: keep must be a positive int, got {keep!r}")
        return min(keep, n)
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"tokenreduce.methods.{method}: ratio must be in (0, 1], got {ratio!r}")
    return max(1, min(n, int(round(n * float(ratio)))))


class Method:
    """Base class of the reduction methods (see the module docstring).

    Subclasses set the class attributes and implement `reduce`. The constructor takes
    the budget (``keep`` or ``ratio``) and the method's own options.
    """
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""          # "Author et al., Title, venue year"
    code: ClassVar[str] = ""           # authors' repository (and commit / file it follows)
    stage: ClassVar[Stage] = Stage.PROJECTOR
    needs: ClassVar[FrozenSet[Need]] = frozenset({Need.FEATURES})
    options: ClassVar[Dict[str, str]] = {}   # option name -> one-line help (for the CLI)
    budgets: ClassVar[str] = "keep=K or ratio=r"   # how users state its budget, and presets
    faithful_to: ClassVar[str] = ""    # commit / file / paper section the implementation follows
    deviations: ClassVar[str] = ""     # deliberate differences from the authors (batching, bugs not reproduced)
    # ToMe's proportional attention: after a Stage.VIT reduction, the model adds log(size) of
    # each token as a key bias to every later attention call of the encoder, so a merged token
    # counts as the tokens it stands for. On by default (merging methods want it; pruning
    # methods are unaffected: kept tokens have size 1, log(1) = 0); a merging method whose
    # authors do not use it sets False. Padding slots (size 0) are masked (-inf) either way.
    proportional_attention: ClassVar[bool] = True

    def __init__(self, keep: Optional[int] = None, ratio: Optional[float] = None, **opts: Any):
        unknown = set(opts) - set(self.options)
        if unknown:
            raise TypeError(f"tokenreduce.methods.{self.name}: unknown option(s) {sorted(unknown)}; "
                            f"known: {sorted(self.options)}")
        self.budget = Budget(keep, ratio)
        self.opts = opts
        if keep is None and ratio is None and not self.default_budget_ok():
            resolve_keep(1, None, None, self.name)   # raises the "a budget is needed" error
        if keep is not None or ratio is not None:    # a bad budget fails now, naming the method
            resolve_keep(1 << 30, keep, ratio, self.name)

    def default_budget_ok(self) -> bool:
        """True when the method can run without keep/ratio (e.g. an adaptive count)."""
        return False

    # -- declarations read by the model integration --------------------------------
    def reduce_layers(self, num_layers: int) -> List[int]:
        """Layers (0-based, of the part named by ``stage``) after which `reduce` is
        called. `Stage.PROJECTOR` methods return ``[]`` (called once on the output)."""
        return []

    def attention_layers(self, num_layers: int) -> List[int]:
        """Layers whose attention statistics (``cls_attn`` / ``attn_received`` /
        ``query_attn`` / ``values``) the method reads; negative counts from the end."""
        return []

    def keep_tokens(self, n: int) -> int:
        """Image tokens kept at the end, out of ``n``."""
        return self.budget_tokens(n)

    def budget_tokens(self, n: int) -> int:
        """The user's budget (keep / ratio) resolved against ``n``; errors name the method."""
        return resolve_keep(n, self.budget.keep, self.budget.ratio, self.name)

    # -- the work ----------------------------------------------------------------
    def reduce(self, ctx: Context) -> Reduction:
        raise NotImplementedError

    def __call__(self, ctx: Context) -> Reduction:
        return self.reduce(ctx)

    @classmethod
    def describe(cls) -> Dict[str, Any]:
        return {"name": cls.name, "paper": cls.paper, "code": cls.code, "stage": cls.stage.value,
                "needs": sorted(n.value for n in cls.needs), "options": dict(cls.options),
                "budgets": cls.budgets, "faithful_to": cls.faithful_to, "deviations": cls.deviations,
                "doc": (cls.__doc__ or "").strip().split("\n")[0]}

    def __repr__(self) -> str:
        b = self.budget
        bud = f"keep={b.keep}" if b.keep is not None else f"ratio={b.ratio}"
        return f"{type(self).__name__}({bud}{''.join(f', {k}={v!r}' for k, v in self.opts.items())})"


# ---------------------------------------------------------------------------------------
# Batched helpers shared by the methods (no loops over the batch, no host syncs)
# ---------------------------------------------------------------------------------------

def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]``: ``[B, N, D]`` x int64 ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def source_from_index(index: Tensor, n: int) -> Tensor:
    """Source map of a pure selection: ``[B, K]`` kept positions -> ``[B, N]`` slots (-1 dropped)."""
    B, K = index.shape
    src = torch.full((B, n), -1, dtype=torch.long, device=index.device)
    slots = torch.arange(K, device=index.device).expand(B, K)
    return src.scatter(1, index, slots)


def keep_indices(ctx: Context, index: Tensor, *, sort: bool = True) -> Reduction:
    """The `Reduction` that keeps image tokens ``index`` (int64 ``[B, K]``, positions
    among the image tokens, i.e. not counting [CLS]); [CLS] is prepended when
    ``ctx.has_cls``. ``sort=True`` restores the original (spatial) order."""
    x = ctx.x
    B, N, _ = x.shape
    c = int(ctx.has_cls)
    if sort:
        index = index.sort(dim=1).values
    index = index + c
    if c:
        index = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), index], dim=1)
    tokens = gather_tokens(x, index)
    if ctx.size is not None:
        size = torch.gather(ctx.size.float(), 1, index)
    else:
        size = torch.ones(index.shape, dtype=torch.float32, device=x.device)
    return Reduction(tokens, index, source_from_index(index, N), size)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row ``[B, N] -> [B, k]``; ties to the smallest
    index (a stable descending sort, deterministic on every device)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def image_part(ctx: Context, t: Tensor) -> Tensor:
    """Drop the [CLS] position of a per-token tensor ``[B, N, ...]`` when ``ctx.has_cls``."""
    return t[:, 1:] if ctx.has_cls else t


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def square_grid(n: int) -> Tuple[int, int]:
    s = int(math.isqrt(n))
    if s * s != n:
        raise ValueError(f"tokenreduce.methods: {n} image tokens do not form a square grid; pass grid=(h, w)")
    return s, s


def require(ctx: Context, method: str, field_name: str, layer: Optional[int] = None,
            shape: Optional[Tuple[int, ...]] = None) -> Any:
    """``ctx.<field_name>`` (or ``ctx.<field_name>[layer]``), with a clear error naming the
    method, the need and the layer when the model did not provide it or its shape is off."""
    val = getattr(ctx, field_name, None)
    where = f"ctx.{field_name}"
    if layer is not None:
        where = f"ctx.{field_name}[{layer}]"
        val = val.get(layer) if isinstance(val, dict) else None
    if val is None:
        raise ValueError(f"tokenreduce.methods.{method}: needs {where}, which the model did not provide "
                         f"(declare/collect it via needs and attention_layers())")
    if shape is not None and isinstance(val, Tensor) and tuple(val.shape[:len(shape)]) != tuple(shape):
        raise ValueError(f"tokenreduce.methods.{method}: {where} must have shape {list(shape)}, "
                         f"got {list(val.shape)} (not aligned with ctx.x?)")
    return val


def padded_selection(ctx: Context, index: Tensor, valid: Optional[Tensor] = None) -> Reduction:
    """A `Reduction` that keeps image tokens ``index`` ``[B, K]`` in the given order (positions
    among the image tokens) where ``valid`` ``[B, K]`` (default all) is True; invalid slots are
    padding: zero token, index -1, size 0 (consumers mask slots of size 0). [CLS] is prepended
    when ``ctx.has_cls``. Used by methods whose authors pad to a static count (HoloV, VFlowOpt)."""
    x = ctx.x
    B, N, _ = x.shape
    c = int(ctx.has_cls)
    if valid is None:
        valid = torch.ones(index.shape, dtype=torch.bool, device=x.device)
    pos = index.clamp_min(0) + c
    if c:
        pos = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), pos], dim=1)
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), valid], dim=1)
    tokens = gather_tokens(x, pos) * valid.unsqueeze(-1).to(x.dtype)
    size = (torch.gather(ctx.size.float(), 1, pos) if ctx.size is not None
            else torch.ones(pos.shape, dtype=torch.float32, device=x.device)) * valid
    out_index = torch.where(valid, pos, torch.full_like(pos, -1))
    K = pos.shape[1]
    src = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
    slots = torch.arange(K, device=x.device).expand(B, K)
    src = src.scatter(1, torch.where(valid, pos, torch.full_like(pos, N)), slots)[:, :N]
    return Reduction(tokens, out_index, src, size)
