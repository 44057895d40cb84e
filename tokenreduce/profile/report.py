"""Output of a profile sweep: a Rich table, JSON, CSV and a PNG plot (matplotlib, Agg)."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional

from rich.table import Table

from .runner import STAGES
from .sweep import FIDELITY_KEYS

__all__ = ["FIELDS", "fields", "table", "write_json", "write_csv", "plot", "primary_fidelity"]

BASE_FIELDS = (["method", "stage", "budget", "keep", "ratio", "image_tokens", "tokens_kept"]
               + [f"{s}_ms" for s in STAGES] + [f"{s}_iqr_ms" for s in STAGES]
               + ["speedup", "speedup_prefill", "reduction_share", "peak_mem_bytes", "kv_cache_bytes",
                  "flops_vision", "flops_llm_prefill", "flops_decode_per_token", "flops_total", "flops_ratio",
                  "speedup_of_flops", "within_noise"])
FIELDS = {kind: BASE_FIELDS + list(fk) + ["fidelity_real", "repeats", "error"] for kind, fk in FIDELITY_KEYS.items()}


def fields(report: Dict[str, Any]) -> List[str]:
    return FIELDS[report["kind"]]


def _rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    real = bool(report["fidelity_meaningful"])
    return [{**{k: None for k in fields(report)}, **r, "fidelity_real": real} for r in report["rows"]]


def write_json(report: Dict[str, Any], path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = dict(report)
    out["rows"] = _rows(report)
    out["fields"] = fields(report)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return path


def write_csv(report: Dict[str, Any], path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = fields(report)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in _rows(report):
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
    t = Table(title=f"tokenreduce profile: {report['model']} ({weights})\nbatch {report['batch']}, "
                    f"{report['device']} {report['dtype']}, {report['image_tokens']} image tokens, "
                    f"times: median (IQR) of {report['repeat']} calls after {report['warmup']} warm-up",
              title_justify="left")
    stage_cols = ["vision", "reduce"] + (["proj"] if vlm else [])
    cols = ["method", "stage", "budget", "kept", "total ms (IQR)"] + (stage_cols if wide else [])
    if vlm:
        cols += ["prefill", "dec/tok"]
    cols += ["speedup", "of FLOPs", "GFLOP"]
    if vlm:
        cols += ["KV MiB"]
    cols += ["peak MiB"]
    mark = "" if real else "†"
    fid_cols = (["KL", "tok1", "agree"] if vlm else ["CLS cos", "patch cos", "kept cos", "sal. r"])
    cols += [c + mark for c in fid_cols]
    for c in cols:
        t.add_column(c, justify="left" if c in ("method", "stage", "budget") else "right",
                     no_wrap=c in ("method", "budget", "total ms (IQR)"), overflow="fold",
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
            sp_cell = f"[dim]{sp:.2f}x ~[/]"      # inside the measured spread: neither faster nor slower
        else:
            sp_cell = f"[bold]{sp:.2f}x[/]"
        of = r.get("speedup_of_flops")
        cells += [sp_cell, "-" if of is None or r["method"] == "baseline" else f"{of:.2f}", _g(r.get("flops_total"))]
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
             "speedup = baseline total / total (~: within noise, the difference is inside the IQR of either run); "
             "of FLOPs = speedup / the FLOPs ratio" + (" of the LLM prefill" if vlm else "") + " (1 = every FLOP saved became time); "
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


def plot(report: Dict[str, Any], path: str) -> str:
    """PNG: total time and the primary fidelity against tokens kept, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fkey = primary_fidelity(report)
    rows = [r for r in report["rows"] if not r.get("error")]
    base = next((r for r in rows if r["method"] == "baseline"), None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["tokens_kept"])
        x = [r["tokens_kept"] for r in rs]
        a1.plot(x, [r["total_ms"] for r in rs], "o-", label=m)
        a2.plot(x, [r.get(fkey) for r in rs], "o-", label=m)
    if base is not None:
        a1.axhline(base["total_ms"], color="k", ls="--", lw=1, label="unreduced")
        if base.get(fkey) is not None:
            a2.axhline(base[fkey], color="k", ls="--", lw=1, label="unreduced")
    a1.set_xlabel("image tokens kept")
    a1.set_ylabel("total time per call (ms, median)")
    a2.set_xlabel("image tokens kept")
    a2.set_ylabel(fkey + ("" if report["fidelity_meaningful"] else " (random weights: meaningless)"))
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(f"tokenreduce profile: {report['model']} "
                 f"({'real' if report['fidelity_meaningful'] else 'RANDOM'} weights), {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
