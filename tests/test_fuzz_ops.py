"""Differential fuzzing of the ops against a float64 oracle, with fresh seeds every run.

Each case draws its shapes (1 to ~1k tokens), dtype, strides and options from a seeded
generator; the oracle is `tokenreduce.reference` run in float64 on the same (rounded)
inputs. Discrete decisions are checked exactly where they are exact (float64 inputs, and
ties built from one-hot rows, whose scores are exact in any summation order) and by a
certificate elsewhere (each greedy pick / merge / assignment is optimal up to the dtype's
rounding), so a near-tie that rounds the other way is not a failure but a wrong choice is.

The seed is fresh each run and printed in the header (``tokenreduce fuzz seed``) and in
every failure; rerun a failure with ``TOKENREDUCE_FUZZ_SEED=<seed> pytest tests/test_fuzz_ops.py``.
``TOKENREDUCE_FUZZ_CASES`` sets the cases per op (default 24: the quick slice CI runs).
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from tokenreduce import ops, reference

SEED = int(os.environ.get("TOKENREDUCE_FUZZ_SEED") or random.SystemRandom().randrange(2**31))
CASES = int(os.environ.get("TOKENREDUCE_FUZZ_CASES", "24"))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# error of one value stored in the dtype, relative to the values' scale
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Case:
    """One fuzz case: a python RNG for the choices, a torch generator for the data."""

    def __init__(self, op: str, i: int):
        self.seed = (SEED * 1_000_003 + i * 7919 + sum(map(ord, op))) % 2**62
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed % 2**31)
        self.tag = f"fuzz seed={SEED} case={i} (rerun: TOKENREDUCE_FUZZ_SEED={SEED} pytest tests/test_fuzz_ops.py -k '{op} and {i}')"

    def size(self, lo: int, hi: int) -> int:
        """Log-uniform int in [lo, hi]: small sizes and edge cases are common."""
        return min(hi, max(lo, int(math.exp(self.rng.uniform(math.log(lo), math.log(hi + 1))))))

    def randn(self, *shape, dtype=torch.float32, strided: bool = False) -> torch.Tensor:
        """Random normal data; with ``strided`` a view that is not contiguous in any dim."""
        if not strided:
            return torch.randn(*shape, generator=self.gen).to(dtype)
        big = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=self.gen).to(dtype)
        return big[..., 1::2]

    def compared_rows(self, B: int, N: int, dtype):
        """Rows an op compares instead of x (ToMe's metric, VisionZip's features): one-hot rows
        (exact ties) 30 % of the time, random rows 21 %, else None (x itself); and the ties flag."""
        ties = self.rng.random() < 0.3
        if ties:
            return self.onehot(B, N, self.size(1, 8), dtype), True
        return (self.randn(B, N, self.size(1, 64), dtype=dtype) if self.rng.random() < 0.3 else None), False

    def onehot(self, B: int, N: int, C: int, dtype) -> torch.Tensor:
        """Rows that are one-hot over C categories: every cosine is exactly 0 or 1."""
        cat = torch.randint(0, C, (B, N), generator=self.gen)
        return torch.nn.functional.one_hot(cat, C).to(dtype)


def cases(op: str):
    return [pytest.param(op, i, id=f"{op}-{i}") for i in range(CASES)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, tag: str) -> None:
    a, b = a.double(), b.double()
    same_nan = torch.isnan(a) == torch.isnan(b)
    assert bool(same_nan.all()), f"{what}: NaN pattern differs; {tag}"
    a, b = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}; {tag}"


# --------------------------------------------------------------------------------------
# attention_with_scores
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,i", cases("attention_with_scores"))
def test_attention_with_scores(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    B = c.size(1, 3)
    Hkv = c.rng.choice([1, 1, 2, 4])
    H = Hkv * c.rng.choice([1, 2, 3])
    long_keys = c.rng.random() < 0.1                      # the two-pass path (Nk > 4096)
    Nk = c.size(4097, 5000) if long_keys else c.size(1, 700)
    Nq = c.size(1, 4) if long_keys else c.rng.choice([Nk, c.size(1, 400)])
    Dh = c.rng.choice([1, 8, 16, 32, 64, 80, 128])
    Dv = c.rng.choice([Dh, c.size(1, 96)])
    strided = c.rng.random() < 0.3
    q = c.randn(B, H, Nq, Dh, dtype=dtype, strided=strided)
    k = c.randn(B, Hkv, Nk, Dh, dtype=dtype, strided=strided)
    v = c.randn(B, Hkv, Nk, Dv, dtype=dtype)
    causal = c.rng.random() < 0.4
    key_bias = None
    if c.rng.random() < 0.5:
        key_bias = torch.randn(B, Nk, generator=c.gen)
        key_bias[torch.rand(B, Nk, generator=c.gen) < c.rng.choice([0.0, 0.3, 1.0])] = -math.inf
    score_rows = c.rng.choice([None, [0], [-1], [c.rng.randrange(-Nq, Nq) for _ in range(c.size(1, 9))]])
    scale = c.rng.choice([None, 0.05, 1.0 / math.sqrt(max(Dh, 1))])

    out, scores = ops.attention_with_scores(q, k, v, scale=scale, causal=causal, key_bias=key_bias,
                                            score_rows=score_rows)
    rows = None if score_rows is None else torch.tensor(score_rows, dtype=torch.long) % Nq
    bias64 = None if key_bias is None else key_bias.double()
    ref_out, ref_scores = reference.attention_with_scores(
        q.double(), k.double(), v.double(), scale=scale, causal=causal, key_bias=bias64, score_rows=rows)
    assert out.dtype == dtype and out.shape == (B, H, Nq, Dv), c.tag
    assert scores.shape == (B, Nk), c.tag
    vmax = v.double().abs().max().item() if v.numel() else 1.0
    _close(out, ref_out, 4 * EPS[dtype] * max(vmax, 1.0) + 1e-6 * (dtype != torch.float64), "out", c.tag)
    # scores: probabilities computed in float32 from the rounded inputs (float64 for float64)
    _close(scores, ref_scores, 1e-10 if dtype == torch.float64 else 5e-5, "scores", c.tag)


# --------------------------------------------------------------------------------------
# kcenter
# --------------------------------------------------------------------------------------


def _dist64(x: torch.Tensor, metric: str) -> torch.Tensor:
    x = x.double()
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        xn = torch.where(x.norm(dim=-1, keepdim=True) > 0, xn, torch.zeros_like(xn))
        d = 1.0 - xn @ xn.transpose(-1, -2)
        zero = x.norm(dim=-1) == 0
        return torch.where(zero[..., :, None] | zero[..., None, :], torch.ones_like(d), d)
    return torch.cdist(x, x)


@pytest.mark.parametrize("op,i", cases("kcenter"))
def test_kcenter(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    metric = c.rng.choice(["cosine", "l2"])
    B, N, D = c.size(1, 3), c.size(1, 700), c.size(1, 300)
    ties = c.rng.random() < 0.3
    x = c.onehot(B, N, c.size(1, 12), dtype) if ties else c.randn(B, N, D, dtype=dtype,
                                                                     strided=c.rng.random() < 0.3)
    mask = None
    if c.rng.random() < 0.4:
        mask = torch.rand(B, N, generator=c.gen) < 0.7
        mask[:, 0] = True
    eligible = N if mask is None else int(mask.sum(1).min())
    k = c.rng.choice([0, 1, eligible, c.size(1, eligible)])
    kind = c.rng.choice(["int", "tensor", "isolated"])
    if kind == "int":
        first = c.rng.choice([0, -N]) if mask is not None else c.rng.randrange(-N, N)
    elif kind == "tensor":
        first = torch.zeros(B, dtype=torch.long) if mask is not None else torch.randint(-N, N, (B,), generator=c.gen)
    else:
        first = "isolated"

    index, mindist = ops.kcenter(x, k, metric=metric, first=first, mask=mask)
    assert index.shape == (B, k) and index.dtype == torch.long and mindist.shape == (B, N), c.tag
    if k == 0:
        assert bool(torch.isinf(mindist).all()), c.tag
        return
    # exact: 0/1 cosines, or float64 arithmetic away from ties (with D = 1 every cosine is
    # +-1 in exact arithmetic, so float64 rounding decides those ties: the certificate checks)
    if ties or (dtype == torch.float64 and not (metric == "cosine" and D == 1)):
        ref_index, _ = reference.kcenter(x.double(), k, metric=metric, first=first, mask=mask)
        if metric == "cosine" or dtype == torch.float64:
            assert torch.equal(index, ref_index), f"picks differ from the float64 oracle; {c.tag}"
    # certificate of every greedy step, in float64 on the rounded inputs
    dist = _dist64(x, metric)
    ok = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    tol = 8 * EPS[dtype] * (1.0 if metric == "cosine" else max(dist.max().item(), 1.0)) + 1e-9
    for b in range(B):
        picks = index[b].tolist()
        assert len(set(picks)) == k and all(bool(ok[b, p]) for p in picks), f"invalid picks {picks}; {c.tag}"
        if isinstance(first, int):
            assert picks[0] == first % N, c.tag
        elif isinstance(first, torch.Tensor):
            assert picks[0] == int(first[b]) % N, c.tag
        md = dist[b, picks[0]].clone()
        for j in range(1, k):
            cand = md.masked_fill(~ok[b], -math.inf)
            cand[picks[:j]] = -math.inf
            assert md[picks[j]] >= cand.max() - tol, f"pick {j} is not the farthest; {c.tag}"
            md = torch.minimum(md, dist[b, picks[j]])
        md[picks] = 0.0
        _close(mindist[b], md, tol, "mindist", c.tag)


# --------------------------------------------------------------------------------------
# bipartite_merge
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,i", cases("bipartite_merge"))
def test_bipartite_merge(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    B, N, D = c.size(1, 3), c.size(1, 600), c.size(1, 200)
    protect = c.rng.choice([0, 0, 1, 2]) if N > 2 else 0
    r = c.rng.choice([0, (N - protect) // 2, c.size(1, max(1, (N - protect) // 2))])
    r = min(r, (N - protect) // 2)
    order = c.rng.choice(["tome", "spatial"])
    x = c.randn(B, N, D, dtype=dtype, strided=c.rng.random() < 0.3)
    metric, ties = c.compared_rows(B, N, dtype)
    size = None
    if c.rng.random() < 0.5:
        size = torch.rand(B, N, generator=c.gen) * 3 + 0.5
        if c.rng.random() < 0.5:
            size = size[..., None]                                 # ToMe's [B, N, 1]

    merged, size_out, source = ops.bipartite_merge(x, r, metric=metric, size=size, protect=protect, order=order)
    assert merged.shape == (B, N - r, D) and size_out.shape == (B, N - r) and source.shape == (B, N), c.tag
    s = torch.ones(B, N, dtype=torch.float64) if size is None else size.reshape(B, N).double()
    if ties or (dtype == torch.float64 and (D if metric is None else metric.shape[-1]) > 1):
        ref = reference.bipartite_merge(x.double(), r, metric=None if metric is None else metric.double(),
                                        size=None if size is None else size.double(), protect=protect, order=order)
        assert torch.equal(source, ref[2]), f"source differs from the float64 oracle; {c.tag}"
    # self-consistency: every slot is the size-weighted mean of the tokens that went to it
    assert int(source.min()) >= 0 and int(source.max()) < N - r, c.tag
    num = torch.zeros(B, N - r, D, dtype=torch.float64).scatter_add_(
        1, source[..., None].expand(-1, -1, D), x.double() * s[..., None])
    den = torch.zeros(B, N - r, dtype=torch.float64).scatter_add_(1, source, s)
    assert bool((den > 0).all()), f"an empty output slot; {c.tag}"
    _close(size_out, den, 1e-5 * max(float(den.max()), 1.0), "size", c.tag)
    xmax = max(x.double().abs().max().item(), 1.0)
    _close(merged, num / den[..., None], 4 * EPS[dtype] * xmax + 1e-6 * (dtype != torch.float64), "merged", c.tag)
    # protected tokens stay alone and in place; exactly r A tokens merged, each into a B token
    for p in range(protect):
        assert bool((source[:, p] == p).all()) and bool(((source == source[:, p:p + 1]).sum(1) == 1).all()), c.tag
    if r == 0:
        assert torch.equal(source, torch.arange(N).expand(B, N)), c.tag
        return
    m = (x if metric is None else metric).double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    scores[:, : (protect + 1) // 2] = -math.inf
    scores[:, :, : protect // 2] = -math.inf
    best = scores.max(-1).values
    tol = 8 * EPS[dtype] + 1e-9
    for b in range(B):
        sa, sb = source[b, ::2], source[b, 1::2]
        merged_a = torch.isin(sa, sb)
        assert int(merged_a.sum()) == r, f"{int(merged_a.sum())} A tokens merged, not r={r}; {c.tag}"
        partner = (sa[merged_a, None] == sb[None, :]).float().argmax(1)
        chosen = scores[b, merged_a.nonzero()[:, 0], partner]
        assert bool((chosen >= best[b, merged_a] - tol).all()), f"a merge into a worse partner; {c.tag}"
        if bool((~merged_a).any()):
            assert best[b, merged_a].min() >= best[b, ~merged_a].max() - tol, f"a weaker edge merged; {c.tag}"


# --------------------------------------------------------------------------------------
# recycle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,i", cases("recycle"))
def test_recycle(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    B, N, D = c.size(1, 3), c.size(2, 600), c.size(1, 200)
    T = c.size(1, N - 1)
    S = c.rng.choice([0, N - T, c.size(1, N - T)])
    perm = torch.stack([torch.randperm(N, generator=c.gen) for _ in range(B)])
    target, source = perm[:, :T].contiguous(), perm[:, T:T + S].contiguous()
    x = c.randn(B, N, D, dtype=dtype, strided=c.rng.random() < 0.3)
    features, ties = c.compared_rows(B, N, dtype)
    weight = None
    if c.rng.random() < 0.5:
        weight = torch.rand(B, N, generator=c.gen)
        weight[torch.rand(B, N, generator=c.gen) < 0.1] = 0.0
    assign = None
    if c.rng.random() < 0.3:
        assign = torch.randint(-1, T, (B, S), generator=c.gen)
    include_target = c.rng.random() < 0.5

    out, count = ops.recycle(x, target, source, weight=weight, assign=assign, features=features,
                             include_target=include_target)
    assert out.shape == (B, T, D) and out.dtype == dtype and count.shape == (B, T), c.tag
    # the assignment the op must have made, in float64 on the rounded inputs
    f = (x if features is None else features).double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ft = f.gather(1, target[..., None].expand(-1, -1, f.shape[-1]))
    fs = f.gather(1, source[..., None].expand(-1, -1, f.shape[-1]))
    sim = fs @ ft.transpose(-1, -2)                                   # [B, S, T]
    exact = ties or assign is not None or S == 0 or T == 1 or (dtype == torch.float64 and f.shape[-1] > 1)
    if not exact:
        top2 = sim.topk(2, dim=-1).values
        if float((top2[..., 0] - top2[..., 1]).min()) < 8 * EPS[dtype] + 1e-9:
            # a near-tie may round either way: only the totals are checked
            assert int(count.sum()) == B * (T * include_target + S), c.tag
            return
    ref_out, ref_count = reference.recycle(x.double(), target, source,
                                           weight=None if weight is None else weight.double(), assign=assign,
                                           features=None if features is None else features.double(),
                                           include_target=include_target)
    assert torch.equal(count, ref_count), f"counts differ from the float64 oracle; {c.tag}"
    xmax = max(x.double().abs().max().item(), 1.0)
    _close(out, ref_out, 4 * EPS[dtype] * xmax + 1e-6 * (dtype != torch.float64), "out", c.tag)


@pytest.mark.parametrize("op,i", cases("region_attention"))
def test_region_attention(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    B, gh, gw, s, L = c.size(1, 3), c.size(1, 9), c.size(1, 9), c.size(1, 4), c.size(1, 4)
    heads = c.size(1, 4)
    C, Cv = heads * c.size(1, 40), heads * c.size(1, 40)
    N = gh * s * gw * s
    q = c.randn(B, gh * gw, C, dtype=dtype, strided=c.rng.random() < 0.3)
    k = c.randn(B, L, N, C, dtype=dtype, strided=c.rng.random() < 0.3)
    v = c.randn(B, L, N, Cv, dtype=dtype, strided=c.rng.random() < 0.3)
    scale = c.rng.choice([None, c.rng.uniform(0.01, 2.0)])
    out, lse = ops.region_attention(q, k, v, (gh, gw), region=s, heads=heads, scale=scale, return_lse=True)
    assert out.shape == (B, gh * gw, Cv) and out.dtype == dtype, c.tag
    ref, ref_lse = reference.region_attention(q.double(), k.double(), v.double(), (gh, gw), region=s, heads=heads,
                                              scale=scale, return_lse=True)
    # out is a convex combination of v rows: its error is the rounding of out and of the
    # weights, whose logits carry the accumulation's rounding (float32 unless float64)
    sc = (C // heads) ** -0.5 if scale is None else scale
    logit_bound = sc * (C // heads) * q.double().abs().max().item() * k.double().abs().max().item()
    acc_eps = EPS[torch.float64] if dtype == torch.float64 else EPS[torch.float32]
    vmax = max(v.double().abs().max().item(), 1.0)
    _close(out, ref, (4 * EPS[dtype] + 16 * acc_eps * (1 + logit_bound)) * vmax, "out", c.tag)
    _close(lse, ref_lse, 16 * acc_eps * (1 + logit_bound), "lse", c.tag)
# --------------------------------------------------------------------------------------
# dpp_select
# --------------------------------------------------------------------------------------


def _dpp_gains64(x: torch.Tensor, rel, picks) -> torch.Tensor:
    """Float64 marginal gains d2 [N] of every token given the picked set (exact Schur
    complement of L = diag(r) S diag(r) on the rounded inputs)."""
    x = x.double()
    n = x.norm(dim=-1, keepdim=True)
    u = x / n.clamp_min(1e-12)
    r = torch.ones(x.shape[0], dtype=torch.float64) if rel is None else rel.double()
    L = r[:, None] * (u @ u.t()) * r[None, :]
    diag = r * r * torch.where(n[:, 0] ** 2 >= 1e-24, torch.ones_like(r), (n[:, 0] / 1e-12) ** 2)
    if not picks:
        return diag
    P = torch.tensor(picks)
    Lyy = L[P][:, P]
    Lyi = L[P]
    sol = torch.linalg.lstsq(Lyy, Lyi).solution
    return diag - (Lyi * sol).sum(0)


@pytest.mark.parametrize("op,i", cases("dpp_select"))
def test_dpp_select(op, i):
    c = Case(op, i)
    dtype = c.rng.choice(DTYPES)
    B, N = c.size(1, 3), c.size(1, 600)
    ties = c.rng.random() < 0.3
    if ties:
        x = c.onehot(B, N, c.size(1, 12), dtype)
        rel = None if c.rng.random() < 0.5 else torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (B, N), generator=c.gen)]
    else:
        D = c.size(1, 300)
        x = c.randn(B, N, D, dtype=dtype, strided=c.rng.random() < 0.3)
        rel = None if c.rng.random() < 0.4 else torch.rand(B, N, generator=c.gen) + 0.05
    mask = None
    if c.rng.random() < 0.4:
        mask = torch.rand(B, N, generator=c.gen) < 0.7
        mask[:, 0] = True
    eligible = N if mask is None else int(mask.sum(1).min())
    cap = eligible if ties else max(1, min(eligible, x.shape[-1] // 2))
    k = c.rng.choice([0, 1, cap, c.size(1, cap), min(N, cap + c.size(1, 5))])

    index, gains = ops.dpp_select(x, k, relevance=rel, mask=mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert index.shape == (B, k) and index.dtype == torch.long and gains.shape == (B, k) and gains.dtype == acc, c.tag
    if k == 0:
        return
    if ties:  # one-hot rows: every similarity is exactly 0 or 1, so the float64 oracle is exact
        ref_index, ref_gains = reference.dpp_select(x.double(), k, relevance=rel, mask=mask)
        assert torch.equal(index, ref_index), f"picks differ from the float64 oracle; {c.tag}"
    ok = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    for b in range(B):
        picks = index[b].tolist()
        assert len(set(picks)) == k, f"repeated picks {picks}; {c.tag}"
        n_ok = int(ok[b].sum())
        assert all(bool(ok[b, p]) for p in picks[:min(k, n_ok)]), f"a masked pick before the eligible; {c.tag}"
        r = None if rel is None else rel[b]
        scale = float(_dpp_gains64(x[b], r, []).masked_fill(~ok[b], 0).max().clamp_min(1e-300))
        zero = [t for t in range(k) if float(gains[b, t]) == 0.0]
        assert zero == list(range(zero[0], k)) if zero else True, f"a real pick after a fallback; {c.tag}"
        for t in sorted(set(range(min(k, 16))) | set(zero[:1]) | {k - 1}):  # the checks cost O(t^2 N) each
            # after the first fallback the picked kernel is singular: the real picks span it
            d2 = _dpp_gains64(x[b], r, picks[:min(t, zero[0]) if zero else t])
            cand = d2.masked_fill(~ok[b], -math.inf)
            cand[picks[:t]] = -math.inf
            best = float(cand.max()) if t < n_ok else 0.0
            if float(gains[b, t]) == 0.0:  # fallback: nothing independent enough was left
                assert best <= (1e-5 if acc == torch.float32 else 1e-10) * scale + tol * scale, \
                    f"gain 0 at step {t} while {best:.3g} was available; {c.tag}"
            else:
                assert float(d2[picks[t]]) >= best - tol * scale, f"pick {t} is not the best; {c.tag}"
                assert abs(float(gains[b, t]) - float(d2[picks[t]])) <= tol * scale, f"gain {t}; {c.tag}"
