"""bench/gpu_bench.py's CPU-side logic: a --dry-run on tiny CPU shapes writes the JSON and
Markdown reports with every field the GPU run will fill, and checks the targets."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "bench", "gpu_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_reports(tmp_path, capsys):
    gb = load()
    assert gb.main(["--dry-run", "--out", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1 and js[0].replace(".json", ".md") in files
    report = json.loads((tmp_path / js[0]).read_text())
    assert {"torch", "cuda", "device", "driver", "date"} <= set(report["env"])
    assert report["ceilings"]["copy_GBps"] > 0 and report["ceilings"]["gemm_TFLOPs"] > 0
    ops = {r["op"] for r in report["results"]}
    assert ops == {"attention_with_scores", "kcenter", "bipartite_merge", "recycle", "dpp_select", "region_attention"}
    for r in report["results"]:
        assert "error" not in r, r
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"] and r["n"] >= 1
        assert r["GBps"] > 0 and r["TFLOPs"] > 0
        if r["impl"] == "tokenreduce":
            assert r["speedup_vs_reference"] > 0 and r["speedup_vs_user"] > 0
    names = [t["target"] for t in report["targets"]]
    assert len(names) == 5 and all(t["met"] is None for t in report["targets"])  # dry shapes: n/a
    md = (tmp_path / js[0].replace(".json", ".md")).read_text()
    assert "| op | shape | impl |" in md and "kcenter" in md


def test_failing_case_is_recorded_not_fatal(tmp_path, monkeypatch):
    gb = load()

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(gb, "tome_merge", boom)
    args = gb.parse_args(["--dry-run", "--ops", "bipartite_merge", "--out", str(tmp_path)])
    report = gb.run(args)
    errs = [r for r in report["results"] if r.get("error")]
    assert len(errs) == 1 and errs[0]["impl"] == "ToMe merge code" and "injected" in errs[0]["error"]
    ok = [r for r in report["results"] if r["impl"] == "tokenreduce"]
    assert ok and ok[0]["median_us"] > 0


def test_targets_from_rows():
    gb = load()
    rows = [
        {"op": "kcenter", "impl": "tokenreduce", "shape": dict(B=1, N=576, D=1024, k=64), "median_us": 50.0},
        {"op": "bipartite_merge", "impl": "tokenreduce", "shape": dict(B=64, N=577, D=1024, Dm=64, r=64),
         "median_us": 100.0, "bytes": 3e8},
    ]
    t = {x["target"]: x for x in gb.check_targets(rows, {"copy_GBps": 3000.0})}
    assert t["kcenter N=576 D=1024 k=64 B=1"]["met"] is True
    assert abs(t["bipartite_merge B=64 / one read+write at copy bandwidth"]["value"] - 1.0) < 1e-9
    assert t["[CLS]-row scores B=1"]["met"] is None


def test_output_folder_as_argument(tmp_path):
    gb = load()
    out = tmp_path / "results"
    assert gb.main([str(out), "--dry-run", "--ops", "recycle"]) == 0
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
