"""Plain-PyTorch references of the core ops.

Each is written the way published code does it today (eager attention then a sum,
DivPrune's distance matrix and Python loop, ToMe's gather/scatter merge, scatter_reduce
recycling, TokenPacker's unfold of the key windows). They are the oracle of the tests and the baseline of the benchmarks, so they
favour clarity over speed; they compute in float32 (float64 for float64 input) and return
the same dtypes as the ops.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["attention_with_scores", "kcenter", "bipartite_merge", "recycle", "region_attention", "dpp_select"]


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_with_scores(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_bias: Optional[Tensor] = None,
    score_rows: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Eager attention, then the head- and row-mean of the probabilities.

    q [B, H, Nq, Dh], k [B, Hkv, Nk, Dh], v [B, Hkv, Nk, Dv] -> out [B, H, Nq, Dv], scores [B, Nk].
    Rows with no admissible key (causal with Nq > Nk, or an all -inf key_bias) are zero.
    """
    acc = _acc(q)
    B, H, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = Dh**-0.5 if scale is None else scale
    kk = k.to(acc).repeat_interleave(H // Hkv, dim=1)
    vv = v.to(acc).repeat_interleave(H // Hkv, dim=1)
    attn = (q.to(acc) @ kk.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]: what eager pays for
    if key_bias is not None:
        attn = attn + key_bias.to(acc)[:, None, None, :]
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        attn = attn.masked_fill(j > i + (Nk - Nq), -math.inf)
    empty = torch.isneginf(attn).all(-1, keepdim=True)
    attn = attn.softmax(dim=-1).masked_fill(empty, 0.0)
    out = (attn @ vv).to(q.dtype)
    rows = attn if score_rows is None else attn[:, :, score_rows]
    scores = rows.mean(dim=(1, 2))
    return out, scores


def _cosine_distance_matrix(x: Tensor) -> Tensor:
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - xn @ xn.transpose(-1, -2)


def kcenter(
    x: Tensor,
    k: int,
    *,
    metric: str = "cosine",
    first: Union[int, Tensor, str] = 0,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """DivPrune's greedy max-min: a full distance matrix, then a Python loop over picks
    (and over the batch: the published code runs one image at a time).

    x [B, N, D] -> index [B, k] int64, mindist [B, N] float32. k = 0 picks nothing and every
    distance to the (empty) set is +inf; negative ``first`` indices count from the end.
    """
    B, N, _ = x.shape
    acc = _acc(x)
    index = torch.empty(B, k, dtype=torch.long, device=x.device)
    mindist = torch.empty(B, N, dtype=acc, device=x.device)
    if k == 0:
        return index, mindist.fill_(math.inf)
    for b in range(B):
        xb = x[b].to(acc)
        if metric == "cosine":
            dist = _cosine_distance_matrix(xb)
        else:
            dist = (xb[:, None, :] - xb[None, :, :]).pow(2).sum(-1).sqrt()
        eligible = torch.ones(N, dtype=torch.bool, device=x.device) if mask is None else mask[b]
        if isinstance(first, str):  # DivPrune: farthest from its nearest neighbour
            nn = dist.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), math.inf)
            nn = nn.min(dim=0).values if N > 1 else torch.zeros(1, dtype=acc, device=x.device)
            pick = nn.masked_fill(~eligible, -math.inf).argmax()
        elif isinstance(first, Tensor):
            pick = first[b] % N
        else:
            pick = torch.tensor(first % N if first < 0 else first, device=x.device)
        picked = torch.zeros(N, dtype=torch.bool, device=x.device)
        for i in range(k):
            index[b, i] = pick
            picked[pick] = True
            md = dist[index[b, : i + 1]].min(dim=0).values
            if i + 1 < k:
                pick = md.masked_fill(~eligible | picked, -math.inf).argmax()  # first max wins
        mindist[b] = md.masked_fill(picked, 0.0)
    return index, mindist


def bipartite_merge(
    x: Tensor,
    r: int,
    *,
    metric: Optional[Tensor] = None,
    size: Optional[Tensor] = None,
    protect: int = 0,
    order: str = "tome",
) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching and `merge_wavg`, with the gather/scatter_reduce
    of facebookresearch/ToMe `tome/merge.py`, generalised to `protect` tokens.

    x [B, N, D] -> merged [B, N - r, D], size [B, N - r], source [B, N] int64.
    ``size`` is [B, N] or ToMe's [B, N, 1].
    """
    B, N, D = x.shape
    acc = _acc(x)
    dev = x.device
    metric = x if metric is None else metric
    if size is not None and size.dim() == 3:
        size = size.squeeze(-1)
    size = torch.ones(B, N, dtype=acc, device=dev) if size is None else size.to(acc)
    if r == 0:  # ToMe's do_nothing
        return x.clone(), size.clone(), torch.arange(N, device=dev).expand(B, N).clone()
    with torch.no_grad():
        m = metric.to(acc)
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        na, nb = scores.shape[1], scores.shape[2]
        scores[:, : (protect + 1) // 2, :] = -math.inf  # protected A tokens never merge
        scores[:, :, : protect // 2] = -math.inf  # protected B tokens never absorb
        node_max, node_idx = scores.max(dim=-1)  # first max wins
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        src_idx = edge_idx[:, :r]  # A positions that merge
        unm_idx = edge_idx[:, r:]  # A positions that stay
        dst_idx = node_idx.gather(1, src_idx)  # their B partners
        # output slot of every token
        a_pos = torch.arange(0, N, 2, device=dev)
        b_pos = torch.arange(1, N, 2, device=dev)
        slot_a = torch.full((B, na), -1, dtype=torch.long, device=dev)
        slot_b = torch.empty(B, nb, dtype=torch.long, device=dev)
        if order == "tome":
            if protect > 0:
                unm_idx = unm_idx.sort(dim=1).values
            # protected tokens first (index order), then unmerged A, then the rest of B
            pa, pb = (protect + 1) // 2, protect // 2
            is_prot_a = unm_idx < pa
            unm_rank = torch.where(
                is_prot_a, 2 * unm_idx, protect + (~is_prot_a).cumsum(1) - 1
            )  # a protected A token at position p sits at slot p (its token index)
            slot_a.scatter_(1, unm_idx, unm_rank)
            n_unm = na - r - pa
            jb = torch.arange(nb, device=dev)
            slot_b[:] = torch.where(jb < pb, 2 * jb + 1, protect + n_unm + jb - pb)
        else:  # spatial: survivors keep their relative order
            survives = torch.ones(B, N, dtype=torch.bool, device=dev)
            survives[:, ::2].scatter_(1, src_idx, False)
            rank = survives.long().cumsum(1) - 1
            slot_a.scatter_(1, unm_idx, rank[:, ::2].gather(1, unm_idx))
            slot_b[:] = rank[:, 1::2]
        slot_a.scatter_(1, src_idx, slot_b.gather(1, dst_idx))
        source = torch.empty(B, N, dtype=torch.long, device=dev)
        source[:, a_pos] = slot_a
        source[:, b_pos] = slot_b
    # ToMe's merge_wavg: merge(x * size, "sum") / merge(size, "sum"), as gather + scatter
    xs = x.to(acc) * size[..., None]
    src_a, dst_b = xs[:, ::2], xs[:, 1::2]
    unm = src_a.gather(1, unm_idx[..., None].expand(-1, -1, D))
    srcs = src_a.gather(1, src_idx[..., None].expand(-1, -1, D))
    dst_b = dst_b.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, D), srcs, reduce="sum")
    sa, sb = size[:, ::2], size[:, 1::2]
    s_unm = sa.gather(1, unm_idx)
    s_dst = sb.scatter_reduce(1, dst_idx, sa.gather(1, src_idx), reduce="sum")
    # place [unm, dst] at their slots
    slots = torch.cat([slot_a.gather(1, unm_idx), slot_b], dim=1)
    merged_sum = torch.empty(B, N - r, D, dtype=acc, device=dev).scatter_(
        1, slots[..., None].expand(-1, -1, D), torch.cat([unm, dst_b], dim=1)
    )
    size_out = torch.empty(B, N - r, dtype=acc, device=dev).scatter_(
        1, slots, torch.cat([s_unm, s_dst], dim=1)
    )
    merged = (merged_sum / size_out[..., None]).to(x.dtype)
    return merged, size_out, source


def recycle(
    x: Tensor,
    target: Tensor,
    source: Tensor,
    *,
    weight: Optional[Tensor] = None,
    assign: Optional[Tensor] = None,
    features: Optional[Tensor] = None,
    metric: str = "cosine",
    include_target: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Cosine assignment of each source to a target, then a weighted mean per target by
    `scatter_reduce`, the way VisionZip-style code aggregates pruned tokens.

    x [B, N, D], target [B, T], source [B, S] -> out [B, T, D], count [B, T] int64.
    With T = 0 every source must be dropped (``assign`` all -1, or S = 0), as in the op.
    """
    B, N, D = x.shape
    T = target.shape[1]
    if T == 0 and source.shape[1] > 0 and (assign is None or bool((assign >= 0).any())):
        raise ValueError(f"reference.recycle: sources need at least one target to join (T=0, S={source.shape[1]})")
    if T == 0:
        return x.new_zeros(B, 0, D), torch.zeros(B, 0, dtype=torch.long, device=x.device)
    acc = _acc(x)
    feats = x if features is None else features
    w = torch.ones(B, N, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    if assign is None and source.shape[1] == 0:
        assign = source.clone()
    if assign is None:
        f = feats.to(acc)
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ft = f.gather(1, target[..., None].expand(-1, -1, f.shape[-1]))
        fs = f.gather(1, source[..., None].expand(-1, -1, f.shape[-1]))
        assign = (fs @ ft.transpose(-1, -2)).argmax(dim=-1)  # first max wins
    keep = assign >= 0
    slot = assign.clamp_min(0)
    xs = x.to(acc).gather(1, source[..., None].expand(-1, -1, D))
    ws = w.gather(1, source) * keep
    xt = x.to(acc).gather(1, target[..., None].expand(-1, -1, D))
    wt = w.gather(1, target) * float(include_target)
    num = (xt * wt[..., None]).scatter_reduce(
        1, slot[..., None].expand(-1, -1, D), xs * ws[..., None], reduce="sum"
    )
    den = wt.scatter_reduce(1, slot, ws, reduce="sum")
    count = torch.full((B, T), int(include_target), dtype=torch.long, device=x.device)
    count = count.scatter_add(1, slot, keep.long())
    out = torch.where(den[..., None] != 0, num / den[..., None], torch.zeros_like(num))
    return out.to(x.dtype), count


def region_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Tuple[int, int],
    *,
    region: int,
    heads: int = 1,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Each query's window unfolded (``F.unfold``, a copy of k and v), then softmax attention.

    q [B, M, C] on a grid_h x grid_w grid, k [B, L, N, C], v [B, L, N, Cv] on a
    (region grid_h) x (region grid_w) grid -> out [B, M, Cv] (and lse [B, M, heads]).
    """
    acc = _acc(q)
    grid_h, grid_w = grid
    B, M, C = q.shape
    L, Cv = k.shape[1], v.shape[3]
    s = region
    scale = (C // heads) ** -0.5 if scale is None else scale

    def unfold(x: Tensor) -> Tensor:  # [B, L, N, Cx] -> [B, M, heads, L s^2, Cx / heads]
        Cx = x.shape[-1]
        img = x.to(acc).reshape(B * L, s * grid_h, s * grid_w, Cx).permute(0, 3, 1, 2)
        cols = torch.nn.functional.unfold(img, kernel_size=s, stride=s)  # [B L, Cx s^2, M]
        cols = cols.reshape(B, L, heads, Cx // heads, s * s, M).permute(0, 5, 2, 1, 4, 3)
        return cols.reshape(B, M, heads, L * s * s, Cx // heads)

    logits = torch.einsum("bmhd,bmhrd->bmhr", q.to(acc).reshape(B, M, heads, C // heads), unfold(k)) * scale
    out = torch.einsum("bmhr,bmhre->bmhe", logits.softmax(-1), unfold(v)).reshape(B, M, Cv).to(q.dtype)
    return (out, torch.logsumexp(logits, -1)) if return_lse else out
def dpp_select(
    features: Tensor,
    k: int,
    *,
    relevance: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """CDPruner's fast greedy MAP of the DPP with kernel ``L = diag(r) S diag(r)`` on the full
    kernel ``[B, N, N]``, with the gain-0 rule of `tokenreduce.ops.dpp_select`.

    features [B, N, D], relevance [B, N], mask bool [B, N] -> index [B, k] int64, gains [B, k]
    (float32; float64 for float64 features).
    """
    B, N, _ = features.shape
    acc = _acc(features)
    dev = features.device
    x = features.to(acc)
    sq = x.pow(2).sum(-1)
    u = x * sq.sqrt().clamp_min(1e-12).reciprocal().unsqueeze(-1)
    r = torch.ones(B, N, dtype=acc, device=dev) if relevance is None else relevance.to(acc)
    kernel = r.unsqueeze(2) * (u @ u.transpose(1, 2)) * r.unsqueeze(1)
    diag = r * r * torch.where(sq >= 1e-24, torch.ones_like(sq), sq * 1e24)   # S_ii: 1 above the norm floor
    eligible = torch.ones(B, N, dtype=torch.bool, device=dev) if mask is None else mask
    tau = (1e-10 if acc == torch.float64 else 1e-5) * diag.masked_fill(~eligible, 0).amax(1).clamp_min(0)
    d2 = diag.clone()
    chol = torch.zeros(k, B, N, dtype=acc, device=dev)
    picked = torch.zeros(B, N, dtype=torch.bool, device=dev)
    degenerate = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    index = torch.empty(B, k, dtype=torch.long, device=dev)
    gains = torch.empty(B, k, dtype=acc, device=dev)
    for t in range(k):
        cand = d2.masked_fill(~eligible | picked | d2.isnan(), -math.inf)
        j = cand.argmax(1)
        g = cand[rows, j]
        degenerate = degenerate | ~(g > tau)
        # the fallback: the eligible unpicked (the masked unpicked once none is left) with the
        # largest L_ii, the smallest index among equals (argmax takes the first max)
        pool = eligible & ~picked
        pool = torch.where(pool.any(1, keepdim=True), pool, ~picked)
        jf = diag.masked_fill(~pool, -math.inf).argmax(1)
        j = torch.where(degenerate, jf, j)
        index[:, t] = j
        gains[:, t] = torch.where(degenerate, torch.zeros_like(g), g)
        picked[rows, j] = True
        e = (kernel[rows, j] - torch.einsum("tb,tbn->bn", chol[:t, rows, j], chol[:t])) / g.clamp_min(1e-30).sqrt()[:, None]
        e = torch.where(degenerate[:, None], torch.zeros_like(e), e)
        chol[t] = e
        d2 = d2 - e * e
    return index, gains
