"""The ``tokenreduce`` command line: ``info`` and a quick ``bench`` with a JSON report."""
import json

import pytest

from tokenreduce import bench
from tokenreduce.cli import OPS, kernel_table, main

ROW_FIELDS = {"op", "shape", "dtype", "impl", "median_ms", "iqr_ms", "speedup", "gbps",
              "bytes_moved", "threads", "target", "target_met", "correct", "peak_extra_bytes"}
ENV_FIELDS = {"tokenreduce", "torch", "python", "threads", "cpu_model", "build_info"}


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    assert "torch" in out and "CUDA" in out


def test_kernel_table_has_cpu_and_fake_kernels():
    rows = {r["op"]: r for r in kernel_table()}
    assert set(rows) == set(OPS)
    for op, row in rows.items():
        assert row["CPU"] and row["fake"], row
    assert not rows["kcenter"]["autograd"]  # kcenter is not differentiable
    assert rows["bipartite_merge"]["autograd"] and rows["recycle"]["autograd"]


def test_bench_quick_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "--quick", "--op", "kcenter", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kcenter" in out and "reference" in out
    report = json.loads(path.read_text())
    assert report["mode"] == "quick" and report["targets_checked"] is False
    assert ENV_FIELDS <= set(report["env"])
    assert report["env"]["threads"] == 2
    assert set(report["env"]["build_info"]) >= {"openmp", "simd", "cuda", "compiler"}
    rows = report["results"]
    assert [(r["op"], r["impl"]) for r in rows] == [("kcenter", "tokenreduce"),
                                                     ("kcenter", "reference")]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["dtype"] == "float32" and r["correct"] is True
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["gbps"] > 0
        assert r["target_met"] is None  # quick mode: targets are not checked
    ours, ref = rows
    assert ref["speedup"] == 1.0
    assert abs(ours["speedup"] - ref["median_ms"] / ours["median_ms"]) < 1e-9
    assert ours["target"] == 5.0


def test_every_op_has_a_bench_case():
    assert set(bench.CASE_BUILDERS) == set(OPS)
    for quick in (True, False):
        assert [c.op for c in bench.cases(quick=quick)] == list(bench.CASE_BUILDERS)
        assert all(c.quick is quick for c in bench.cases(quick=quick))
    assert [c.op for c in bench.cases(quick=True, op_names=["recycle", "kcenter"])] == ["kcenter", "recycle"]


def test_bench_unknown_op_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['nope'\]; choose from \['kcenter', "):
        bench.cases(op_names=["nope"])
