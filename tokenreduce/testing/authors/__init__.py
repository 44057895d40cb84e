"""Straightforward re-implementations of the authors' released algorithms (test-only).

One module per method, written the way the authors' code does it (per-sample Python
loops, boolean masks, ``.tolist()``): the oracle the batched methods of
`tokenreduce.methods` are tested against (``tests/methods/``), and the baseline they are
timed against (``bench/test_bench_methods.py``). The oracles use only the public
`tokenreduce.ops` and `tokenreduce.methods.build` / ``Context``, and only in their
``*_ours`` helpers and ``bench_cases``.

A method's module defines ``bench_cases(quick: bool) -> list[MethodBenchCase]``;
`bench_cases` here collects them, so adding a method's benchmark is adding its module here.
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


def bench_cases(quick: bool = False) -> List[MethodBenchCase]:
    """Every ``bench_cases(quick)`` of the modules of this package, by module name."""
    out: List[MethodBenchCase] = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "bench_cases", None)
        if cases is not None:
            out.extend(cases(quick))
    return out
