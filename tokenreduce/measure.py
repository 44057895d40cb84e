"""The measurement harness shared by ``tokenreduce bench`` and ``tokenreduce profile``.

* :func:`time_pair`: per-call times of two (or more) functions measured in the same run, in
  alternating blocks of calls, rotating among pre-generated input sets; :func:`median_iqr_ms`
  summarises them (median and interquartile range, in ms);
* :func:`threads`: ``torch.set_num_threads`` for a block, then the previous count again;
* :func:`configure_allocator`: the warm glibc allocator, so whether a call pays page faults
  for its temporaries does not depend on the process's history; :func:`minor_faults` counts
  them;
* :func:`peak_extra_bytes`: the peak tensor memory one call allocates (torch.profiler);
* :func:`env_info`: versions, threads, CPU model, load, the native build, the allocator.

This module imports nothing from the ops, methods or models: it times any callable.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "configure_allocator",
    "cpu_model",
    "env_info",
    "loadavg",
    "median_iqr_ms",
    "minor_faults",
    "peak_extra_bytes",
    "quiet_native_stderr",
    "threads",
    "time_pair",
]

Inputs = Tuple[Any, ...]


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


def median_iqr_ms(times_s: Sequence[float]) -> Tuple[float, float]:
    """median and interquartile range, in milliseconds, of per-call times in seconds."""
    ms = [t * 1e3 for t in times_s]
    if len(ms) < 2:
        return ms[0], 0.0
    q1, q2, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return q2, q3 - q1


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - not on Unix
        return 0


def time_pair(fns: Mapping[str, Callable[..., Any]], input_sets: Sequence[Inputs], *,
              warmup: int = 3, repeat: int = 15, blocks: int = 3, warmup_s: float = 0.5,
              max_warmup: int = 50) -> Dict[str, Dict[str, List[float]]]:
    """Per-call seconds (and minor page faults) of each function of ``fns`` (name -> fn,
    usually the op and its reference), measured in the same run, in alternating blocks:
    ``blocks`` times, each function in turn makes untimed warm-up calls and then
    ``ceil(repeat / blocks)`` timed calls ``fn(*inputs)``, each on the next input set
    (rotating). Warm-up: in the first block at least ``warmup`` calls and at least
    ``warmup_s`` seconds of calls (at most ``max_warmup`` calls): the C allocator needs a
    few calls of a function with large temporaries before it stops returning memory to
    the OS (its mmap threshold adapts); 1 call in later blocks.

    Why blocks, not call-by-call interleaving: with glibc's default adaptive thresholds,
    alternating single calls of two functions with different allocation patterns makes
    the C allocator hand memory back to the OS and fault it in again on every call
    (measured here: ~16k minor page faults, ~+80% time per call for the bipartite_merge
    and recycle references at the full shapes), a cost neither side has in a steady loop.
    Each block is a steady loop after its warm-up; alternating the blocks keeps both
    sides under the same machine conditions (see also :func:`configure_allocator`).

    Calls are plain (no ``torch.inference_mode``/``no_grad``; the inputs do not require
    grad), as a user makes them, so any dispatch overhead of the op's autograd
    registration is included. Returns ``{name: {"times": [...], "faults": [...]}}``.
    """
    res: Dict[str, Dict[str, List[float]]] = {k: {"times": [], "faults": []} for k in fns}
    blocks = max(1, int(blocks))
    per_block = max(1, -(-int(repeat) // blocks))
    n = len(input_sets)
    for blk in range(blocks):
        for name, fn in fns.items():
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
                f0 = minor_faults()
                t0 = time.perf_counter()
                out = fn(*inputs)
                t1 = time.perf_counter()
                f1 = minor_faults()
                del out
                res[name]["times"].append(t1 - t0)
                res[name]["faults"].append(f1 - f0)
    return res


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
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
    """Peak bytes of tensor memory one call ``fn(*inputs)`` allocates above what was
    allocated before it (its returned outputs included), or None when it cannot be
    measured.

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
        with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
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

    ``"warm"`` (what ``tokenreduce bench``, ``tokenreduce profile`` on the CPU and
    ``bench/`` use): ``mallopt`` a fixed mmap threshold of 32 MiB (glibc's maximum) and a
    1 GiB trim threshold, so memory freed by one call is reused by the next: both
    implementations run with a warm allocator, as with a caching allocator (jemalloc,
    tcmalloc). Allocations above 32 MiB (e.g. the eager attention's ``[B, H, N, N]``
    buffers at the full shapes) are still mapped fresh on every call, as in any glibc
    process. This setting is process-wide and cannot be undone (glibc's adaptive mode
    does not come back), so only the benchmark drivers call it. A no-op without glibc.

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
# environment
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on Unix
        return None


def env_info(n_threads: Optional[int] = None) -> Dict[str, Any]:
    """Versions, threads, CPU model and how the native library was built."""
    from . import __version__, _C

    try:
        build = dict(_C.build_info())
        # the CPU ops' bf16 screen: measured bf16 / float32 GEMM speedup here, and its choice
        build["bf16_screen"] = dict(_C.bf16_screen())
    except Exception as e:  # pragma: no cover
        build = {"error": repr(e)}
    return {
        "tokenreduce": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": int(n_threads) if n_threads is not None else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        # other work on the machine skews timings of multi-threaded code: record it
        "loadavg_1min": loadavg(),
        "build_info": build,
        "allocator": dict(_ALLOCATOR),
    }
