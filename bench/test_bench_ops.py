"""Benchmarks of each op and its plain-PyTorch reference (grouped per case, so
pytest-benchmark shows them side by side), and the speed targets checked from a same-run
measurement of both. The cases are `tokenreduce.bench.cases()`, the same list the
``tokenreduce bench`` command runs. Fixtures (``case``, ``input_sets``, ``quick``...) are
in bench/conftest.py; ``input_sets`` checks the op's outputs against the reference first.
On the full shapes the same-run measurement also times the op's plain-torch peers
(`tokenreduce.bench.peers`) and asserts our speedup over each peer that has a target.
"""
from __future__ import annotations

import itertools

import pytest

from tokenreduce import bench, measure
from tokenreduce.bench import report


def _benchmark(benchmark, case, fn, input_sets, quick, bench_threads, impl):
    benchmark.group = f"{case.op} [{case.shape}] {case.dtype_name}"
    benchmark.name = impl
    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=case.dtype_name,
                                impl=impl, bytes_moved=case.bytes_moved, threads=bench_threads)
    rotation = itertools.cycle(input_sets)  # a different input set each round

    def setup():
        return next(rotation), {}

    with measure.threads(bench_threads):
        benchmark.pedantic(fn, setup=setup, rounds=12 if quick else 15,
                           warmup_rounds=2 if quick else 3, iterations=1)


def test_tokenreduce(benchmark, case, input_sets, quick, bench_threads):
    _benchmark(benchmark, case, case.tokenreduce, input_sets, quick, bench_threads, "tokenreduce")


def test_reference(benchmark, case, input_sets, quick, bench_threads):
    _benchmark(benchmark, case, case.reference, input_sets, quick, bench_threads, "reference")


def test_speedup_target(case, input_sets, quick, bench_threads, speed_log):
    """The op against its reference, timed in the same run (alternating blocks of calls,
    median of each side); the target is asserted on the full shapes only."""
    rows = bench.measure_case(case, n_threads=bench_threads, input_sets=input_sets,
                              check=False,  # input_sets already checked the outputs
                              memory=case.attn_buffer_bytes is not None)
    ours, ref = rows[:2]
    peer_rows = rows[2:]  # full mode: the plain-torch peers
    speedup = ours["speedup"]
    if quick or case.target is None:
        verdict = "not asserted"
    else:
        verdict = "met" if speedup >= case.target else "MISSED"
    speed_log.append(
        f"{case.op} [{case.shape}] {case.dtype_name}: tokenreduce {ours['median_ms']:.3f} ms "
        f"(IQR {ours['iqr_ms']:.3f}), reference {ref['median_ms']:.3f} ms "
        f"(IQR {ref['iqr_ms']:.3f}): {speedup:.2f}x (target >= {case.target:g}x: {verdict})"
    )
    for p in peer_rows:
        goal = "" if p["target"] is None else (
            f" (target >= {p['target']:.3g}x: {'met' if p['target_met'] else 'MISSED'})")
        speed_log.append(f"    vs {p['impl']}: {p['median_ms']:.3f} ms (IQR {p['iqr_ms']:.3f}): "
                         f"ours {p['vs_peer']:.2f}x{goal}")
    speed_log.extend(report.memory_lines([ours, ref]))
    if quick or case.target is None:
        return
    for p in peer_rows:
        if p["target"] is not None:
            assert p["vs_peer"] >= p["target"], (
                f"{case.id}: {p['vs_peer']:.2f}x over {p['impl']}, target >= {p['target']:.3g}x "
                f"(tokenreduce {ours['median_ms']:.3f} ms, {p['impl']} {p['median_ms']:.3f} ms)"
            )
    assert speedup >= case.target, (
        f"{case.id}: {speedup:.2f}x over the reference, target >= {case.target:g}x "
        f"(tokenreduce {ours['median_ms']:.3f} ms, reference {ref['median_ms']:.3f} ms)"
    )
    if case.attn_buffer_bytes is not None and ours["peak_extra_bytes"] is not None:
        # the op never materialises the [B, H, N, N] probabilities
        assert ours["peak_extra_bytes"] < case.attn_buffer_bytes, (
            f"{case.id}: peak extra memory {ours['peak_extra_bytes']} B is not below one "
            f"[B,H,N,N] float32 buffer ({case.attn_buffer_bytes} B)"
        )
