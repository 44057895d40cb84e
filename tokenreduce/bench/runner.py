"""Time one op case against its reference (:func:`measure_case`) and run the cases (:func:`run`).

Timing is `tokenreduce.measure.time_pair`: the op and the reference in the same run, in
alternating blocks of calls (each block a steady loop after a warm-up call), rotating
among a few pre-generated input sets, each call timed with ``time.perf_counter``; we
report the median and the interquartile range. ``torch.set_num_threads(threads)``
(default 2) is applied for the measurement and the previous setting restored afterwards.
The drivers run with a warm C allocator (`tokenreduce.measure.configure_allocator`) and
record the minor page faults of every timed call. Quick mode runs both implementations
and computes the same ratios; the speed targets only apply to the full shapes.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import measure
from .cases import Case, Inputs, cases, check_outputs, make_input_sets

__all__ = ["measure_case", "run"]


def measure_case(case: Case, *, n_threads: int = 2, warmup: Optional[int] = None,
                 repeat: Optional[int] = None, n_inputs: int = 3, seed: int = 0,
                 check: bool = True, memory: bool = True,
                 input_sets: Optional[Sequence[Inputs]] = None) -> List[Dict[str, Any]]:
    """Time the op and its reference on ``case``; two result dicts (ours, then the
    reference).

    Fields: op, shape, dtype, impl ("tokenreduce" / "reference"), median_ms, iqr_ms,
    speedup (reference median / this impl's median: 1.0 for the reference), gbps
    (bytes_moved / median), bytes_moved, repeat (timed calls), minor_faults_per_call
    (median minor page faults of a timed call), threads, target, target_met (full mode,
    on our row; None otherwise), correct (outputs match the reference), peak_extra_bytes
    (see `tokenreduce.measure.peak_extra_bytes`) and, for attention, attn_buffer_bytes.
    ``check``: first compare the outputs with the reference's on every input set
    (AssertionError on a mismatch), so a wrong kernel is never timed.
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
        timed = measure.time_pair(fns, input_sets, warmup=warmup, repeat=repeat,
                                  warmup_s=0.05 if case.quick else 0.5)
        mem = {}
        if memory:
            for impl, fn in fns.items():
                mem[impl] = measure.peak_extra_bytes(fn, input_sets[0])
    stats = {impl: measure.median_iqr_ms(t["times"]) for impl, t in timed.items()}
    ref_median = stats["reference"][0]
    rows = []
    for impl in ("tokenreduce", "reference"):
        median_ms, iqr_ms = stats[impl]
        speedup = ref_median / median_ms if median_ms > 0 else float("inf")
        ours = impl == "tokenreduce"
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
            "target": case.target if ours else None,
            "target_met": (speedup >= case.target) if (ours and not case.quick
                                                        and case.target is not None) else None,
            "correct": correct,
            "peak_extra_bytes": mem.get(impl),
            "attn_buffer_bytes": case.attn_buffer_bytes,
        })
    return rows


def run(*, quick: bool = False, op_names: Optional[Sequence[str]] = None, n_threads: int = 2,
        warmup: Optional[int] = None, repeat: Optional[int] = None, memory: bool = True,
        allocator: str = "warm",
        progress: Optional[Callable[[Case], None]] = None) -> Dict[str, Any]:
    """Run the cases; ``{"mode", "env", "results"}`` (results: two rows per case).
    ``allocator``: see `tokenreduce.measure.configure_allocator` (process-wide)."""
    measure.configure_allocator(allocator)
    results: List[Dict[str, Any]] = []
    for case in cases(quick=quick, op_names=op_names):
        if progress is not None:
            progress(case)
        results.extend(measure_case(case, n_threads=n_threads, warmup=warmup, repeat=repeat,
                                    memory=memory))
    return {"mode": "quick" if quick else "full", "env": measure.env_info(n_threads),
            "results": results}
