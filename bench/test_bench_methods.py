"""Benchmarks of each reduction method against the re-implementation of its authors'
algorithm (`tokenreduce.testing.authors`, test-only), at LLaVA-1.5 shapes (576 image tokens,
B=1 and 16) or tiny shapes with ``--quick``.

The cases are discovered: every module of `tokenreduce.testing.authors` with a
``bench_cases(quick)`` function contributes its own (so adding a method's benchmark is
adding a file there). Per case: pytest-benchmark timings of ours and the authors' (same
group, side by side) and a same-run ratio (alternating blocks, medians) recorded in
``extra_info`` and printed in the terminal summary. No speed target is asserted.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from tokenreduce.testing import authors
from tokenreduce import measure


def _quick(config) -> bool:
    env = os.environ.get("TOKENREDUCE_BENCH_QUICK", "").strip().lower()
    return bool(config.getoption("--quick", default=False)) or env not in ("", "0", "false", "no")


def pytest_generate_tests(metafunc):
    if "mcase" in metafunc.fixturenames:
        cases = authors.bench_cases(quick=_quick(metafunc.config))
        metafunc.parametrize("mcase", cases, ids=[c.id for c in cases])


_INPUTS = {}


def _inputs(mcase):
    if mcase.id not in _INPUTS:
        _INPUTS[mcase.id] = mcase.make()
    return _INPUTS[mcase.id]


def _rounds(quick: bool, slow: bool) -> int:
    return 5 if quick else (3 if slow else 10)


def _bench(benchmark, mcase, fn, impl, quick, bench_threads):
    inputs = _inputs(mcase)
    benchmark.group = f"method {mcase.id}"
    benchmark.name = impl
    benchmark.extra_info.update(method=mcase.method, shape=mcase.shape, impl=impl,
                                threads=bench_threads, **mcase.extra)
    with measure.threads(bench_threads), torch.inference_mode():
        benchmark.pedantic(fn, args=(inputs,), rounds=_rounds(quick, impl == "authors"),
                           warmup_rounds=1, iterations=1)


def test_method_ours(benchmark, mcase, quick, bench_threads):
    _bench(benchmark, mcase, mcase.ours, "tokenreduce", quick, bench_threads)


def test_method_authors(benchmark, mcase, quick, bench_threads):
    _bench(benchmark, mcase, mcase.authors, "authors", quick, bench_threads)


def _median_ms(fn, inputs, n) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(inputs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _blocks_and_calls(slowest_s: float, quick: bool):
    """Alternating blocks, and calls per block (the same for both sides), by the slower side's
    warm-up call: 7 blocks of 9 calls under 20 ms (short calls scatter most on a shared
    machine), 3 of 5 under 0.1 s, 3 of 3 under 0.5 s, else 3 of 1 (the authors' FlowCut at
    B=16 takes ~10 s)."""
    if quick:
        return 3, 3
    if slowest_s < 0.02:
        return 7, 9
    return 3, (5 if slowest_s < 0.1 else (3 if slowest_s < 0.5 else 1))


def test_method_ratio(benchmark, mcase, quick, bench_threads, speed_log):
    """Same-run ratio: alternating blocks of ours and the authors', the same number of calls
    on each side (an unequal count biases the medians of memory-bound cases), medians."""
    inputs = _inputs(mcase)
    ours, theirs = [], []
    with measure.threads(bench_threads), torch.inference_mode():
        t0 = time.perf_counter()
        mcase.ours(inputs)                                  # warm-up, and the calls per block
        t1 = time.perf_counter()
        mcase.authors(inputs)
        blocks, n = _blocks_and_calls(max(t1 - t0, time.perf_counter() - t1), quick)
        for _ in range(blocks):
            ours.append(_median_ms(mcase.ours, inputs, n))
            theirs.append(_median_ms(mcase.authors, inputs, n))
    o, a = statistics.median(ours), statistics.median(theirs)
    ratio = a / o
    benchmark.extra_info.update(method=mcase.method, shape=mcase.shape, ours_ms=o, authors_ms=a,
                                speedup=ratio, threads=bench_threads, **mcase.extra)
    benchmark.group = f"method {mcase.id}"
    benchmark.name = "ratio (ours, timed once more)"
    with measure.threads(bench_threads), torch.inference_mode():
        benchmark.pedantic(mcase.ours, args=(inputs,), rounds=1, iterations=1)
    speed_log.append(f"method {mcase.id}: tokenreduce {o:.3f} ms, authors {a:.3f} ms: "
                     f"{ratio:.2f}x (not asserted)")
    assert o > 0 and a > 0
