"""The op bench cases: each op against its plain-PyTorch reference on one input shape.

Each :class:`Case` pairs a tokenreduce op with its reference (`tokenreduce.reference`, the
way published code computes it today) and with its strong plain-torch peers
(`tokenreduce.bench.peers`: the best a user could write). ``CASE_BUILDERS`` maps each op
to the function that builds its case: the issue's target shapes (``quick=False``) or small
shapes for CI smoke runs (``quick=True``); ``CASE_VARIANTS`` adds further cases of an op
(attention with only the [CLS] row scored). :func:`cases` gives the list;
:func:`check_outputs` compares an op's outputs with the reference's; :func:`make_input_sets`
draws the inputs to rotate among.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops, reference
from . import peers
from .peers import Peer

__all__ = ["CASE_BUILDERS", "CASE_VARIANTS", "Case", "TOLERANCES", "cases", "check_outputs", "make_input_sets"]

# float tolerance of the correctness check (both sides accumulate in float32)
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}

Inputs = Tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Case:
    """One benchmark: an op on one input shape.

    ``tokenreduce(*inputs)`` and ``reference(*inputs)`` compute the same outputs from
    ``inputs = make_inputs(seed)`` (fresh random tensors; same seed, same tensors).
    ``bytes_moved`` is what the op has to read and write at least (input bytes it reads
    plus output bytes it writes); effective GB/s = bytes_moved / median time.
    ``target``: the speedup over the reference the op must reach on the full shapes
    (``None``: no target). ``attn_buffer_bytes``: for attention, the size of the
    ``[B, H, Nq, Nk]`` float32 probabilities the eager reference materialises.
    ``peers()``: the case's plain-torch peers (built on demand: compiled ones are lazy).
    ``variant``: "" for an op's main case, else a short name (the test id's suffix).
    """

    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[int], Inputs] = field(repr=False)
    tokenreduce: Callable[..., Any] = field(repr=False)
    reference: Callable[..., Any] = field(repr=False)
    bytes_moved: int
    target: Optional[float]
    quick: bool = False
    attn_buffer_bytes: Optional[int] = None
    peers: Callable[[], Tuple[Peer, ...]] = field(default=tuple, repr=False)
    variant: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}[{self.shape}]"

    @property
    def test_id(self) -> str:
        """The op, with the variant's name if any: ``attention_with_scores-cls``."""
        return f"{self.op}-{self.variant}" if self.variant else self.op

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _tokens(B: int, N: int, D: int, dtype: torch.dtype) -> Callable[[int], Inputs]:
    """make_inputs of a case whose one input is the tokens x [B, N, D]."""
    return lambda seed: (_randn(_gen(seed), B, N, D, dtype=dtype),)


# --------------------------------------------------------------------------------------
# one builder per op: (quick, dtype) -> Case
# --------------------------------------------------------------------------------------


def kcenter_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """kcenter on x [B, N, D]: k centres from ``first`` (full: B=8 N=576 D=1024 k=64)."""
    B, N, D, k, first = (2, 129, 128, 16, 0) if quick else (8, 576, 1024, 64, 0)
    return Case(
        op="kcenter",
        shape=f"B={B} N={N} D={D} k={k} first={first}",
        dtype=dtype,
        make_inputs=_tokens(B, N, D, dtype),
        tokenreduce=lambda x: ops.kcenter(x, k, first=first),
        reference=lambda x: reference.kcenter(x, k, first=first),
        # read x; write index [B, k] int64 + mindist [B, N] float32
        bytes_moved=B * N * D * _element_size(dtype) + B * k * 8 + B * N * 4,
        target=5.0,  # the portable floor (an AMD machine); issue 16: >= 8x on the CI Xeon
        quick=quick,
        peers=lambda: peers.kcenter_peers(k, first),
    )


def bipartite_merge_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """bipartite_merge of x [B, N, D] by r tokens (full: B=8 N=577 D=1024 r=288 protect=1)."""
    B, N, D, r, protect = (2, 129, 128, 64, 1) if quick else (8, 577, 1024, 288, 1)
    es = _element_size(dtype)
    return Case(
        op="bipartite_merge",
        shape=f"B={B} N={N} D={D} r={r} protect={protect}",
        dtype=dtype,
        make_inputs=_tokens(B, N, D, dtype),
        tokenreduce=lambda x: ops.bipartite_merge(x, r, protect=protect),
        reference=lambda x: reference.bipartite_merge(x, r, protect=protect),
        # read x; write merged [B, N-r, D] + size [B, N-r] float32 + source [B, N] int64
        bytes_moved=B * N * D * es + B * (N - r) * D * es + B * (N - r) * 4 + B * N * 8,
        target=2.0,
        quick=quick,
        peers=lambda: peers.bipartite_merge_peers(r, protect),
    )


def recycle_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """recycle of x [B, N, D]: S sources into T targets (full: B=8 N=576 D=1024 T=64 S=448)."""
    B, N, D, T, S = (2, 128, 128, 16, 96) if quick else (8, 576, 1024, 64, 448)
    es = _element_size(dtype)

    def make_inputs(seed: int) -> Inputs:
        g = _gen(seed)
        x = _randn(g, B, N, D, dtype=dtype)
        # a random permutation per batch row, split into targets and sources
        perm = torch.rand(B, N, generator=g).argsort(dim=1)
        return x, perm[:, :T].contiguous(), perm[:, T:T + S].contiguous()

    return Case(
        op="recycle",
        shape=f"B={B} N={N} D={D} T={T} S={S}",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda x, t, s: ops.recycle(x, t, s),
        reference=lambda x, t, s: reference.recycle(x, t, s),
        # read the T + S rows of x it uses + target/source int64; write out [B, T, D] +
        # count [B, T] int64
        bytes_moved=B * (T + S) * D * es + B * (T + S) * 8 + B * T * D * es + B * T * 8,
        target=3.0,
        quick=quick,
        peers=peers.recycle_peers,
    )


def attention_with_scores_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """attention_with_scores of q, k, v [B, H, N, Dh], scores of all rows (full: B=2 H=16
    N=577 Dh=64)."""
    B, H, N, Dh = (1, 4, 129, 32) if quick else (2, 16, 577, 64)
    es = _element_size(dtype)

    def make_inputs(seed: int) -> Inputs:
        g = _gen(seed)
        return tuple(_randn(g, B, H, N, Dh, dtype=dtype) for _ in range(3))

    return Case(
        op="attention_with_scores",
        shape=f"B={B} H={H} N={N} Dh={Dh} rows=all",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda q, k, v: ops.attention_with_scores(q, k, v),
        reference=lambda q, k, v: reference.attention_with_scores(q, k, v),
        # read q, k, v; write out [B, H, N, Dh] + scores [B, N] float32
        bytes_moved=4 * B * H * N * Dh * es + B * N * 4,
        target=1.0,
        quick=quick,
        attn_buffer_bytes=B * H * N * N * 4,
        peers=lambda: peers.attention_peers(None),
    )


def attention_cls_row_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """attention_with_scores of q, k, v [B, H, N, Dh] scoring only the [CLS] row
    (score_rows=[0]; full: B=2 H=16 N=577 Dh=64), the common use of the scores."""
    B, H, N, Dh = (1, 4, 129, 32) if quick else (2, 16, 577, 64)
    es = _element_size(dtype)
    rows = torch.tensor([0])

    def make_inputs(seed: int) -> Inputs:
        g = _gen(seed)
        return tuple(_randn(g, B, H, N, Dh, dtype=dtype) for _ in range(3))

    return Case(
        op="attention_with_scores",
        shape=f"B={B} H={H} N={N} Dh={Dh} rows=[0]",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda q, k, v: ops.attention_with_scores(q, k, v, score_rows=rows),
        reference=lambda q, k, v: reference.attention_with_scores(q, k, v, score_rows=rows),
        bytes_moved=4 * B * H * N * Dh * es + B * N * 4,
        target=1.0,
        quick=quick,
        attn_buffer_bytes=B * H * N * N * 4,
        peers=lambda: peers.attention_peers(rows),
        variant="cls",
    )


def region_attention_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """region_attention of TokenPacker's projector: q [B, M, C] on a 12 x 12 grid, k, v
    [B, 1, 576, C] on 24 x 24, 2 x 2 windows, 8 heads (full: B=8 C=1024)."""
    B, G, s, L, C, H = (2, 6, 2, 1, 64, 2) if quick else (8, 12, 2, 1, 1024, 8)
    M, N = G * G, G * G * s * s
    es = _element_size(dtype)

    def make_inputs(seed: int) -> Inputs:
        g = _gen(seed)
        return _randn(g, B, M, C, dtype=dtype), _randn(g, B, L, N, C, dtype=dtype), _randn(g, B, L, N, C, dtype=dtype)

    return Case(
        op="region_attention",
        shape=f"B={B} grid={G}x{G} region={s} L={L} C={C} heads={H}",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda q, k, v: ops.region_attention(q, k, v, (G, G), region=s, heads=H),
        reference=lambda q, k, v: reference.region_attention(q, k, v, (G, G), region=s, heads=H),
        # read q, k, v; write out [B, M, C]
        bytes_moved=(2 * B * M * C + 2 * B * L * N * C) * es,
        target=3.0,
        quick=quick,
        peers=lambda: peers.region_attention_peers((G, G), s, H),
    )


def dpp_select_case(quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    """dpp_select of x [B, N, D] with relevance [B, N] (full: B=8 N=576 D=1024 k=64, issue 14)."""
    B, N, D, k = (2, 129, 128, 16) if quick else (8, 576, 1024, 64)

    def make_inputs(seed: int) -> Inputs:
        g = _gen(seed)
        return _randn(g, B, N, D, dtype=dtype), torch.rand(B, N, generator=g) + 1e-6

    return Case(
        op="dpp_select",
        shape=f"B={B} N={N} D={D} k={k}",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda x, r: ops.dpp_select(x, k, relevance=r),
        reference=lambda x, r: reference.dpp_select(x, k, relevance=r),
        # read x and relevance; write index [B, k] int64 + gains [B, k] float32
        bytes_moved=B * N * D * _element_size(dtype) + B * N * 4 + B * k * 12,
        target=5.0,
        quick=quick,
        peers=lambda: peers.dpp_select_peers(k),
    )


# op name -> its case builder, in the order the cases run
CASE_BUILDERS: Dict[str, Callable[[bool, torch.dtype], Case]] = {
    "kcenter": kcenter_case,
    "bipartite_merge": bipartite_merge_case,
    "recycle": recycle_case,
    "attention_with_scores": attention_with_scores_case,
    "region_attention": region_attention_case,
}


# op name -> builders of its further cases, run after its main case when variants are asked
CASE_VARIANTS: Dict[str, List[Callable[[bool, torch.dtype], Case]]] = {
    "attention_with_scores": [attention_cls_row_case],
}


def cases(quick: bool = False, op_names: Optional[Sequence[str]] = None,
          dtype: torch.dtype = torch.float32, variants: bool = False) -> List[Case]:
    """The benchmark cases: the issue's target shapes, or small ``quick`` shapes.

    ``op_names`` keeps only the named ops (in ``CASE_BUILDERS``' order); ``variants`` adds
    each op's ``CASE_VARIANTS`` after its main case (one case per op without).
    """
    if op_names is not None:
        unknown = sorted(set(op_names) - set(CASE_BUILDERS))
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choose from {list(CASE_BUILDERS)}")
    out: List[Case] = []
    for op, build in CASE_BUILDERS.items():
        if op_names is None or op in op_names:
            out.append(build(quick, dtype))
            if variants:
                out.extend(more(quick, dtype) for more in CASE_VARIANTS.get(op, ()))
    return out


# --------------------------------------------------------------------------------------
# correctness and inputs
# --------------------------------------------------------------------------------------


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_outputs(case: Case, ours, ref, *, n_outputs: Optional[int] = None,
                  who: str = "") -> None:
    """Raise AssertionError unless the op's outputs match the reference's: integer
    outputs exactly, floating outputs within a dtype tolerance. ``n_outputs``: compare
    only the reference's first outputs (a peer that returns fewer); ``who`` names the
    implementation in the message."""
    ours, ref = _as_tuple(ours), _as_tuple(ref)
    if n_outputs is not None:
        ref = ref[:n_outputs]
    if len(ours) != len(ref):
        raise AssertionError(f"{case.id}{who}: {len(ours)} outputs vs the reference's {len(ref)}")
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.shape != b.shape:
            raise AssertionError(f"{case.id}: output {i} has shape {tuple(a.shape)}, "
                                 f"reference {tuple(b.shape)}")
        if a.dtype.is_floating_point:
            tol = TOLERANCES.get(case.dtype, TOLERANCES[torch.float32])
            torch.testing.assert_close(a.float(), b.float(), **tol,
                                       msg=lambda m: f"{case.id}{who}: output {i} differs: {m}")
        elif not torch.equal(a, b):
            n = int((a != b).sum())
            raise AssertionError(f"{case.id}{who}: output {i} differs in {n} of {a.numel()} "
                                 "entries")


def make_input_sets(case: Case, n_inputs: int = 3, seed: int = 0) -> List[Inputs]:
    """``n_inputs`` fresh input sets (seeds ``seed``, ``seed + 1``, ...) to rotate among."""
    return [case.make_inputs(seed + i) for i in range(max(1, n_inputs))]
