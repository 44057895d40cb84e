"""Baselines: random subset, uniform grid subsample, average pooling to a grid."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import register
from ..errors import fail
from .base import Context, Method, Need, Reduction
from .helpers import assemble, check_x, image_part, keep_indices, patch_grid


@register
class RandomKeep(Method):
    """Random subset of the image tokens (a baseline).

    score ~ U(0, 1) per image token from a generator seeded with ``seed`` on the input's
    device (the same inputs give the same subset); keep the ``keep`` highest, in spatial
    order; [CLS] first. x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``.
    """
    name = "random"
    paper = "baseline (random token dropping)"
    code = "tokenreduce"
    needs = frozenset({Need.FEATURES})
    options = {"seed": "seed of the counter-based hash (default 0)"}
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192/128/64 of 576"
    faithful_to = "a uniform random subset without replacement, independent per batch row"

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        u = hash_keys(ctx.x.shape[0], ctx.n_image, int(self.opts.get("seed", 0)), ctx.x.device)
        return keep_indices(ctx, u.topk(self.keep_tokens(ctx.n_image), dim=1).indices)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_keys(B: int, n: int, seed: int, device) -> torch.Tensor:
    """``[B, n]`` int64 pseudo-random keys: SplitMix64 of the counter ``b * n + j`` and the seed.
    The same bits on every device (no generator state, nothing copied from the host), so a
    CPU and a CUDA run keep the same tokens and CUDA graphs replay it unchanged."""
    z = torch.arange(B * n, device=device, dtype=torch.int64).view(B, n)
    z = z + _signed(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


@register
class UniformKeep(Method):
    """Uniform spatial subsample (a baseline).

    When ``keep = s*s`` and the grid is square: rows and columns
    ``floor((i + 0.5) * h / s)``; otherwise ``keep`` positions evenly spaced in raster
    order, ``floor((i + 0.5) * n / keep)``. Same positions for every batch row.
    x ``[B, (1 +) n, D]`` -> ``[B, (1 +) keep, D]``.
    """
    name = "uniform"
    paper = "baseline (uniform grid subsampling, e.g. FEATHER's uniform stage)"
    code = "tokenreduce"
    needs = frozenset({Need.FEATURES, Need.GRID})
    budgets = "keep=K or ratio=r; LLaVA-1.5 presets keep=192/128/64 of 576 (64 = 8x8 grid)"
    faithful_to = "a regular grid of cell centres"

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        h, w = patch_grid(self.where, ctx.n_image, ctx.grid)
        k = self.keep_tokens(ctx.n_image)
        dev = ctx.x.device
        s = math.isqrt(k)
        if s * s == k and h == w:
            r = ((torch.arange(s, device=dev) + 0.5) * h / s).floor().long()
            idx = (r[:, None] * w + r[None, :]).reshape(-1)
        else:
            idx = ((torch.arange(k, device=dev) + 0.5) * (h * w) / k).floor().long()
        return keep_indices(ctx, idx.expand(ctx.x.shape[0], k))


@register
class Pool(Method):
    """Average pooling of the image tokens to a smaller grid (LLaVolta / Matryoshka style).

    The ``h x w`` token grid is pooled to ``gh x gw`` cells by adaptive average pooling
    (exact windows when the sizes divide, as 24 -> 12 / 8 / 6 / 4 / 3 / 2 / 1); each
    output is a synthesised token (index -1); source maps each input to the cell that
    holds it. x ``[B, (1 +) h*w, D]`` -> ``[B, (1 +) gh*gw, D]``.
    """
    name = "pool"
    paper = ("Chen et al., Efficient Large Multi-modal Models via Visual Context Compression "
             "(LLaVolta), NeurIPS 2024; Cai et al., Matryoshka Multimodal Models, 2024")
    code = "github.com/Beckschen/LLaVolta"
    needs = frozenset({Need.FEATURES, Need.GRID})
    options = {"out_grid": "(gh, gw) of the pooled grid; default: the most square gh x gw = keep"}
    budgets = ("keep=K or ratio=r: the most square grid gh x gw = K (nested presets of 576: 144, 64, "
               "36, 16, 9, 1 are squares; 192 -> 12x16, 128 -> 8x16), or out_grid=(gh, gw)")
    faithful_to = "average pooling of the patch grid (LLaVolta's stage pooling, Matryoshka's nested sizes)"
    deviations = ("non-divisible sizes use adaptive pooling windows (overlapping), source = the cell of "
                  "floor(i*g/h); a non-square keep takes the most square factorisation that fits the grid "
                  "(an error when none fits); a ratio takes the fitting grid nearest round(n * ratio)")

    def default_budget_ok(self) -> bool:
        return self.opts.get("out_grid") is not None

    def _out_grid(self, n: int, grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The pooled grid for ``n`` tokens on ``grid`` (default: the square grid of ``n``),
        computed once per ``(n, grid)`` (a search over factorisations, called twice a call)."""
        key = (n, None if grid is None else (int(grid[0]), int(grid[1])))
        memo = self.__dict__.setdefault("_grid_memo", {})
        if key not in memo:
            memo[key] = self._search_grid(n, grid)
        return memo[key]

    def _search_grid(self, n: int, grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        g = self.opts.get("out_grid")
        if g is not None:
            gh, gw = int(g[0]), int(g[1])
            if gh < 1 or gw < 1:
                fail(self.where, f"out_grid must be positive, got {(gh, gw)}")
            return gh, gw
        h, w = grid if grid is not None else ((math.isqrt(n),) * 2 if math.isqrt(n) ** 2 == n else (n, n))
        k = self.budget.resolve(n)
        # keep=K: the most square factorisation gh x gw = K (gh <= gw first) that fits the grid,
        # e.g. 64 -> 8x8, 128 -> 8x16, 192 -> 12x16 on 24x24
        fits = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
        if fits:
            return min(fits, key=lambda ab: (abs(ab[0] - ab[1]), ab[0] > ab[1]))
        if self.budget.ratio is None:
            fail(self.where, f"keep={k} has no factorisation gh x gw that fits the {h}x{w} token grid; "
                             "give another keep, a ratio, or out_grid=(gh, gw)")
        # ratio=r: the grid that fits whose size is nearest round(n * r) (then the most square)
        return min(((a, b) for a in range(1, h + 1) for b in range(1, w + 1)),
                   key=lambda ab: (abs(ab[0] * ab[1] - k), ab[0] * ab[1] > k, abs(ab[0] - ab[1]), ab[0] > ab[1]))

    def keep_tokens(self, n: int) -> int:
        gh, gw = self._out_grid(n)
        return gh * gw

    def reduce(self, ctx: Context) -> Reduction:
        check_x(ctx, self.where)
        h, w = patch_grid(self.where, ctx.n_image, ctx.grid)
        gh, gw = self._out_grid(ctx.n_image, (h, w))
        if gh > h or gw > w:
            fail(self.where, f"out_grid {(gh, gw)} is larger than the token grid {(h, w)}")
        if gh * gw != self.keep_tokens(ctx.n_image):
            fail(self.where, f"the {h}x{w} grid pools to {gh}x{gw}, not the {self.keep_tokens(ctx.n_image)} "
                             "tokens planned for a square grid: give out_grid=(gh, gw)")
        x = image_part(ctx, ctx.x)
        B, n, D = x.shape
        # a channels-last view [B, D, h, w] of x. Not x.transpose(1, 2).reshape(...): at B=1 that
        # gives the batch dim the stride D, which the pooling's layout test reads as "not channels
        # last", so it copies the whole input to NCHW first (3.3 of 3.5 ms at N=576 D=1024, 1 thread)
        img = x.unflatten(1, (h, w)).permute(0, 3, 1, 2)
        exact = h % gh == 0 and w % gw == 0
        img32 = img if img.dtype == torch.float32 else img.float()
        if exact:   # exact windows: the fixed-stride pool the authors use
            pooled = torch.nn.functional.avg_pool2d(img32, (h // gh, w // gw))
        else:
            pooled = torch.nn.functional.adaptive_avg_pool2d(img32, (gh, gw))
        pooled = pooled if pooled.dtype == x.dtype else pooled.to(x.dtype)
        tokens = pooled.reshape(B, D, gh * gw).transpose(1, 2)
        dev = x.device
        K = gh * gw
        if exact:   # the cell of token (i, j) is (i // kh, j // kw): one arange, broadcast
            kh, kw = h // gh, w // gw
            cell = torch.arange(K, device=dev).view(gh, 1, gw, 1).expand(gh, kh, gw, kw).reshape(-1)
            if ctx.size is None:
                # unit input sizes: every cell holds kh * kw tokens, so the Reduction is built
                # directly (the result of `assemble`, without its scatter_add)
                return self._exact(ctx, tokens, cell, float(kh * kw))
        else:
            rows = (torch.arange(h, device=dev) * gh) // h
            cols = (torch.arange(w, device=dev) * gw) // w
            cell = (rows[:, None] * gw + cols[None, :]).reshape(-1)
        index = torch.full((B, K), -1, dtype=torch.long, device=dev)
        return assemble(ctx, tokens, index, cell.expand(B, n))

    @staticmethod
    def _exact(ctx: Context, tokens: torch.Tensor, cell: torch.Tensor, area: float) -> Reduction:
        """`assemble` of exact-window cells of ``area`` unit-size tokens each: tokens [B, K, D],
        cell [n] (the cell of each image token) -> the Reduction ([CLS] first when present)."""
        B, K = tokens.shape[:2]
        dev = tokens.device
        index = torch.full((B, K), -1, dtype=torch.long, device=dev)
        size = torch.full((B, K), area, dtype=torch.float32, device=dev)
        source = cell.expand(B, cell.shape[0])              # a view, as `assemble` returns it
        if ctx.has_cls:
            tokens = torch.cat([ctx.x[:, :1].to(tokens.dtype), tokens], dim=1)
            index = torch.nn.functional.pad(index, (1, 0), value=0)
            size = torch.nn.functional.pad(size, (1, 0), value=1.0)
            source = torch.nn.functional.pad(source + 1, (1, 0), value=0)
        return Reduction(tokens, index, source, size)
