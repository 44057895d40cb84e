"""tools/gpu_validate.sh --dry-run: the device script's plumbing on the CPU (time boxes clipped to
the budget, per-step logs and status files, needs between steps, pytest runs that ran nothing,
the summary printed last, "nothing ran" detection), with stand-in commands per step."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_validate.sh")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils timeout")


def dry(tmp_path, budget, reserve=3, **stand_ins):
    env = dict(os.environ, GPU_VALIDATE_BUDGET=str(budget), GPU_VALIDATE_RESERVE=str(reserve),
               GPU_VALIDATE_KEEP_STEPS="1", PYTHON=sys.executable)
    env.update({f"GPU_VALIDATE_DRY_{k}": v for k, v in stand_ins.items()})
    out = tmp_path / "results"
    p = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, env=env,
                       timeout=120)
    status = {}
    for f in os.listdir(out / "steps"):
        if f.endswith(".status"):
            status[f[:-7]] = (out / "steps" / f).read_text().split()
    return p, out, status


def test_dry_run_all_steps_pass_and_summary_is_last(tmp_path):
    p, out, status = dry(tmp_path, 200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(status) == 16 and all(s[0] == "DRY" for s in status.values()), status
    assert p.stdout.rstrip().splitlines()[-1].startswith("gpu_validate: 16 passed, 0 failed")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and not summary["nothing_ran"]
    assert [t["target"][:7] for t in summary["targets"]][:2] == ["kcenter", "kcenter"]
    assert all(t["met"] is None for t in summary["targets"])       # measured / target, never asserted
    assert "| step | status |" in (out / "summary.md").read_text()
    with tarfile.open(out / "results.tar.gz") as t:
        names = t.getnames()
    assert "steps/env.log" in names and "steps/bench_full.status" in names
    assert len(os.listdir(out)) <= 8          # the device tool brings back at most 8 files


def test_dry_run_time_box_and_failure(tmp_path):
    p, out, status = dry(tmp_path, 14, env="exit 3", info="sleep 60")
    assert p.returncode == 1, p.stdout + p.stderr
    assert status["env"][0] == "FAIL" and status["env"][1] == "3"
    assert status["extension"][0] == "DRY"
    assert status["info"][0] == "TIMEOUT" and int(status["info"][3]) <= 11   # clipped to the time left
    assert all(status[s][0] == "SKIP" for s in ("bench_full", "profile_llava_b1", "race_attention"))
    assert (out / "steps" / "bench_full.log").read_text().startswith("skipped: no time left")
    assert "1 failed" not in p.stdout and "2 failed" in p.stdout.rstrip().splitlines()[-1]


def test_dry_run_needs_and_empty_pytest(tmp_path):
    p, out, status = dry(tmp_path, 200, extension="exit 3", triton_gpu="echo '12 skipped in 0.50s'",
                         cuda_nvrtc="echo 'no tests ran in 0.01s'; exit 5")
    assert p.returncode == 1, p.stdout + p.stderr
    assert status["extension"][0] == "FAIL"
    assert all(status[s][0] == "SKIP" for s in ("info", "cuda_compiled", "methods_cuda", "sanitize_memcheck"))
    assert (out / "steps" / "info.log").read_text().startswith("skipped: needs step extension")
    assert status["triton_gpu"][0] == "EMPTY" and status["cuda_nvrtc"][0] == "EMPTY"   # ran nothing: not a pass
    assert status["race_attention"][0] == "DRY"


def test_dry_run_nothing_ran(tmp_path):
    p, out, status = dry(tmp_path, 0)
    assert p.returncode == 2, p.stdout + p.stderr
    assert all(s[0] == "SKIP" for s in status.values())
    assert "NOTHING RAN" in p.stdout.rstrip().splitlines()[-1]
    assert json.loads((out / "summary.json").read_text())["nothing_ran"] is True


def test_dry_run_only_selected_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_VALIDATE_ONLY", "extension cuda_compiled")
    p, out, status = dry(tmp_path, 200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {k for k, v in status.items() if v[0] == "DRY"} == {"extension", "cuda_compiled"}
    assert (out / "steps" / "env.log").read_text().startswith("skipped: not in GPU_VALIDATE_ONLY")
