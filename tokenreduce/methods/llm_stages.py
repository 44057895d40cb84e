"""The layer plan shared by the methods that reduce before several LLM layers (PyramidDrop,
VisionDrop, FEATHER).

``layers`` are the 1-based numbers l of the decoder layers that first see each reduced
sequence: the reduction runs after layer l - 1 and scores the tokens with layer l's own
attention, computed ahead on the current hidden states (``Need.LOOKAHEAD``), so
``reduce_layers`` lists l - 1 and ``attention_layers`` lists l.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from ..errors import fail
from .base import Context, Method, Stage
from .helpers import is_int_at_least


class LLMStages(Method):
    """A method with option ``layers`` (increasing ints >= 1), reducing before each of them."""
    stage = Stage.LLM
    default_layers: ClassVar[Tuple[int, ...]] = ()
    layer_count: ClassVar[Optional[int]] = None        # how many layers it takes (None: any)
    layers_rule: ClassVar[str] = "increasing ints >= 1"   # the rule, as the error states it

    def configure(self) -> None:
        layers = tuple(self.opts.get("layers", self.default_layers))
        if (not layers or not all(is_int_at_least(l, 1) for l in layers) or list(layers) != sorted(set(layers))
                or self.layer_count not in (None, len(layers))):
            fail(self.where, f"layers must be {self.layers_rule}, got {layers!r}")
        self.layers = layers

    def default_budget_ok(self) -> bool:
        return True

    def reduce_layers(self, num_layers: int) -> List[int]:
        if self.layers[-1] > num_layers - 1:
            fail(self.where, f"layer {self.layers[-1]} beyond the {num_layers} LLM layers")
        return [l - 1 for l in self.layers]

    def attention_layers(self, num_layers: int) -> List[int]:
        self.reduce_layers(num_layers)
        return list(self.layers)

    def stage_of(self, ctx: Context) -> int:
        """The stage of this call: the index in ``layers`` of ``ctx.layer + 1``."""
        if ctx.layer is None or ctx.layer + 1 not in self.layers:
            fail(self.where, f"called after layer {ctx.layer}; expected one of "
                             f"{[l - 1 for l in self.layers]} (ctx.layer must be set)")
        return self.layers.index(ctx.layer + 1)
