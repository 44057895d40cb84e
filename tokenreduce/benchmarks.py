"""Benchmark cases of the four core ops, shared by ``tokenreduce bench`` and ``bench/``.

Each :class:`Case` pairs a tokenreduce op with its plain-PyTorch reference
(`tokenreduce.reference`, the way published code computes it today) on one input shape.
:func:`cases` gives the list: the issue's target shapes (``quick=False``) or small shapes
for CI smoke runs (``quick=True``). Quick mode runs both implementations and computes the
same ratios; the speed targets only apply to the full shapes.

Timing (:func:`time_pair`): the op and the reference are measured in the same run, in
alternating blocks of calls (each block a steady loop after a warm-up call), rotating
among a few pre-generated input sets; each call is timed with ``time.perf_counter``; we
report the median and the interquartile range.
``torch.set_num_threads(threads)`` (default 2) is applied for the measurement and the
previous setting restored afterwards.

Allocator (:func:`configure_allocator`): the drivers run with a warm C allocator so that
whether a call pays page faults for its temporaries does not depend on the process's
history; see its docstring. The minor page faults of every timed call are recorded.

Memory (:func:`peak_extra_bytes`): see its docstring.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import ops, reference

__all__ = [
    "Case",
    "OP_NAMES",
    "cases",
    "check_outputs",
    "configure_allocator",
    "env_info",
    "make_input_sets",
    "measure_case",
    "memory_lines",
    "peak_extra_bytes",
    "run",
    "threads",
    "time_pair",
]

from .ops.registry import OPS as OP_NAMES  # noqa: E402  (the one op list)

# float tolerance of the correctness check (both sides accumulate in float32)
_TOL = {
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

    @property
    def id(self) -> str:
        return f"{self.op}[{self.shape}]"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _kcenter_case(B, N, D, k, first, dtype, quick) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()

    def make_inputs(seed: int) -> Inputs:
        return (_randn(_gen(seed), B, N, D, dtype=dtype),)

    return Case(
        op="kcenter",
        shape=f"B={B} N={N} D={D} k={k} first={first}",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda x: ops.kcenter(x, k, first=first),
        reference=lambda x: reference.kcenter(x, k, first=first),
        # read x; write index [B, k] int64 + mindist [B, N] float32
        bytes_moved=B * N * D * es + B * k * 8 + B * N * 4,
        target=5.0,
        quick=quick,
    )


def _bipartite_case(B, N, D, r, protect, dtype, quick) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()

    def make_inputs(seed: int) -> Inputs:
        return (_randn(_gen(seed), B, N, D, dtype=dtype),)

    return Case(
        op="bipartite_merge",
        shape=f"B={B} N={N} D={D} r={r} protect={protect}",
        dtype=dtype,
        make_inputs=make_inputs,
        tokenreduce=lambda x: ops.bipartite_merge(x, r, protect=protect),
        reference=lambda x: reference.bipartite_merge(x, r, protect=protect),
        # read x; write merged [B, N-r, D] + size [B, N-r] float32 + source [B, N] int64
        bytes_moved=B * N * D * es + B * (N - r) * D * es + B * (N - r) * 4 + B * N * 8,
        target=2.0,
        quick=quick,
    )


def _recycle_case(B, N, D, T, S, dtype, quick) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()

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
    )


def _attention_case(B, H, N, Dh, dtype, quick) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()

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
    )


def cases(quick: bool = False, op_names: Optional[Sequence[str]] = None,
          dtype: torch.dtype = torch.float32) -> List[Case]:
    """The benchmark cases: the issue's target shapes, or small ``quick`` shapes.

    ``op_names`` keeps only the named ops (in this module's order).
    """
    if op_names is not None:
        unknown = sorted(set(op_names) - set(OP_NAMES))
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choose from {list(OP_NAMES)}")
    if quick:
        all_cases = [
            _kcenter_case(2, 129, 128, 16, 0, dtype, True),
            _bipartite_case(2, 129, 128, 64, 1, dtype, True),
            _recycle_case(2, 128, 128, 16, 96, dtype, True),
            _attention_case(1, 4, 129, 32, dtype, True),
        ]
    else:
        all_cases = [
            _kcenter_case(8, 576, 1024, 64, 0, dtype, False),
            _bipartite_case(8, 577, 1024, 288, 1, dtype, False),
            _recycle_case(8, 576, 1024, 64, 448, dtype, False),
            _attention_case(2, 16, 577, 64, dtype, False),
        ]
    return [c for c in all_cases if op_names is None or c.op in op_names]


# --------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_outputs(case: Case, ours, ref) -> None:
    """Raise AssertionError unless the op's outputs match the reference's: integer
    outputs exactly, floating outputs within a dtype tolerance."""
    ours, ref = _as_tuple(ours), _as_tuple(ref)
    if len(ours) != len(ref):
        raise AssertionError(f"{case.id}: {len(ours)} outputs vs the reference's {len(ref)}")
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.shape != b.shape:
            raise AssertionError(f"{case.id}: output {i} has shape {tuple(a.shape)}, "
                                 f"reference {tuple(b.shape)}")
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a.float(), b.float(), **_TOL.get(case.dtype, _TOL[torch.float32]),
                                       msg=lambda m: f"{case.id}: output {i} differs: {m}")
        elif not torch.equal(a, b):
            n = int((a != b).sum())
            raise AssertionError(f"{case.id}: output {i} differs in {n} of {a.numel()} entries")


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, then restore the previous count."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _stats(times_s: Sequence[float]) -> Tuple[float, float]:
    """median and interquartile range, in milliseconds."""
    ms = [t * 1e3 for t in times_s]
    if len(ms) < 2:
        return ms[0], 0.0
    q1, q2, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return q2, q3 - q1


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - not on Unix
        return 0


def time_pair(case: Case, input_sets: Sequence[Inputs], *, warmup: int = 3, repeat: int = 15,
              blocks: int = 3, warmup_s: float = 0.5,
              max_warmup: int = 50) -> Dict[str, Dict[str, List[float]]]:
    """Per-call seconds (and minor page faults) of the op and of the reference, measured
    in the same run, in alternating blocks: ``blocks`` times, the op then the reference
    each make untimed warm-up calls and then ``ceil(repeat / blocks)`` timed calls, each
    on the next input set (rotating). Warm-up: in the first block at least ``warmup``
    calls and at least ``warmup_s`` seconds of calls (at most ``max_warmup`` calls): the C
    allocator needs a few calls of a function with large temporaries before it stops
    returning memory to the OS (its mmap threshold adapts); 1 call in later blocks.

    Why blocks, not call-by-call interleaving: with glibc's default adaptive thresholds,
    alternating single calls of two functions with different allocation patterns makes
    the C allocator hand memory back to the OS and fault it in again on every call
    (measured here: ~16k minor page faults, ~+80% time per call for the bipartite_merge
    and recycle references at the full shapes), a cost neither side has in a steady loop.
    Each block is a steady loop after its warm-up; alternating the blocks keeps both
    sides under the same machine conditions (see also :func:`configure_allocator`).

    Calls are plain (no ``torch.inference_mode``/``no_grad``; the inputs do not require
    grad), as a user makes them, so any dispatch overhead of the op's autograd
    registration is included. Returns ``{impl: {"times": [...], "faults": [...]}}``.
    """
    fns = {"tokenreduce": case.tokenreduce, "reference": case.reference}
    res: Dict[str, Dict[str, List[float]]] = {k: {"times": [], "faults": []} for k in fns}
    blocks = max(1, int(blocks))
    per_block = max(1, -(-int(repeat) // blocks))
    n = len(input_sets)
    for blk in range(blocks):
        for impl, fn in fns.items():
            # warm-up
            min_calls, min_s = (max(int(warmup), 0), warmup_s) if blk == 0 else (1, 0.0)
            start, j = time.perf_counter(), 0
            while j < min_calls or (time.perf_counter() - start < min_s and j < max_warmup):
                out = fn(*input_sets[j % n])
                del out
                j += 1
            # timed calls
            for j in range(per_block):
                inputs = input_sets[(blk * per_block + j) % n]
                f0 = _minor_faults()
                t0 = time.perf_counter()
                out = fn(*inputs)
                t1 = time.perf_counter()
                f1 = _minor_faults()
                del out
                res[impl]["times"].append(t1 - t0)
                res[impl]["faults"].append(f1 - f0)
    return res


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: some torch builds' profiler
    (kineto) logs a line to stderr at every start and stop. Python exceptions are
    unaffected (they propagate as objects)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, AttributeError, ValueError):  # no real fd 2: nothing to hide
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[..., Any], inputs: Inputs) -> Optional[int]:
    """Peak bytes of tensor memory one call allocates above what was allocated before it
    (its returned outputs included), or None when it cannot be measured.

    How it is measured: the call runs under ``torch.profiler.profile(profile_memory=True)``
    (CPU activity). Every allocation and free through torch's CPU allocator is recorded
    with the allocator's running total of bytes then allocated
    (``extra_fields.total_allocated`` of the profiler's Allocation events, read from
    ``prof.profiler.kineto_results.experimental_event_tree()``); the result is the
    largest running total during the call minus the total just before its first
    allocation.

    What it counts: tensors (``at::empty`` & co.), i.e. the reference's intermediate
    buffers such as the ``[B, H, N, N]`` probabilities, and the op's outputs and
    internal tensors. What it does not count: memory a native kernel takes outside
    torch's allocator (e.g. the per-thread ``std::vector`` tiles of the CPU kernels) and
    tensors allocated on intra-op worker threads (the profiler records the calling
    thread's allocations).
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - very old torch
        return None
    gc.collect()
    try:
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                             profile_memory=True) as prof:
            out = fn(*inputs)
            del out
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:  # pragma: no cover - profiler unavailable / API changed
        return None
    allocs = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            allocs.append(node)
    if not allocs:
        return None  # every call allocates at least its outputs: nothing was recorded
    allocs.sort(key=lambda n: n.start_time_ns)
    first = allocs[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(int(n.extra_fields.total_allocated) for n in allocs) - int(base)


# --------------------------------------------------------------------------------------
# allocator
# --------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_WARM_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value (64-bit)
_WARM_TRIM_THRESHOLD = 2**30
_ALLOCATOR: Dict[str, Any] = {"mode": "default"}


def configure_allocator(mode: str = "warm") -> Dict[str, Any]:
    """Choose how the C allocator treats the large temporaries of the timed calls.

    ``"default"``: leave glibc malloc as it is. Its adaptive thresholds then decide, from
    the history of the process, whether a call's large temporaries come from memory it
    kept or from fresh pages that the kernel must fault in (and zero) on every call; a
    reference that allocates tens of MB per call may or may not pay that (~1-2 us per 4
    KiB page here, up to ~+80% of its time), from run to run, so the ratios are unstable.

    ``"warm"`` (what ``tokenreduce bench`` and ``bench/`` use): ``mallopt`` a fixed mmap
    threshold of 32 MiB (glibc's maximum) and a 1 GiB trim threshold, so memory freed by
    one call is reused by the next: both implementations run with a warm allocator, as
    with a caching allocator (jemalloc, tcmalloc). Allocations above 32 MiB (e.g. the
    eager attention's ``[B, H, N, N]`` buffers at the full shapes) are still mapped
    fresh on every call, as in any glibc process. This setting is process-wide and
    cannot be undone (glibc's adaptive mode does not come back), so only the benchmark
    drivers call it. A no-op without glibc.

    Returns (and records in :func:`env_info`) the allocator state of the process.
    """
    global _ALLOCATOR
    if mode not in ("warm", "default"):
        raise ValueError(f'allocator mode must be "warm" or "default", got "{mode}"')
    if mode == "default":
        if _ALLOCATOR.get("mode") == "warm":  # cannot be undone: say so
            _ALLOCATOR = dict(_ALLOCATOR, note="warm was set earlier in this process")
        return dict(_ALLOCATOR)
    if _ALLOCATOR.get("mode") == "warm":
        return dict(_ALLOCATOR)
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _WARM_MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, _WARM_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        ok = False
    if ok:
        _ALLOCATOR = {"mode": "warm", "mallopt": {"M_MMAP_THRESHOLD": _WARM_MMAP_THRESHOLD,
                                                  "M_TRIM_THRESHOLD": _WARM_TRIM_THRESHOLD}}
    else:
        _ALLOCATOR = {"mode": "default", "note": "mallopt unavailable (not glibc)"}
    return dict(_ALLOCATOR)


# --------------------------------------------------------------------------------------
# environment and driver
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on Unix
        return None


def env_info(n_threads: Optional[int] = None) -> Dict[str, Any]:
    """Versions, threads, CPU model and how the native library was built."""
    from . import __version__, _C

    try:
        build = dict(_C.build_info())
    except Exception as e:  # pragma: no cover
        build = {"error": repr(e)}
    return {
        "tokenreduce": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": int(n_threads) if n_threads is not None else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        # other work on the machine skews timings of multi-threaded code: record it
        "loadavg_1min": _loadavg(),
        "build_info": build,
        "allocator": dict(_ALLOCATOR),
    }


def make_input_sets(case: Case, n_inputs: int = 3, seed: int = 0) -> List[Inputs]:
    """``n_inputs`` fresh input sets (seeds ``seed``, ``seed + 1``, ...) to rotate among."""
    return [case.make_inputs(seed + i) for i in range(max(1, n_inputs))]


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
    (see :func:`peak_extra_bytes`) and, for attention, attn_buffer_bytes.
    ``check``: first compare the outputs with the reference's on every input set
    (AssertionError on a mismatch), so a wrong kernel is never timed.
    """
    warmup = (2 if case.quick else 3) if warmup is None else warmup
    repeat = (12 if case.quick else 15) if repeat is None else repeat
    if input_sets is None:
        input_sets = make_input_sets(case, n_inputs, seed)
    with threads(n_threads):
        correct = None
        if check:
            for inputs in input_sets:
                check_outputs(case, case.tokenreduce(*inputs), case.reference(*inputs))
            correct = True
        timed = time_pair(case, input_sets, warmup=warmup, repeat=repeat,
                          warmup_s=0.05 if case.quick else 0.5)
        mem = {}
        if memory:
            for impl, fn in (("tokenreduce", case.tokenreduce), ("reference", case.reference)):
                mem[impl] = peak_extra_bytes(fn, input_sets[0])
    stats = {impl: _stats(t["times"]) for impl, t in timed.items()}
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


def _bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n} B ({n / 2**20:.2f} MiB)"


def memory_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per attention case: the op's and the reference's peak extra tensor memory
    next to the size of one ``[B, H, N, N]`` float32 buffer."""
    by_case: Dict[Tuple[str, str], Dict[str, Dict[str, Any]]] = {}
    for row in results:
        if row.get("attn_buffer_bytes") is not None:
            by_case.setdefault((row["op"], row["shape"]), {})[row["impl"]] = row
    lines = []
    for (op, shape), rows in by_case.items():
        ours, ref = rows.get("tokenreduce"), rows.get("reference")
        if ours is None or ref is None:
            continue
        lines.append(f"{op} [{shape}] peak extra memory: "
                     f"tokenreduce {_bytes(ours.get('peak_extra_bytes'))}, "
                     f"reference {_bytes(ref.get('peak_extra_bytes'))}; "
                     f"one [B,H,N,N] float32 buffer = {_bytes(ours['attn_buffer_bytes'])}")
    return lines


def run(*, quick: bool = False, op_names: Optional[Sequence[str]] = None, n_threads: int = 2,
        warmup: Optional[int] = None, repeat: Optional[int] = None, memory: bool = True,
        allocator: str = "warm",
        progress: Optional[Callable[[Case], None]] = None) -> Dict[str, Any]:
    """Run the cases; ``{"mode", "env", "results"}`` (results: two rows per case).
    ``allocator``: see :func:`configure_allocator` (process-wide)."""
    configure_allocator(allocator)
    results: List[Dict[str, Any]] = []
    for case in cases(quick=quick, op_names=op_names):
        if progress is not None:
            progress(case)
        results.extend(measure_case(case, n_threads=n_threads, warmup=warmup, repeat=repeat,
                                    memory=memory))
    return {"mode": "quick" if quick else "full", "env": env_info(n_threads), "results": results}


if __name__ == "__main__":  # pragma: no cover
    import json

    json.dump(run(quick="--quick" in sys.argv), sys.stdout, indent=2)
