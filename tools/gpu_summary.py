#!/usr/bin/env python3
"""The last step of tools/gpu_validate.sh: RESULTS_DIR/summary.{json,md} and a short table.

    python tools/gpu_summary.py RESULTS_DIR --steps env extension ... [--elapsed S --budget S] [--dry-run]

Reads each step's ``<step>.status`` ("status rc seconds limit"), ``env.json``, the op benchmark
(``<device>-<date>.json`` of bench/gpu_bench.py: ceilings, rows, targets), the attention race
(``race-attention-*.json``) and the profiles (``profile-*.json``), and reports the issue-11
targets as measured / target (never asserted). Standard library only (runs where torch does
not). Exit 0: every step that ran passed; 1: a step failed or timed out; 2: nothing ran (no step
passed: no GPU, every step skipped or empty).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

PASSED = {"ok", "DRY"}
FAILED = {"FAIL", "TIMEOUT"}


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def read_status(folder: str, step: str) -> Dict:
    try:
        with open(os.path.join(folder, f"{step}.status")) as f:
            st, rc, sec, lim = (f.read().split() + ["-"] * 4)[:4]
    except OSError:
        st, rc, sec, lim = "MISSING", "-", "0", "0"
    return {"step": step, "status": st, "rc": rc, "seconds": int(sec) if sec.isdigit() else 0,
            "limit": int(lim) if lim.isdigit() else 0}


def bench_report(folder: str) -> Optional[Dict]:
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        r = load(p)
        if isinstance(r, dict) and "targets" in r and "results" in r:
            return r
    return None


def _row(rows, op, impl, **shape):
    for r in rows:
        if r.get("op") == op and r.get("impl") == impl and r.get("median_us") is not None \
                and all(r.get("shape", {}).get(k) == v for k, v in shape.items()):
            return r
    return None


def prefill_vs_flops(report: Dict, keep: int = 64) -> List[Dict]:
    """Per method at ``keep``: prefill speedup / (baseline prefill FLOPs / method prefill FLOPs)."""
    rows = [r for r in report.get("rows", []) if not r.get("error")]
    base = next((r for r in rows if r.get("keep") is None and r.get("ratio") is None), None)
    out = []
    for r in rows:
        if r.get("keep") != keep or not base:
            continue
        sp, bf, mf = r.get("speedup_prefill"), base.get("flops_llm_prefill"), r.get("flops_llm_prefill")
        ratio = (bf / mf) if (bf and mf) else None
        out.append({"method": r.get("method"), "speedup_prefill": sp, "flops_ratio_prefill": ratio,
                    "value": (sp / ratio) if (sp and ratio) else None})
    return out


def targets(folder: str, bench: Optional[Dict]) -> List[Dict]:
    out: List[Dict] = []

    def add(name, value, target, unit, better="<="):
        met = None if value is None else (value <= target if better == "<=" else value >= target)
        out.append({"target": name, "measured": value, "target_value": target, "unit": unit,
                    "better": better, "met": met})

    if bench:
        names = {"kcenter N=576 D=1024 k=64 B=1": "kcenter N=576 D=1024 k=64 B=1",
                 "attention ViT-L/336 B=64 / SDPA flash": "attention+scores ViT-L/336 B=64 / SDPA flash fwd",
                 "[CLS]-row scores B=1": "[CLS]-row scores ViT-L/336 B=1"}
        for t in bench["targets"]:
            add(names.get(t["target"], t["target"]), t["value"], t["limit"], t["unit"])
        r = _row(bench["results"], "kcenter", "tokenreduce", B=64, N=576, D=1024, k=64)
        add("kcenter N=576 D=1024 k=64 B=64", r and r["median_us"], 120.0, "us")
        out.insert(1, out.pop())  # the order: kcenter B=1, then B=64
    else:
        for name, lim, unit in (("kcenter N=576 D=1024 k=64 B=1", 70.0, "us"),
                                ("kcenter N=576 D=1024 k=64 B=64", 120.0, "us"),
                                ("attention+scores ViT-L/336 B=64 / SDPA flash fwd", 1.2, "x"),
                                ("[CLS]-row scores ViT-L/336 B=1", 5.0, "us"),
                                ("bipartite_merge B=64 / one read+write at copy bandwidth", 3.0, "x"),
                                ("recycle B=64 / one read+write at copy bandwidth", 3.0, "x")):
            add(name, None, lim, unit)
    for b in (1, 16):
        prof = load(os.path.join(folder, f"profile-llava-1.5-7b-b{b}.json"))
        per = prefill_vs_flops(prof) if prof else []
        vals = [p for p in per if p["value"] is not None]
        best = max(vals, key=lambda p: p["value"]) if vals else None
        add(f"LLaVA-1.5-7B B={b} prefill speedup 576->64 / FLOPs ratio"
            + (f" (best: {best['method']})" if best else ""), best and best["value"], 0.8, "x", ">=")
        out[-1]["per_method"] = per
    return out


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    return f"{v:.3g} {unit}".strip() if isinstance(v, float) else f"{v} {unit}".strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--steps", nargs="+", required=True)
    ap.add_argument("--elapsed", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    steps = [read_status(a.folder, s) for s in dict.fromkeys(a.steps)]
    env = load(os.path.join(a.folder, "env.json")) or {}
    bench = bench_report(a.folder)
    race = next((load(p) for p in sorted(glob.glob(os.path.join(a.folder, "race-attention-*.json")))), None)
    tg = targets(a.folder, bench)
    ceil = (bench or {}).get("ceilings", {})
    passed = [s for s in steps if s["status"] in PASSED]
    failed = [s for s in steps if s["status"] in FAILED]
    nothing = not passed
    summary = {"dry_run": a.dry_run, "elapsed_s": a.elapsed, "budget_s": a.budget,
               "device": env.get("device") or (bench or {}).get("env", {}).get("device"),
               "env": env, "steps": steps, "ceilings": ceil, "targets": tg,
               "race": race and {"wins": race.get("wins"), "suggested_default": race.get("suggested_default"),
                                 "capability": race.get("capability")},
               "nothing_ran": nothing}
    with open(os.path.join(a.folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    head = (f"device {summary['device'] or 'n/a'} | torch {env.get('torch', 'n/a')} (CUDA {env.get('torch_cuda')}) "
            f"| triton {env.get('triton', 'n/a')} | transformers {env.get('transformers', 'n/a')} "
            f"| numpy {env.get('numpy', 'n/a')}")
    smi = env.get("nvidia_smi") if isinstance(env.get("nvidia_smi"), dict) else {}
    clocks = f"clocks SM {smi.get('clocks.sm', 'n/a')} / max {smi.get('clocks.max.sm', 'n/a')}, " \
             f"mem {smi.get('clocks.mem', 'n/a')} / max {smi.get('clocks.max.mem', 'n/a')}"
    ceilings = (f"ceilings: copy {fmt(ceil.get('copy_GBps'), 'GB/s')}, bf16 GEMM {fmt(ceil.get('gemm_TFLOPs'), 'TFLOP/s')}"
                if ceil else "ceilings: n/a")
    md = [f"# GPU validation{' (dry run)' if a.dry_run else ''}", "", head, "", clocks, "", ceilings, "",
          "| step | status | rc | s / limit |", "|---|---|---:|---:|"]
    md += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} / {s['limit']} |" for s in steps]
    md += ["", "| target | measured | target | met |", "|---|---:|---:|---|"]
    md += [f"| {t['target']} | {fmt(t['measured'], t['unit'])} | {t['better']} {t['target_value']} {t['unit']} | "
           f"{'n/a' if t['met'] is None else ('yes' if t['met'] else 'NO')} |" for t in tg]
    if summary["race"]:
        md += ["", f"attention race: wins {race.get('wins')}, suggested default for {race.get('capability')}: "
                   f"{race.get('suggested_default')}"]
    with open(os.path.join(a.folder, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    # the short table, last in the output (what a person sees first)
    print()
    print(head)
    print(clocks + " | " + ceilings)
    print(f"{'step':<20} {'status':<8} {'rc':>4} {'s/limit':>9}")
    for s in steps:
        print(f"{s['step']:<20} {s['status']:<8} {s['rc']:>4} {str(s['seconds']) + '/' + str(s['limit']):>9}")
    print(f"{'target':<62} {'measured':>12} {'target':>10}")
    for t in tg:
        print(f"{t['target'][:62]:<62} {fmt(t['measured'], t['unit']):>12} {t['better']}{t['target_value']:>7} {t['unit']}")
    where = os.path.dirname(a.folder) if os.path.basename(os.path.normpath(a.folder)) == "steps" else a.folder
    tail = f"{len(passed)} passed, {len(failed)} failed, {len(steps) - len(passed) - len(failed)} skipped/empty steps"
    if a.elapsed is not None:
        tail += f"; {a.elapsed} s of {a.budget} s"
    if nothing:
        print(f"gpu_validate: NOTHING RAN ({tail}); results in {where}")
        return 2
    print(f"gpu_validate: {tail}; results in {where}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
