"""The main job (`tokenreduce profile` with no workload flag): its two parts, which flags keep it,
its combined JSON / CSV, the two tables, and the fidelity-vs-speedup plot read back; run here
on tiny twins of the two parts (random weights, one call each)."""
import csv
import json

import numpy as np
import pytest

from tokenreduce import _C, cli
from tokenreduce.methods import Budget
from tokenreduce.profile import main_job, report, sweep

from _profile_methods import register


@pytest.fixture(autouse=True)
def _methods():
    register()


def _tiny_parts(*_, **__):
    common = dict(random_weights=True, budgets=[Budget(keep=4), Budget(ratio=0.5)], batch=1, warmup=0, repeat=2,
                  threads=1, memory=False)
    return [sweep.Spec(model="tiny-dinov2", methods=["test-topcls-vit"], **common),
            sweep.Spec(model="tiny-llava", methods=["test-topnorm-proj", "test-first-llm"], prompt="hi",
                       new_tokens=2, **common)]


def test_which_command_lines_run_the_main_job():
    assert main_job.is_main_job([])
    assert main_job.is_main_job(["--json", "p.json", "--plot", "p.png", "--wide", "--threads", "2", "--no-memory",
                                 "--device", "cpu", "--dtype", "float32", "--csv=p.csv"])
    for argv in (["--model", "tiny-llava"], ["--method", "tome"], ["--ratio=0.5"], ["--keep", "4"],
                 ["--rat", "0.5"], ["--batch", "1"], ["--random-weights"], ["--repeat", "1"], ["--n-images", "2"]):
        assert not main_job.is_main_job(argv), argv


def test_the_parts_show_each_method_where_it_saves_time():
    vision, llava = main_job.specs()
    assert vision.model == "dinov2-s-real" and vision.methods is None        # ViT-stage defaults, real weights
    assert sweep.default_methods("vision")[:3] == ["tome", "turbo", "flowcut"]
    assert llava.model == "llava-1.5-7b" and llava.random_weights and llava.layers == main_job.LLAVA_LAYERS
    assert llava.methods == ["visionzip", "fastv"] and llava.budgets == [Budget(keep=64)]
    assert llava.opts == {"fastv": {"layer": 1}} and llava.batch == 1
    for spec in (vision, llava):
        sweep.check(spec)                       # every argument is valid; nothing is loaded
    assert all(p.threads == 1 and p.device == "cpu" for p in main_job.specs(device="cpu", threads=1))
    assert not main_job.specs(memory=False)[0].memory
    # the LLaVA part: bfloat16 on a CPU with bfloat16 matmuls unless a dtype is asked for
    assert main_job.llava_dtype("cpu", "float32") == "float32" and main_job.specs(dtype="fp16")[1].dtype == "fp16"
    assert main_job.llava_dtype("cpu", None) == ("bfloat16" if main_job.cpu_bf16_matmul_pays() else None)
    info = _C.bf16_screen()   # the measured choice, not the CPU flags
    assert main_job.cpu_bf16_matmul_pays() == (info["speedup"] >= info["min_speedup"])
    assert main_job.llava_dtype("cuda", None) is None and vision.dtype is None


def test_main_job_writes_both_parts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main_job, "specs", _tiny_parts)
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = cli.main(["profile", "--json", str(j), "--csv", str(c), "--plot", str(p)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "main job" in out and "tiny-dinov2" in out and "tiny-llava" in out
    assert "prefill speedup" in out and "of FLOPs" in out and "RANDOM weights" in out
    rep = json.loads(j.read_text())
    assert rep["main_job"] is True and [q["model"] for q in rep["parts"]] == ["tiny-dinov2", "tiny-llava"]
    assert rep["command"] == "tokenreduce profile --json " + str(j) + " --csv " + str(c) + " --plot " + str(p)
    for part in rep["parts"]:
        assert part["fields"] == report.FIELDS[part["kind"]]
        assert [r["method"] for r in part["rows"]][0] == "baseline"
        for r in part["rows"][1:]:
            assert r["error"] is None and r["speedup_of_flops"] is not None and r["within_noise"] in (True, False)
    assert rep["parts"][1]["rows"][1]["speedup_prefill"] is not None
    with open(c) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[0] == "model" and "kl" in rows[0] and "saliency_corr" in rows[0]
    assert [r["model"] for r in rows] == ["tiny-dinov2"] * 3 + ["tiny-llava"] * 5
    from matplotlib import image
    png = image.imread(str(p))
    assert png.shape[1] > png.shape[0] > 300          # two panels side by side
    assert np.std(png[..., :3]) > 0.05                # not blank


def test_pareto_plot_of_one_sweep(tmp_path):
    rep = sweep.run(_tiny_parts()[0])
    base, row = rep["rows"][0], rep["rows"][1]
    lo, hi = report.speedup_range(row, base)
    assert lo <= row["speedup"] <= hi
    assert report.pareto_front([(1, 0.9), (2, 0.8), (1.5, 0.7), (3, 0.5)], True) == [(1, 0.9), (2, 0.8), (3, 0.5)]
    assert report.pareto_front([(1, 0.1), (2, 0.3), (1.5, 0.4)], False) == [(1, 0.1), (2, 0.3)]
    path = report.plot(rep, str(tmp_path / "one.png"))
    from matplotlib import image
    png = image.imread(path)
    assert png.shape[0] > 300 and png.shape[1] > 400 and np.std(png[..., :3]) > 0.05
