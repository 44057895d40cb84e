"""Straightforward re-implementations of the authors' released algorithms.

One module per method, written the way the authors' code does it (per-sample Python
loops, boolean masks, ``.tolist()``): the oracle the batched methods of
`tokenreduce.methods` are tested against, and the baseline they are timed against.

A module may define ``bench_cases(quick: bool) -> list[MethodBenchCase]``; the method
benchmarks (``bench/test_bench_methods.py``) discover them with `bench_cases`, so adding
a method's benchmark is adding its module here. `tokenreduce.authors.synthetic` makes
consistent synthetic CLIP-like inputs.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List


@dataclass
class MethodBenchCase:
    """One timing case: ``make()`` returns the inputs (built once, outside the timing);
    ``ours(inputs)`` runs the batched method, ``authors(inputs)`` the re-implementation."""
    method: str
    shape: str                       # e.g. "B=16 N=577 D=1024 keep=64"
    make: Callable[[], Any]
    ours: Callable[[Any], Any]
    authors: Callable[[Any], Any]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.method}[{self.shape}]"


_NOT_CASES = {"synthetic"}


def bench_cases(quick: bool = False) -> List[MethodBenchCase]:
    """Every ``bench_cases(quick)`` of the modules of this package, by module name."""
    out: List[MethodBenchCase] = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name in _NOT_CASES:
            continue
        m = importlib.import_module(f"{__name__}.{mod.name}")
        fn = getattr(m, "bench_cases", None)
        if fn is not None:
            out.extend(fn(quick))
        elif getattr(m, "bench_case", None) is not None:
            out.extend(_from_bench_case(mod.name, m.bench_case, quick))
    return out


def _from_bench_case(name: str, bench_case: Callable, quick: bool) -> List[MethodBenchCase]:
    """Adapt the other convention, ``bench_case(B, quick) -> (ours_fn, authors_fn, args)``
    (one full run of each side on ``args``), to `MethodBenchCase` at B = 1 and 16."""
    cases = []
    for B in (1, 16):
        cases.append(MethodBenchCase(
            method=name, shape=f"B={B}" + (" quick" if quick else " N=577 D=1024"),
            make=lambda B=B: bench_case(B, quick),
            ours=lambda inp: inp[0](*inp[2]),
            authors=lambda inp: inp[1](*inp[2])))
    return cases
