"""`tokenreduce.measure`, the harness shared by `tokenreduce bench` and `tokenreduce profile`."""
import ast
import os

import pytest
import torch

from tokenreduce import measure


def test_threads_sets_and_restores():
    prev = torch.get_num_threads()
    with measure.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == prev
    with measure.threads(None):
        assert torch.get_num_threads() == prev


def test_median_iqr_ms():
    assert measure.median_iqr_ms([0.002]) == (2.0, 0.0)
    median, iqr = measure.median_iqr_ms([0.001, 0.002, 0.003, 0.004, 0.005])
    assert median == pytest.approx(3.0) and iqr == pytest.approx(2.0)


def test_time_pair_alternates_blocks_over_rotating_inputs():
    seen = {"a": [], "b": []}
    fns = {"a": lambda x: seen["a"].append(x), "b": lambda x: seen["b"].append(x)}
    res = measure.time_pair(fns, [(0,), (1,), (2,)], warmup=1, repeat=6, blocks=3, warmup_s=0.0)
    assert set(res) == {"a", "b"}
    for name in fns:
        assert len(res[name]["times"]) == 6 and len(res[name]["faults"]) == 6
        assert all(t >= 0 for t in res[name]["times"])
        # per block: 1 warm-up call (input set 0), then 2 timed calls on the next sets in turn
        assert seen[name] == [0, 0, 1, 0, 2, 0, 0, 1, 2]


def test_peak_extra_bytes_counts_an_allocation():
    n = 1 << 20
    peak = measure.peak_extra_bytes(lambda k: torch.empty(k, dtype=torch.uint8), (n,))
    if peak is None:
        pytest.skip("torch.profiler cannot record allocations here")
    assert peak >= n


def test_configure_allocator_modes():
    with pytest.raises(ValueError, match='allocator mode must be "warm" or "default", got "hot"'):
        measure.configure_allocator("hot")
    state = measure.configure_allocator("default")
    assert state["mode"] in ("default", "warm")


def test_env_info_fields():
    env = measure.env_info(3)
    assert env["threads"] == 3
    assert {"tokenreduce", "torch", "python", "platform", "cpu_count", "cpu_model", "loadavg_1min",
            "build_info", "allocator"} <= set(env)
    assert env["cpu_model"] == measure.cpu_model()


def test_measure_imports_no_op_method_or_model_layer():
    path = os.path.join(os.path.dirname(measure.__file__), "measure.py")
    imported = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    local = {i for i in imported if i.startswith(".")}
    assert local <= {".:__version__", ".:_C"}, local
