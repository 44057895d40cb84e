"""Race the attention_with_scores backends on a GPU: native CUDA op vs Triton, with SDPA as the bar.

    python bench/race_attention.py [OUT_DIR]          all shapes, writes
                                                      OUT_DIR/race-attention-<device>.json and .md
                                                      (default OUT_DIR: bench/results)
    python bench/race_attention.py --sweep            also tries a few Triton block configs
    python bench/race_attention.py --shapes vit       only the ViT-L/336 shapes
    python bench/race_attention.py --dry-run          tiny shapes on the CPU (Triton interpreter)
                                                      to test this script's logic

Contenders, all bf16: ``native`` (`ops.attention_with_scores(backend="native")`: the compiled CUDA
kernel or its NVRTC fallback), ``triton`` (`tokenreduce.triton.attention_with_scores`). References,
not contenders (they return no scores): ``sdpa_fwd`` (torch SDPA, flash backend, forward only:
the 1.2x target of KERNELS.md) and ``triton_fwd`` (the Triton flash forward alone, to split the
score pass's cost). Timing: `triton.testing.do_bench` median (25 ms warm-up, 100 ms of reps),
inputs rotated over enough copies to exceed L2. Each contender is first checked against the
plain-PyTorch reference (or against the other contender when the reference would not fit).
The winner per shape is the faster contender; ``suggested_default`` is the backend with more wins
(ties: native) for `tokenreduce.backends.DEFAULTS` at this device's compute capability.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

# name, B, N, H, Hkv, Dh, causal, scores ("full" | "cls" = [0] | "last" = [-1])
GPU_SHAPES = [
    ("vit336", 1, 577, 16, 16, 64, False, "full"),
    ("vit336", 1, 577, 16, 16, 64, False, "cls"),
    ("vit336", 16, 577, 16, 16, 64, False, "full"),
    ("vit336", 16, 577, 16, 16, 64, False, "cls"),
    ("vit336", 64, 577, 16, 16, 64, False, "full"),
    ("vit336", 64, 577, 16, 16, 64, False, "cls"),
    ("llava_next", 1, 2880, 32, 32, 128, True, "last"),
    ("long", 1, 9000, 32, 32, 128, True, "last"),
]
DRY_SHAPES = [
    ("vit336", 2, 17, 2, 2, 16, False, "full"),
    ("vit336", 2, 17, 2, 2, 16, False, "cls"),
    ("llava_next", 1, 40, 4, 2, 32, True, "last"),
]
SWEEP = [  # Triton block configs tried with --sweep (the default config is always timed)
    dict(BLOCK_M=64, BLOCK_N=64, fwd_warps=4, fwd_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, fwd_warps=8, fwd_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, fwd_warps=8, fwd_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, fwd_warps=8, fwd_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, fwd_warps=4, fwd_stages=4),
    dict(SCORE_BLOCK_N=128, score_warps=8, score_stages=2),
    dict(SCORE_BLOCK_N=32, score_warps=4, score_stages=3),
    dict(BLOCK_R=32, SCORE_BLOCK_N=64, score_warps=4, score_stages=2),
    dict(BLOCK_R=16, SCORE_BLOCK_N=128, score_warps=4, score_stages=2),
]
L2_BYTES = 50 * 2**20  # H100 50 MB, A100 40 MB: rotate enough copies to exceed it


def _rows(kind: str, N: int):
    import torch

    return None if kind == "full" else torch.tensor([0] if kind == "cls" else [-1])


def _cpu_bench(fn: Callable, reps: int = 1) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def race_shape(shape, *, device, dry_run: bool, sweep: bool, bench: Callable) -> dict:
    import torch
    import torch.nn.functional as F

    from tokenreduce import ops, reference
    from tokenreduce.triton import attention_with_scores as tri
    from tokenreduce.triton import flash_forward

    name, B, N, H, Hkv, Dh, causal, kind = shape
    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    per_set = 2 * (B * H * N * Dh + 2 * B * Hkv * N * Dh)
    n_sets = 1 if dry_run else max(2, min(8, math.ceil(2 * L2_BYTES / per_set)))
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, H, N, Dh, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(B, Hkv, N, Dh, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, Hkv, N, Dh, generator=g).to(device=device, dtype=dtype)
        sets.append((q, k, v))
    rows = _rows(kind, N)
    rows = None if rows is None else rows.to(device)
    it = [0]

    def rotating(fn):
        def run():
            it[0] = (it[0] + 1) % n_sets
            return fn(*sets[it[0]])
        return run

    contenders: Dict[str, Callable] = {
        "native": lambda q, k, v: ops.attention_with_scores(q, k, v, causal=causal, score_rows=rows, backend="native"),
        "triton": lambda q, k, v: tri(q, k, v, causal=causal, score_rows=rows),
    }
    extras: Dict[str, Callable] = {"triton_fwd": lambda q, k, v: flash_forward(q, k, v, causal=causal)}
    if not dry_run:
        def sdpa(q, k, v):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H)
        extras["sdpa_fwd"] = sdpa

    row = dict(shape=name, B=B, N=N, H=H, Hkv=Hkv, Dh=Dh, causal=causal, scores=kind, dtype="bfloat16",
               ms={}, unavailable={}, max_abs_err_out={}, max_abs_err_scores=0.0)
    # correctness first: against the reference (of the scored row when the full one would
    # not fit), else triton vs native
    q, k, v = sets[0]
    ref, sl = None, slice(None)
    ref_limit = 5000 if dry_run else 2**31  # [B, H, N, N] elements the reference may build
    if B * H * N * N <= ref_limit:
        ref = reference.attention_with_scores(q, k, v, causal=causal, score_rows=rows)
    elif kind == "last" or (kind == "cls" and not causal):
        # the scored row alone (bottom-right causal: the last row sees every key, as in the full op)
        sl = slice(N - 1, N) if kind == "last" else slice(0, 1)
        ref = reference.attention_with_scores(q[:, :, sl], k, v, causal=causal)
    results = {}
    for cname, fn in contenders.items():
        try:
            results[cname] = fn(q, k, v)
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception as e:  # e.g. no CUDA kernel registered yet
            row["unavailable"][cname] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    base = ref if ref is not None else results.get("native")
    for cname, (out, scores) in results.items():
        if base is None or (ref is None and cname == "native"):
            continue
        if ref is not None:
            out = out[:, :, sl]
        row["max_abs_err_out"][cname] = (out.float() - base[0].float()).abs().max().item()
        err = (scores - base[1]).abs().max().item()
        row["max_abs_err_scores"] = max(row["max_abs_err_scores"], err)
    row["checked_against"] = ("reference" if ref is not None and sl == slice(None) else
                              "reference of the scored row" if ref is not None else
                              "native" if "native" in results else "none")
    del ref, base, results

    for cname, fn in {**{c: f for c, f in contenders.items() if c not in row["unavailable"]}, **extras}.items():
        try:
            row["ms"][cname] = bench(rotating(fn))
        except Exception as e:
            row["unavailable"][cname] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if sweep and "triton" in row["ms"]:
        tried = []
        for cfg in SWEEP:
            try:
                ms = bench(rotating(lambda q, k, v, cfg=cfg: tri(q, k, v, causal=causal, score_rows=rows, config=cfg)))
                tried.append(dict(config=cfg, ms=ms))
            except Exception as e:
                tried.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
        row["triton_sweep"] = tried
        timed = [t for t in tried if "ms" in t]
        if timed:
            row["triton_best_sweep_ms"] = min(t["ms"] for t in timed)
    timed = {c: row["ms"][c] for c in contenders if c in row["ms"]}
    row["winner"] = min(timed, key=timed.get) if timed else None
    if "sdpa_fwd" in row["ms"]:
        for c in timed:
            row[f"{c}_vs_sdpa_fwd"] = timed[c] / row["ms"]["sdpa_fwd"]
    return row


def markdown(report: dict) -> str:
    """The race as a Markdown table: per shape the median ms of each contender and reference."""
    names = sorted({c for r in report["rows"] for c in r["ms"]})
    lines = [f"# attention race: {report['device']} ({report['capability']}), torch {report['torch']}, "
             f"triton {report['triton']}", "",
             "| shape | B | N | H | Dh | causal | scores | " + " | ".join(f"{c} ms" for c in names)
             + " | winner | max err out |",
             "|---|---:|---:|---:|---:|---|---|" + "---:|" * len(names) + "---|---:|"]
    for r in report["rows"]:
        ms = " | ".join("" if c not in r["ms"] else f"{r['ms'][c]:.4f}" for c in names)
        err = max(r["max_abs_err_out"].values(), default=float("nan"))
        lines.append(f"| {r['shape']} | {r['B']} | {r['N']} | {r['H']} | {r['Dh']} | {r['causal']} | {r['scores']} "
                     f"| {ms} | {r['winner']} | {err:.2e} |")
    lines += ["", f"wins: {report['wins']}; suggested default: {report['suggested_default']}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU via the Triton interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time a few Triton block configs")
    ap.add_argument("--shapes", default="vit336,llava_next,long", help="comma list of shape names")
    ap.add_argument("out_dir", nargs="?", default=None, help="output folder (default bench/results)")
    ap.add_argument("--out", default=None, help="JSON path instead (default OUT_DIR/race-attention-<device>.json)")
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton
    from triton import knobs

    sys.path.insert(0, str(ROOT))
    if args.dry_run:
        if not knobs.runtime.interpret:
            raise SystemExit("race_attention: --dry-run needs TRITON_INTERPRET=1 before triton is imported")
        device, device_name, cap, bench = "cpu", "cpu-interpreter", None, _cpu_bench
        shapes = DRY_SHAPES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("race_attention: no CUDA device (use --dry-run to test the script on the CPU)")
        from triton.testing import do_bench

        device = "cuda"
        device_name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        cap = f"sm_{major}{minor}"

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

        shapes = GPU_SHAPES
    wanted = set(args.shapes.split(","))
    rows = []
    for shape in shapes:
        if shape[0] not in wanted:
            continue
        row = race_shape(shape, device=device, dry_run=args.dry_run, sweep=args.sweep, bench=bench)
        rows.append(row)
        ms = "  ".join(f"{c} {t:.4f} ms" for c, t in row["ms"].items())
        print(f"{row['shape']:>10} B={row['B']:<3} N={row['N']:<5} H={row['H']:<3} Dh={row['Dh']:<4} "
              f"scores={row['scores']:<4}  {ms}  -> winner: {row['winner']}"
              + (f"  (unavailable: {', '.join(row['unavailable'])})" if row["unavailable"] else ""), flush=True)
    wins = {"native": 0, "triton": 0}
    for row in rows:
        if row["winner"]:
            wins[row["winner"]] += 1
    report = dict(
        device=device_name, capability=cap, torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), dry_run=args.dry_run, rows=rows, wins=wins,
        suggested_default="triton" if wins["triton"] > wins["native"] else "native",
    )
    folder = Path(args.out_dir) if args.out_dir else ROOT / "bench" / "results"
    out = Path(args.out) if args.out else folder / f"race-attention-{_slug(device_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wins: {wins}; suggested default for {cap or device_name}: {report['suggested_default']}; wrote {out}")
    return report


if __name__ == "__main__":
    main()
