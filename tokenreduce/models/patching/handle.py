"""What `tokenreduce.patch` returns and records: `PatchHandle` (the installed patch, its
`CallStats` per call) and the pieces every patched model shares (method from a name and a
budget, the attention implementation switched and restored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ...errors import fail
from ...methods.base import Method, Need, Stage
from .. import attention

__all__ = ["PatchHandle", "CallStats", "resolve_method", "needs_fused_attention", "image_counts", "kept_counts",
           "ATTR"]

ATTR = "_tokenreduce_patch"     # the attribute of a patched model that holds its PatchHandle

# statistics only the "tokenreduce" attention records
RECORDED = frozenset({Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.QUERY_ATTN, Need.KEYS})


def resolve_method(method: Any, keep: Optional[int], ratio: Optional[float], options: Dict[str, Any]
                   ) -> Optional[Method]:
    """``method``: a registered name (built with ``keep`` / ``ratio`` / ``options``), a built
    `Method` (no budget or options then), or None / ``"none"`` (no reduction: the patched model
    runs its full token set through the same path)."""
    if method is None or (isinstance(method, str) and method.lower() == "none"):
        if keep is not None or ratio is not None or options:
            fail("patch", "method None / 'none' keeps every token: it takes no keep, ratio or options")
        return None
    if isinstance(method, Method):
        if keep is not None or ratio is not None or options:
            fail("patch", f"{method.name} is already built: give keep / ratio / options to its constructor, "
                          "or pass the method by name")
        return method
    if isinstance(method, str):
        from ... import methods
        return methods.build(method, keep, ratio, **options)
    fail("patch", f"method must be a registered name, a Method or None, got {type(method).__name__}", TypeError)


def needs_fused_attention(method: Optional[Method]) -> bool:
    """The method reads statistics only the ``"tokenreduce"`` attention records (or runs in the LLM)."""
    return method is not None and (method.stage == Stage.LLM or bool(method.needs & RECORDED))


@dataclass
class CallStats:
    """One patched call (a prefill, or every step of ``use_cache=False``).

    ``tokens_in`` / ``tokens_out``: image tokens per sample before the reduction and after it
    (padding slots of a reduction not counted); ``stage``: where the reduction ran (``"vit"``,
    ``"projector"``, ``"llm"``, or None without a method); ``steps``: each reduction (stage,
    layer, tokens in / out); ``fallbacks``: attention calls that could not use the fused op,
    and why. The counts are kept on the device until read (no host sync inside the call)."""
    stage: Optional[str]
    method: Optional[str]
    batch: int
    _in: Any = None
    _out: Any = None
    steps: List[Dict[str, Any]] = field(default_factory=list)
    fallbacks: Dict[str, int] = field(default_factory=dict)

    def _list(self, v) -> List[int]:
        """Per-sample counts (a tensor read here, or one count for the whole batch)."""
        out = [int(x) for x in v.tolist()] if isinstance(v, Tensor) else \
            [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        return out * self.batch if len(out) == 1 and self.batch > 1 else out

    @property
    def tokens_in(self) -> List[int]:
        return self._list(self._in)

    @property
    def tokens_out(self) -> List[int]:
        return self._list(self._out)

    def as_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "method": self.method, "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "steps": list(self.steps), "fallbacks": dict(self.fallbacks)}

    def __repr__(self) -> str:
        return f"CallStats({self.as_dict()})"


class PatchHandle:
    """An installed patch: ``handle.method``, ``handle.kind`` (``"llava"``, ``"llava-next"``,
    ``"qwen2-vl"``, ``"clip"``, ...), ``handle.stats`` (a list of `CallStats`, one per patched
    call; ``handle.stats.clear()`` to reset), ``handle.last`` (the last call's inputs of the
    LLM, a `tokenreduce.models.adapters.Prepared`, or a vision encoder's `VisionOutput`),
    ``handle.adapter`` / ``handle.reducer`` (a VLM's adapter and its `LLMReducer` for an
    LLM-stage method, else None), ``handle.unpatch()``."""

    def __init__(self, model: nn.Module, method: Optional[Method], kind: str):
        self.model, self.method, self.kind = model, method, kind
        self.stats: List[CallStats] = []
        self.last: Any = None
        self.adapter: Any = None
        self.reducer: Any = None
        self.original_forward: Optional[Callable] = None
        self._hooks: List[Any] = []
        self._attn: List[Tuple[nn.Module, Any]] = []
        self.active = False

    def switch_attention(self, parts: Optional[List[nn.Module]] = None) -> None:
        """Select the ``"tokenreduce"`` attention in ``parts`` (default the whole model; a
        VLM's vision tower for a VIT / PROJECTOR method, its LLM for an LLM-stage one, so the
        other part keeps its own attention), remembering every sub-model's choice."""
        from transformers import PreTrainedModel
        attention.register()
        self._attn = [(m, m.config._attn_implementation) for m in self.model.modules()
                      if isinstance(m, PreTrainedModel)]
        for part in parts if parts is not None else [self.model]:
            part.set_attn_implementation(attention.NAME)

    def install(self, forward: Callable, hooks: List[Any] = (), hide: Tuple[str, ...] = (),
                methods: Dict[str, Callable] = None) -> None:
        """``forward`` becomes the model's forward (same signature, less the ``hide`` parameters:
        ``generate`` then passes those inputs' raw form); ``methods``: instance-level overrides
        of other model methods (removed by `unpatch`)."""
        import functools
        import inspect
        self.original_forward = self.model.forward
        sig = inspect.signature(self.original_forward)
        wrapped = functools.wraps(self.original_forward)(forward)
        wrapped.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in hide])
        self.model.forward = wrapped
        self._overrides = dict(methods or {})
        for name, fn in self._overrides.items():
            setattr(self.model, name, fn)
        self._hooks = list(hooks)
        setattr(self.model, ATTR, self)
        self.active = True

    def unpatch(self) -> None:
        """Restore the model: its own forward, hooks removed, attention implementations back."""
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name in ["forward"] + list(getattr(self, "_overrides", {})):
            if name in vars(self.model):
                delattr(self.model, name)
        self._overrides = {}
        for m, impl in self._attn:
            if m.config._attn_implementation != impl:
                m.set_attn_implementation(impl)
        self._attn = []
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)
        self.active = False

    def record(self, st: CallStats) -> None:
        self.stats.append(st)

    def __repr__(self) -> str:
        name = self.method.name if self.method is not None else None
        return (f"PatchHandle(model={type(self.model).__name__}, kind={self.kind!r}, method={name!r}, "
                f"calls={len(self.stats)}, active={self.active})")


def image_counts(input_ids: Tensor, image_token: int) -> Tensor:
    """Image tokens per row ``[B]`` (kept on the device)."""
    return (input_ids == image_token).sum(1)


def kept_counts(is_img: Tensor, attention_mask: Tensor) -> Tensor:
    """Image tokens per row that are not padding slots ``[B]``."""
    return (is_img & attention_mask.bool()).sum(1)

