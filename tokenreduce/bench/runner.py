"""Time one op case against its reference (:func:`measure_case`) and run the cases (:func:`run`).

Timing is `tokenreduce.measure.time_pair`: the op and the reference in the same run, in
alternating blocks of calls (each block a steady loop after a warm-up call), rotating
among a few pre-generated input sets, each call timed with ``time.perf_counter``; we
report the median and the interquartile range. ``torch.set_num_threads(threads)``
(default 2) is applied for the measurement and the previous setting restored afterwards.
The drivers run with a warm C allocator (`tokenreduce.measure.configure_allocator`) and
record the minor page faults of every timed call. Quick mode runs both implementations
and computes the same ratios; the speed targets only apply to the full shapes.

Peers (`tokenreduce.bench.peers`: the best plain-torch code a user could write) are timed
in the same run as further implementations (full mode by default; quick mode stays quick
and runs the op and its reference only). A peer's row has ``vs_peer`` = the peer's median
/ our median (our speedup over that peer) and its target is on that ratio.
"""
from __future__ import annotations

import statistics
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import measure
from .cases import Case, Inputs, cases, check_outputs, make_input_sets
from .peers import Peer

__all__ = ["measure_case", "run"]


def measure_case(case: Case, *, n_threads: int = 2, warmup: Optional[int] = None,
                 repeat: Optional[int] = None, n_inputs: int = 3, seed: int = 0,
                 check: bool = True, memory: bool = True,
                 input_sets: Optional[Sequence[Inputs]] = None,
                 peers: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Time the op and its reference on ``case``; two result dicts (ours, then the
    reference), then one per peer when ``peers`` (default: full mode only).

    Fields: op, shape, dtype, impl ("tokenreduce" / "reference"), median_ms, iqr_ms,
    speedup (reference median / this impl's median: 1.0 for the reference), gbps
    (bytes_moved / median), bytes_moved, repeat (timed calls), minor_faults_per_call
    (median minor page faults of a timed call), threads, target, target_met (full mode,
    on our row; None otherwise), correct (outputs match the reference), peak_extra_bytes
    (see `tokenreduce.measure.peak_extra_bytes`) and, for attention, attn_buffer_bytes.
    ``check``: first compare the outputs with the reference's on every input set
    (AssertionError on a mismatch), so a wrong kernel is never timed; peers are always
    checked (which also compiles the compiled ones before any timing; a peer that fails
    to compile is left out with a warning). Peer rows (impl = the peer's name, role
    "peer") add ``vs_peer`` (peer median / our median) and carry the peer's target.
    """
    warmup = (2 if case.quick else 3) if warmup is None else warmup
    repeat = (12 if case.quick else 15) if repeat is None else repeat
    if input_sets is None:
        input_sets = make_input_sets(case, n_inputs, seed)
    fns = {"tokenreduce": case.tokenreduce, "reference": case.reference}
    with measure.threads(n_threads):
        correct = None
        if check:
            for inputs in input_sets:
                check_outputs(case, case.tokenreduce(*inputs), case.reference(*inputs))
            correct = True
        use_peers = (not case.quick) if peers is None else peers
        peer_of: Dict[str, Peer] = {}
        for peer in (case.peers() if use_peers else ()):
            if _ready(case, peer, input_sets):
                peer_of[peer.name] = peer
                fns[peer.name] = peer.fn
        timed = measure.time_pair(fns, input_sets, warmup=warmup, repeat=repeat,
                                  warmup_s=0.05 if case.quick else 0.5)
        mem = {}
        if memory:
            for impl in ("tokenreduce", "reference"):
                mem[impl] = measure.peak_extra_bytes(fns[impl], input_sets[0])
    stats = {impl: measure.median_iqr_ms(t["times"]) for impl, t in timed.items()}
    ref_median = stats["reference"][0]
    ours_median = stats["tokenreduce"][0]
    rows = []
    for impl in fns:
        median_ms, iqr_ms = stats[impl]
        speedup = ref_median / median_ms if median_ms > 0 else float("inf")
        ours = impl == "tokenreduce"
        peer = peer_of.get(impl)
        target = case.target if ours else (peer.target if peer is not None else None)
        ratio = speedup if ours else None
        if peer is not None:
            ratio = median_ms / ours_median if ours_median > 0 else float("inf")
        rows.append({
            "op": case.op,
            "shape": case.shape,
            "dtype": case.dtype_name,
            "impl": impl,
            "median_ms": median_ms,
            "iqr_ms": iqr_ms,
            "speedup": speedup,
            "gbps": case.bytes_moved / (median_ms * 1e-3) / 1e9 if median_ms > 0 else float("inf"),
            "bytes_moved": case.bytes_moved,
            "repeat": len(timed[impl]["times"]),
            "minor_faults_per_call": statistics.median(timed[impl]["faults"]),
            "threads": n_threads,
            "quick": case.quick,
            "target": target,
            "target_met": (ratio >= target) if (ratio is not None and not case.quick
                                                and target is not None) else None,
            "role": "tokenreduce" if ours else ("peer" if peer is not None else "reference"),
            "vs_peer": ratio if peer is not None else None,
            "correct": correct if peer is None else True,
            "peak_extra_bytes": mem.get(impl),
            "attn_buffer_bytes": case.attn_buffer_bytes,
        })
    return rows


def _ready(case: Case, peer: Peer, input_sets: Sequence[Inputs]) -> bool:
    """Check the peer's outputs against the reference's on every input set (compiling a
    compiled peer); False (with a warning) if a compiled peer cannot be built here."""
    for inputs in input_sets:
        try:
            out = peer.fn(*inputs)
        except Exception as e:  # noqa: BLE001 - torch.compile needs a working C++ toolchain
            if not peer.compiled:
                raise
            warnings.warn(f"{case.id}: peer {peer.name!r} left out: {type(e).__name__}: {e}")
            return False
        check_outputs(case, out, case.reference(*inputs), n_outputs=peer.n_outputs,
                      who=f" ({peer.name})")
    return True


def run(*, quick: bool = False, op_names: Optional[Sequence[str]] = None, n_threads: int = 2,
        warmup: Optional[int] = None, repeat: Optional[int] = None, memory: bool = True,
        allocator: str = "warm",
        progress: Optional[Callable[[Case], None]] = None) -> Dict[str, Any]:
    """Run the cases (with the ops' variants); ``{"mode", "env", "results"}`` (results: two
    rows per case, then, in full mode, one per peer).
    ``allocator``: see `tokenreduce.measure.configure_allocator` (process-wide)."""
    measure.configure_allocator(allocator)
    results: List[Dict[str, Any]] = []
    for case in cases(quick=quick, op_names=op_names, variants=True):
        if progress is not None:
            progress(case)
        results.extend(measure_case(case, n_threads=n_threads, warmup=warmup, repeat=repeat,
                                    memory=memory))
    return {"mode": "quick" if quick else "full", "env": measure.env_info(n_threads),
            "results": results}
