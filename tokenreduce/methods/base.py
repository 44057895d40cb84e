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

This module holds the framework types only (`Stage`, `Need`, `Context`, `Reduction`,
`Budget`, `Method`); the batched helpers the methods share are in `methods.helpers`.
"""
from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import fail

__all__ = ["Stage", "Need", "Context", "Reduction", "Budget", "Method"]


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
    # ctx.rater_attn[layer]: [B, N] attention each image token receives from the "rater" text
    # tokens, SparseVLM's text guidance: the text after the image whose relevance to the image
    # (softmax over those text tokens of image-embedding x text-embedding products at the LLM
    # input, mean over the image rows) exceeds its mean; per rater, the layer's causal softmax
    # over the whole sequence (RoPE, fused attention_with_scores with one-hot image values),
    # then the mean over heads and raters.
    RATER_ATTN = "rater_attn"


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
    cls_synthetic: bool = False                 # that [CLS] is a stand-in the model lacks (Qwen): not projected
    grid: Optional[Tuple[int, int]] = None      # (h, w) with h * w == N - has_cls
    keys: Optional[Tensor] = None               # [B, N, Dk]
    cls_attn: Dict[int, Tensor] = field(default_factory=dict)       # layer -> [B, N]
    attn_received: Dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, N]
    query_attn: Dict[int, Tensor] = field(default_factory=dict)     # layer -> [B, N]
    values: Dict[int, Tensor] = field(default_factory=dict)         # layer -> [B, N, Dv]
    visual_attn: Dict[int, Tensor] = field(default_factory=dict)    # layer -> [B, N] (Need.VISUAL_ATTN)
    query_attn_norope: Dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, N] (Need.QUERY_ATTN_NOROPE)
    rater_attn: Dict[int, Tensor] = field(default_factory=dict)     # layer -> [B, N] (Need.RATER_ATTN)
    text: Optional[Tensor] = None               # [B, T, D]
    pixels: Optional[Tensor] = None             # [B, C, H, W]
    size: Optional[Tensor] = None               # [B, N] tokens each input already stands for
    layer: Optional[int] = None                 # layer after which this call happens
    num_layers: Optional[int] = None            # layers of the model part the method runs in
    state: Dict[str, Any] = field(default_factory=dict)  # per-forward scratch of progressive methods
    heads: Optional[int] = None                 # attention heads of the layers ``values`` come from
    # a pruning Reduction may defer gathering its tokens to their first read (the caller reads
    # them, if at all, in the same mode / stream / graph capture as the method's call)
    lazy_tokens: bool = False

    @property
    def n_image(self) -> int:
        return self.x.shape[1] - int(self.has_cls)


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

    `kept_rows` (made by `Reduction.of_kept_rows`): every output token is the input row
    ``x[b, index[b, k]]`` unchanged (pruning). Under `Context.lazy_tokens` its ``tokens`` is
    gathered on first use only, so a caller that holds ``x`` (the LLM path gathers the whole
    next sequence from the hidden states once) reads ``index`` and never pays for the
    ``[B, K, D]`` copy.
    """
    __slots__ = ("_tokens", "_gather", "_kept", "index", "source", "size")

    def __init__(self, tokens: Tensor, index: Tensor, source: Tensor, size: Tensor) -> None:
        self._tokens: Optional[Tensor] = tokens
        self._gather: Optional[Callable[[], Tensor]] = None
        self._kept = False
        self.index, self.source, self.size = index, source, size

    @classmethod
    def of_kept_rows(cls, gather: Callable[[], Tensor], index: Tensor, source: Tensor,
                     size: Tensor, *, lazy: bool = False) -> "Reduction":
        """A pruning Reduction whose tokens ``gather()`` returns (``x`` rows at ``index``):
        called now, or with ``lazy`` (`Context.lazy_tokens`) on the first read of ``tokens``."""
        red = cls(None if lazy else gather(), index, source, size)   # type: ignore[arg-type]
        red._gather, red._kept = (gather if lazy else None), True
        return red

    @property
    def kept_rows(self) -> bool:
        """tokens are the input rows at ``index``, unchanged (see `of_kept_rows`)."""
        return self._kept

    @property
    def tokens(self) -> Tensor:
        if self._tokens is None and self._gather is not None:
            self._tokens = self._gather()
        return self._tokens   # type: ignore[return-value]

    @tokens.setter
    def tokens(self, value: Tensor) -> None:
        self._tokens, self._gather, self._kept = value, None, False

    def __repr__(self) -> str:
        t = "lazy" if self._tokens is None else tuple(self._tokens.shape)
        return f"Reduction(tokens={t}, index={tuple(self.index.shape)}, source={tuple(self.source.shape)})"

    def unmerge(self, y: Tensor) -> Tensor:
        """Map per-output features ``y`` ``[B, K, C]`` back to the input positions
        ``[B, N, C]``; dropped positions get zeros."""
        src = self.source
        g = torch.gather(y, 1, src.clamp_min(0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return g * (src >= 0).unsqueeze(-1).to(g.dtype)


@dataclass(frozen=True)
class Budget:
    """How many image tokens a method keeps, as users state it: ``keep`` tokens or a
    ``ratio`` of the image tokens (one of them; neither: the method's own default, where it
    has one). Validated once, on creation; `resolve` turns it into a count for ``n`` tokens.

    ``where`` names who stated it in error messages (``tokenreduce.<where>: ...``): the
    method (``methods.divprune``) or the command (``profile``); it is not part of the value.
    """
    keep: Optional[int] = None
    ratio: Optional[float] = None
    where: str = field(default="methods", compare=False, repr=False)

    def __post_init__(self) -> None:
        keep, ratio = self.keep, self.ratio
        if keep is not None and ratio is not None:
            fail(self.where, "give keep or ratio, not both")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            fail(self.where, f"keep must be a positive int, got {keep!r}")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
                fail(self.where, f"ratio must be in (0, 1], got {ratio!r}")
            object.__setattr__(self, "ratio", float(ratio))

    @property
    def given(self) -> bool:
        """True when ``keep`` or ``ratio`` is stated (False: the method's default)."""
        return self.keep is not None or self.ratio is not None

    def resolve(self, n: int) -> int:
        """Image tokens to keep out of ``n`` (a Python int, static): ``keep`` (a ValueError when
        it exceeds ``n``: a budget is never clamped silently), or ``round(n * ratio)`` clamped
        to ``[1, n]``."""
        if self.keep is not None:
            if self.keep > n:
                fail(self.where, f"keep={self.keep} exceeds the {n} image tokens; give keep <= {n} "
                                 "or a ratio")
            return self.keep
        if self.ratio is not None:
            return max(1, min(n, int(round(n * self.ratio))))
        fail(self.where, "a budget is needed (keep=K or ratio=r)")

    def label(self) -> str:
        """``keep=64`` / ``ratio=0.25`` (the profiler's budget column), ``-`` for the default."""
        if self.keep is not None:
            return f"keep={self.keep}"
        return f"ratio={self.ratio:g}" if self.ratio is not None else "-"


class Method:
    """Base class of the reduction methods (see the module docstring).

    Subclasses set the class attributes, check their options in `configure` and implement
    `reduce`. The constructor takes the budget (``keep=`` or ``ratio=``, or a ready
    ``budget=Budget(...)``) and the method's own options.
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
    # The kept [CLS] goes on into the projector with the image tokens (VisionZip's LLaVA code
    # feeds [CLS] + dominant + contextual to the projector): the LLM then receives
    # ``keep_tokens(n) + 1`` tokens, and such a method counts [CLS] in its ``keep``
    # (``keep_tokens(n) == keep - 1``). False: LLaVA's "default" feature select drops [CLS].
    projects_cls: ClassVar[bool] = False

    def __init__(self, keep: Optional[int] = None, ratio: Optional[float] = None, *,
                 budget: Optional[Budget] = None, **opts: Any):
        unknown = set(opts) - set(self.options)
        if unknown:
            fail(self.where, f"unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}", TypeError)
        if budget is None:
            budget = Budget(keep, ratio, where=self.where)
        elif keep is not None or ratio is not None:
            fail(self.where, "give budget= or keep=/ratio=, not both")
        self.budget = budget
        self.opts = opts
        self.configure()
        if not self.budget.given and not self.default_budget_ok():
            fail(self.where, "a budget is needed (keep=K or ratio=r)")

    @property
    def where(self) -> str:
        """``methods.<name>``: where this method's errors say they come from."""
        return f"methods.{self.name}"

    def configure(self) -> None:
        """Check the options (``self.opts``) and set what follows from them; runs once, in the
        constructor, after the budget; may replace ``self.budget`` (FastV's ``R``)."""

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
        return self.budget.resolve(n)

    # -- the work ----------------------------------------------------------------
    def reduce(self, ctx: Context) -> Reduction:
        raise NotImplementedError

    def __call__(self, ctx: Context) -> Reduction:
        from .helpers import check_x   # helpers build on this module's types

        check_x(ctx, self.where)       # every method: a floating [B, N, D] ctx.x, clear errors
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
