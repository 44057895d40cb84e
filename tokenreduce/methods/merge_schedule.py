"""The per-block merge schedule shared by the methods that merge in every ViT block (ToMe, Turbo).

``r=R``: merge R tokens in every block (clamped to half the mergeable tokens, as ToMe);
``keep=K`` / ``ratio=q``: merge ``ceil((n_l - K) / (L - l))`` tokens in block ``l`` (``n_l``
tokens left, ``L`` blocks), so the encoder output has K image tokens. All counts are Python
ints computed from static shapes.
"""
from __future__ import annotations

import math
from typing import List, Optional

from ..errors import fail
from .base import Context, Method, Stage
from .helpers import int_option, is_int_at_least


class MergeSchedule(Method):
    """Budget handling of the per-block merging methods: ``r`` per block, or keep / ratio at
    the encoder output (options ``r`` and ``num_layers``; see the module docstring)."""
    stage = Stage.VIT

    def configure(self) -> None:
        r = self.opts.get("r")
        if r is not None:
            if self.budget.given:
                fail(self.where, "give r= (tokens merged per block) or keep=/ratio=, not both")
            if not is_int_at_least(r, 0):
                fail(self.where, f"r must be an int >= 0, got {r!r}")
        int_option(self, "num_layers", 24, rule="a positive int")

    def default_budget_ok(self) -> bool:
        return self.opts.get("r") is not None

    def _L(self, ctx: Optional[Context] = None) -> int:
        if ctx is not None and ctx.num_layers is not None:
            return int(ctx.num_layers)
        return int(self.opts.get("num_layers", 24))

    def reduce_layers(self, num_layers: int) -> List[int]:
        return list(range(num_layers))

    def keep_tokens(self, n: int) -> int:
        r = self.opts.get("r")
        if r is None:
            return self.budget.resolve(n)
        for _ in range(self._L()):
            n -= min(r, n // 2)
        return n

    def r_at(self, ctx: Context) -> int:
        """Tokens to merge at this call (ToMe's per-block r)."""
        n = ctx.n_image
        r = self.opts.get("r")
        if r is not None:
            return min(r, n // 2)
        n0 = ctx.state.setdefault(f"{self.name}.n0", n)   # the budget refers to the first call
        target = self.budget.resolve(n0)
        if ctx.layer is None:
            return max(0, min(n - target, n // 2))
        L = self._L(ctx)
        if not 0 <= ctx.layer < L:
            fail(self.where, f"ctx.layer={ctx.layer} outside [0, {L})")
        left = L - ctx.layer
        return max(0, min(math.ceil((n - target) / left), n // 2))
