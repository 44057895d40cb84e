"""Output of a profile sweep: a Rich table, JSON, CSV and a PNG plot (matplotlib, Agg).

A report is one sweep's dict (`sweep.run`) or the main job's ``{"main_job": True, "parts":
[report, ...]}`` (`main_job.run`): the writers and the plot take either; `parts` lists them.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional

from rich.table import Table

from .runner import STAGES
from .sweep import FIDELITY_KEYS

__all__ = ["FIELDS", "fields", "parts", "table", "write_json", "write_csv", "plot", "primary_fidelity",
           "speedup_range", "pareto_front"]

BASE_FIELDS = (["method", "stage", "budget", "keep", "ratio", "image_tokens", "tokens_kept"]
               + [f"{s}_ms" for s in STAGES] + [f"{s}_iqr_ms" for s in STAGES]
               + ["speedup", "speedup_prefill", "reduction_share", "peak_mem_bytes", "kv_cache_bytes",
                  "flops_vision", "flops_llm_prefill", "flops_decode_per_token", "flops_total", "flops_ratio",
                  "speedup_of_flops", "within_noise"])
FIELDS = {kind: BASE_FIELDS + list(fk) + ["fidelity_real", "repeats", "error"] for kind, fk in FIDELITY_KEYS.items()}


def parts(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The sweeps of a report: the main job's parts, or the report itself."""
    return list(report["parts"]) if report.get("main_job") else [report]


def fields(report: Dict[str, Any]) -> List[str]:
    """The row fields of one sweep; of the main job: ``model`` then every part's, in order."""
    if report.get("main_job"):
        cols = ["model"]
        for p in parts(report):
            cols += [c for c in FIELDS[p["kind"]] if c not in cols]
        return cols
    return FIELDS[report["kind"]]


def _rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    real = bool(report["fidelity_meaningful"])
    return [{**{k: None for k in fields(report)}, **r, "fidelity_real": real} for r in report["rows"]]


def write_json(report: Dict[str, Any], path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = dict(report)
    if report.get("main_job"):
        out["parts"] = [{**p, "rows": _rows(p), "fields": fields(p)} for p in parts(report)]
    else:
        out["rows"] = _rows(report)
        out["fields"] = fields(report)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return path


def write_csv(report: Dict[str, Any], path: str) -> str:
    """One line per configuration; the main job's parts one after the other, ``model`` first."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = fields(report)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for p in parts(report):
            for r in _rows(p):
                r = {"model": p["model"], **r}
                w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    return path


_STAGE = {"projector": "proj"}


def _ms(v: Optional[float], iqr: Optional[float] = None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} ({iqr:.1f})" if iqr is not None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _num(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _mib(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def _g(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def primary_fidelity(report: Dict[str, Any]) -> str:
    """The fidelity column plotted: DINOv2-S saliency r, else [CLS] cosine, VLM: KL."""
    if report["kind"] == "vlm":
        return "kl"
    return "saliency_corr" if any(r.get("saliency_corr") is not None for r in report["rows"]) else "pooled_cos"


def table(report: Dict[str, Any], wide: bool = False) -> Table:
    """The report as a Rich table; ``wide`` adds the per-stage times (vision, reduce, projector)."""
    real = bool(report["fidelity_meaningful"])
    vlm = report["kind"] == "vlm"
    weights = "real weights" if real else "RANDOM weights: fidelity columns are meaningless (latency, FLOPs, memory are faithful)"
    cut = f", LLM cut to {report['layers']} layers" if vlm and report.get("layers") else \
        f", {report['layers']} layers" if report.get("layers") else ""
    t = Table(title=f"tokenreduce profile: {report['model']} ({weights}{cut})\nbatch {report['batch']}, "
                    f"{report['device']} {report['dtype']}, {report['image_tokens']} image tokens, "
                    f"times: median (IQR) of {report['repeat']} calls after {report['warmup']} warm-up",
              title_justify="left")
    stage_cols = ["vision", "reduce"] + (["proj"] if vlm else [])
    cols = ["method", "stage", "budget", "kept", "total ms (IQR)"] + (stage_cols if wide else [])
    if vlm:
        cols += ["prefill", "dec/tok"]
    cols += ["speedup"] + (["prefill speedup"] if vlm else []) + ["of FLOPs", "GFLOP"]
    if vlm:
        cols += ["KV MiB"]
    cols += ["peak MiB"]
    mark = "" if real else "†"
    fid_cols = (["KL", "tok1", "agree"] if vlm else ["CLS cos", "patch cos", "kept cos", "sal. r"])
    cols += [c + mark for c in fid_cols]
    for c in cols:
        t.add_column(c, justify="left" if c in ("method", "stage", "budget") else "right",
                     no_wrap=c in ("method", "budget", "kept", "total ms (IQR)", "speedup"), overflow="fold",
                     min_width=max(len(w) for w in c.split()))   # headers wrap, never "prefi…"
    prev = None
    for r in report["rows"]:
        if prev is not None and r["method"] != prev:
            t.add_section()
        prev = r["method"]
        if r.get("error"):
            t.add_row(r["method"], _STAGE.get(r["stage"], r["stage"]), r["budget"], "[red]error[/]", *[""] * (len(cols) - 4))
            continue
        cells = [r["method"], _STAGE.get(r["stage"], r["stage"]), r["budget"], f"{r['tokens_kept']}/{r['image_tokens']}",
                 _ms(r["total_ms"], r["total_iqr_ms"])]
        if wide:
            cells += [_ms(r["vision_ms"]), _ms(r["reduction_ms"])] + ([_ms(r["projector_ms"])] if vlm else [])
        if vlm:
            cells += [_ms(r["prefill_ms"]), _ms(r["decode_per_token_ms"])]
        sp = r.get("speedup")
        if sp is None:
            sp_cell = "-"
        elif r["method"] == "baseline":
            sp_cell = "1.00x"
        elif r.get("within_noise"):
            sp_cell = f"[dim]{sp:.2f}x within noise[/]"   # inside the measured spread: neither faster nor slower
        else:
            sp_cell = f"[bold]{sp:.2f}x[/]"
        cells += [sp_cell]
        if vlm:
            spp = r.get("speedup_prefill")
            cells += ["-" if spp is None else "1.00x" if r["method"] == "baseline" else f"{spp:.2f}x"]
        of = r.get("speedup_of_flops")
        cells += ["-" if of is None or r["method"] == "baseline" else f"{of:.2f}", _g(r.get("flops_total"))]
        if vlm:
            cells += [_mib(r.get("kv_cache_bytes"))]
        cells += [_mib(r.get("peak_mem_bytes"))]
        style = "" if real else "[dim]"
        end = "" if real else "[/]"
        if vlm:
            fv = [_num(r.get("kl"), ".4f"), _num(r.get("first_token_agree"), ".2f"), _num(r.get("tokens_agree"), ".2f")]
        else:
            fv = [_num(r.get(k), ".3f") for k in ("pooled_cos", "patch_cos", "patch_cos_kept", "saliency_corr")]
        cells += [f"{style}{v}{end}" if v != "-" else v for v in fv]
        t.add_row(*cells)
    notes = ["times in ms per call; stage times exclude the reduction (its own timer: reduce); "
             "speedup = baseline total / total (within noise: the difference is inside the IQR of either run, "
             "neither a speedup nor a slowdown); "
             + ("prefill speedup: of the LLM prefill alone; of FLOPs = prefill speedup / the LLM-prefill FLOPs ratio"
                if vlm else "of FLOPs = speedup / the FLOPs ratio") + " (1 = every FLOP saved became time); "
             "GFLOPs: FastV's 4nd²+2n²d+2ndm per layer over the tokens each layer saw"
             + (" (encoder + LLM prefill)" if vlm else " (encoder blocks)"),
             "peak MiB: tensor memory one call allocates above what was allocated before it"]
    if vlm:
        notes.append("KL: KL(full || reduced) of next-token logits; tok1 / agree: greedy tokens equal to "
                     f"the unreduced run's (first / first {report.get('new_tokens')})")
    else:
        notes.append("cos: cosine with the unreduced run ([CLS]; patches un-merged to the full grid: all / kept); "
                     "saliency r: Pearson r of the saliency maps")
    for r in report["rows"]:
        if r.get("error"):
            notes.append(f"error: {r['method']} {r['budget']}: {r['error']}")
    if not real:
        notes.append("† random weights: fidelity numbers say nothing about quality")
    t.caption = "\n".join(notes)
    t.caption_justify = "left"
    return t


def speedup_range(row: Dict[str, Any], base: Dict[str, Any], stage: str = "total") -> Optional[tuple]:
    """(low, high) speedup of ``row``'s ``stage`` ("total", "prefill", ...) when each median
    moves by half its IQR against the baseline's: the error bar of the plot (None without times)."""
    t, bt = row.get(f"{stage}_ms"), base.get(f"{stage}_ms")
    if not t or not bt:
        return None
    i, bi = (row.get(f"{stage}_iqr_ms") or 0.0) / 2, (base.get(f"{stage}_iqr_ms") or 0.0) / 2
    return max(bt - bi, 0.0) / (t + i), (bt + bi) / max(t - i, 1e-9)


def pareto_front(points: List[tuple], higher_better: bool) -> List[tuple]:
    """The (speedup, fidelity) points no other point beats in both, by speedup."""
    better = (lambda a, b: a >= b) if higher_better else (lambda a, b: a <= b)
    front = [p for p in points if not any(q != p and q[0] >= p[0] and better(q[1], p[1]) for q in points)]
    return sorted(front)


def plot(report: Dict[str, Any], path: str) -> str:
    """PNG: fidelity against speedup (Pareto), one panel per model, one curve per method over
    its budgets; IQR error bars on the speedup, the baseline (1x) with its own spread shaded,
    the Pareto front dashed. The speedup is the whole call's for an encoder, the LLM prefill's
    for a VLM (its tower runs the same in every configuration of projector / LLM methods).
    A random-weight model says its fidelity is meaningless."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ps = parts(report)
    fig, axes = plt.subplots(1, len(ps), figsize=(6.2 * len(ps), 4.6), squeeze=False)
    for ax, rep in zip(axes[0], ps):
        fkey = primary_fidelity(rep)
        higher = fkey != "kl"
        stage = "prefill" if rep.get("kind") == "vlm" else "total"
        sp = "speedup_prefill" if stage == "prefill" else "speedup"
        rows = [{**r, "x": 1.0 if r["method"] == "baseline" else r.get(sp)} for r in rep["rows"] if not r.get("error")]
        rows = [r for r in rows if r["x"] is not None]
        base = next((r for r in rows if r["method"] == "baseline"), None)
        if base is not None and base.get(f"{stage}_ms"):
            band = (base.get(f"{stage}_iqr_ms") or 0.0) / base[f"{stage}_ms"]
            ax.axvspan(1 - band, 1 + band, color="0.85", lw=0, label="baseline spread (IQR)")
            ax.axvline(1.0, color="k", ls=":", lw=1)
            if base.get(fkey) is not None:
                ax.plot([1.0], [base[fkey]], "k*", ms=12, label="unreduced", zorder=5)
        points = [(1.0, base[fkey])] if base is not None and base.get(fkey) is not None else []
        for m in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]:
            rs = sorted((r for r in rows if r["method"] == m and r.get(fkey) is not None), key=lambda r: r["x"])
            if not rs:
                continue
            x = [r["x"] for r in rs]
            y = [r[fkey] for r in rs]
            err = None
            if base is not None:
                rng = [speedup_range(r, base, stage) or (r["x"], r["x"]) for r in rs]
                err = [[max(xi - lo, 0.0) for xi, (lo, _) in zip(x, rng)], [max(hi - xi, 0.0) for xi, (_, hi) in zip(x, rng)]]
            line = ax.errorbar(x, y, xerr=err, fmt="o-", capsize=3, label=m, zorder=4)
            for r, xi, yi in zip(rs, x, y):
                ax.annotate(r["budget"].replace("ratio=", "").replace("keep=", "k"), (xi, yi), fontsize=7,
                            xytext=(4, 3), textcoords="offset points", color=line[0].get_color())
            points += list(zip(x, y))
        front = pareto_front(points, higher)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="0.4", lw=1, label="Pareto front", zorder=3)
        real = bool(rep["fidelity_meaningful"])
        ylabel = {"saliency_corr": "saliency Pearson r (higher is better)", "pooled_cos": "[CLS] cosine (higher is better)",
                  "kl": "next-token KL (lower is better)"}.get(fkey, fkey)
        ax.set_ylabel(ylabel + ("" if real else "\nRANDOM weights: meaningless"))
        ax.set_xlabel(("speedup of the LLM prefill" if stage == "prefill" else "speedup of the whole call")
                      + " (median; bars: IQR)")
        cut = f", LLM {rep['layers']} layers" if rep.get("kind") == "vlm" and rep.get("layers") else ""
        ax.set_title(f"{rep['model']} ({'real' if real else 'RANDOM'} weights{cut}), {rep['device']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("tokenreduce profile: fidelity vs speedup per method and budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
