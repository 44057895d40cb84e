"""pytest-benchmark suite of the tokenreduce ops, built from `tokenreduce.bench`'s cases.

    pytest bench -q            the issue's target shapes; speed targets asserted
    pytest bench -q --quick    small shapes (CI smoke run): same tests, targets not asserted

``--quick`` can also be given as the environment variable ``TOKENREDUCE_BENCH_QUICK=1``;
``--bench-threads N`` sets torch's thread count for the measurements (default 2);
``--allocator warm|default`` the C allocator setting (default warm, see
`tokenreduce.measure.configure_allocator`).
The same-run speedups (and attention's peak memory) are printed at the end of the run.
"""
from __future__ import annotations

import os
from typing import Dict, List

import pytest

from tokenreduce import bench, measure


def pytest_addoption(parser):
    group = parser.getgroup("tokenreduce", "tokenreduce benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="small shapes for a smoke run; speed targets are not asserted "
                         "(or set TOKENREDUCE_BENCH_QUICK=1)")
    group.addoption("--bench-threads", type=int, default=2, metavar="N",
                    help="torch threads during the measurements (default 2)")
    group.addoption("--allocator", choices=("warm", "default"), default="warm",
                    help="C allocator setting for the run, see "
                         "tokenreduce.measure.configure_allocator (default warm)")


def _is_quick(config) -> bool:
    env = os.environ.get("TOKENREDUCE_BENCH_QUICK", "").strip().lower()
    return bool(config.getoption("--quick", default=False)) or env not in ("", "0", "false", "no")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = bench.cases(quick=_is_quick(metafunc.config), variants=True)
        metafunc.parametrize("case", cases, ids=[c.test_id for c in cases])


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return _is_quick(pytestconfig)


@pytest.fixture(scope="session")
def bench_threads(pytestconfig) -> int:
    n = pytestconfig.getoption("--bench-threads", default=2)
    if n < 1:
        raise pytest.UsageError("--bench-threads must be >= 1")
    return n


_INPUTS: Dict[str, list] = {}


@pytest.fixture
def input_sets(case, bench_threads):
    """The case's pre-generated input sets (shared by its tests), checked once against the
    reference: a benchmark never times a kernel whose outputs are wrong."""
    key = f"{case.id}/quick={case.quick}"
    if key not in _INPUTS:
        sets = bench.make_input_sets(case)
        with measure.threads(bench_threads):
            for inputs in sets:
                bench.check_outputs(case, case.tokenreduce(*inputs), case.reference(*inputs))
        _INPUTS[key] = sets
    return _INPUTS[key]


_SUMMARY_KEY = pytest.StashKey[List[str]]()


def pytest_configure(config):
    config.stash[_SUMMARY_KEY] = []
    # a warm allocator for the whole run: timings do not depend on glibc's history
    measure.configure_allocator(config.getoption("--allocator", default="warm"))


@pytest.fixture
def speed_log(pytestconfig) -> List[str]:
    """Lines printed in the terminal summary (same-run speedups, memory)."""
    return pytestconfig.stash[_SUMMARY_KEY]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY_KEY, [])
    if lines:
        mode = "quick (targets not asserted)" if _is_quick(config) else "full"
        alloc = measure.env_info()["allocator"]["mode"]
        terminalreporter.write_sep("-", f"tokenreduce same-run speedups: {mode} mode, "
                                        f"{alloc} allocator")
        for line in lines:
            terminalreporter.write_line(line)
