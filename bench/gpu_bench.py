"""GPU benchmark of the ops (for a lent H100 / H200; issue 3's targets).

    python bench/gpu_bench.py [OUT_DIR]          # full run on the current CUDA device
    python bench/gpu_bench.py OUT_DIR --quick    # the quick shapes (B=1 and 64) first
    python bench/gpu_bench.py --ops kcenter      # one op
    python bench/gpu_bench.py --dry-run          # tiny shapes on the CPU: checks the script

For every case it times, with CUDA events, warm-up and rotating inputs (so no input stays
in L2), the median and the 10-90 % spread of: tokenreduce's op; the PyTorch reference
(tokenreduce.reference); and what a user would otherwise run (SDPA flash forward + an
eager pass for the scores; ToMe's merge code; DivPrune's loop; scatter_reduce; CDPruner's loop
and a batched fast greedy DPP; TokenPacker's windows as SDPA). In the
same run it measures the ceilings (device-to-device copy bandwidth, a bf16 GEMM), reports
achieved GB/s or TFLOP/s, checks the issue-3 targets, and writes
OUT_DIR/<device>-<date>.json (default bench/results) and a Markdown table beside it. One failing case is
recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tokenreduce import ops, reference  # noqa: E402
from tokenreduce.bench import peers  # noqa: E402

# ------------------------------------------------------------------------------ timing


def _sync(dev: str):
    if dev == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[int], object], dev: str, warmup: int, reps: int, max_s: float = 2.0) -> Dict:
    """Median / spread of fn(i) (i selects a rotating input). CUDA events on the GPU."""
    for i in range(warmup):
        fn(i)
    _sync(dev)
    times = []
    t_start = time.perf_counter()
    for i in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)  # us
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e6)
        if time.perf_counter() - t_start > max_s and len(times) >= 3:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_us": statistics.median(times), "p10_us": q(0.1), "p90_us": q(0.9), "n": len(times)}


def ceilings(dev: str, dry: bool) -> Dict:
    """Copy bandwidth (GB/s, read + write) and bf16 GEMM throughput (TFLOP/s)."""
    out = {}
    n = (1 << 16) if dry else (1 << 28)  # 512 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), dev, 3, 20)
    out["copy_GBps"] = 2 * src.numel() * 2 / (t["median_us"] * 1e-6) / 1e9
    m = 256 if dry else 8192
    dt = torch.float32 if dev == "cpu" else torch.bfloat16
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    t = time_fn(lambda i: a @ b, dev, 3, 20)
    out["gemm_TFLOPs"] = 2 * m**3 / (t["median_us"] * 1e-6) / 1e12
    return out


# ------------------------------------------------------------------------------ what users run


def sdpa_flash(q, k, v):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_plus_eager_scores(q, k, v, rows=None):
    """Today's workaround: flash attention for the output, then an eager pass for scores."""
    out = sdpa_flash(q, k, v)
    qq = q if rows is None else q[:, :, rows]
    p = (qq @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).float().softmax(-1)
    return out, p.mean(dim=(1, 2))


def tome_merge(x, r, size, metric):
    """facebookresearch/ToMe: bipartite_soft_matching (class token) + merge_wavg."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t, mode):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    s = size[..., None]
    xm = merge(x * s, "sum")
    sm = merge(s, "sum")
    return xm / sm, sm


def divprune_loop(x, k):
    """DivPrune's published loop (batch 1): cosine matrix, Python loop over picks."""
    return reference.kcenter(x, k, first="isolated")


# ------------------------------------------------------------------------------ cases


def shapes(dry: bool, quick: bool) -> Dict[str, List[Dict]]:
    if dry:
        return {
            "attention_with_scores": [dict(B=2, H=2, N=17, Dh=8)],
            "kcenter": [dict(B=1, N=40, D=16, k=8), dict(B=2, N=40, D=16, k=8)],
            "bipartite_merge": [dict(B=2, N=33, D=16, Dm=8, r=8)],
            "recycle": [dict(B=2, N=40, D=16, T=8, S=24)],
            "dpp_select": [dict(B=2, N=40, D=16, k=8)],
            "region_attention": [dict(B=2, G=4, s=2, L=1, C=32, H=2)],
        }
    Bs = [1, 64] if quick else [1, 16, 64]
    att = [dict(B=b, H=16, N=577, Dh=64) for b in Bs] + [dict(B=1, H=32, N=2880, Dh=128)]
    kc = [dict(B=b, N=576, D=1024, k=64) for b in Bs] + [dict(B=1, N=2880, D=4096, k=288)]
    if not quick:
        kc.append(dict(B=1, N=9000, D=4096, k=1024))
    bm = [dict(B=b, N=577, D=1024, Dm=64, r=64) for b in Bs]
    rc = [dict(B=b, N=576, D=4096, T=64, S=512) for b in Bs]
    dpp = [dict(B=b, N=576, D=1024, k=64) for b in Bs]                  # CDPruner on LLaVA-1.5
    ra = [dict(B=b, G=12, s=2, L=1, C=1024, H=8) for b in Bs]            # TokenPacker 576 -> 144
    return {"attention_with_scores": att, "kcenter": kc, "bipartite_merge": bm, "recycle": rc,
            "dpp_select": dpp, "region_attention": ra}


def _inputs(make, n=3):
    return [make() for _ in range(n)]  # rotating inputs


def case_impls(op: str, s: Dict, dev: str, dtype) -> Dict:
    """impl name -> (fn(i), bytes moved, flops); 'tokenreduce' first."""
    g = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
    impls = {}
    if op == "attention_with_scores":
        B, H, N, Dh = s["B"], s["H"], s["N"], s["Dh"]
        qkv = _inputs(lambda: (g(B, H, N, Dh), g(B, H, N, Dh), g(B, H, N, Dh)))
        fl = 4 * B * H * N * N * Dh
        by = 4 * B * H * N * Dh * dtype.itemsize
        cls = torch.tensor([0], device=dev)
        impls["tokenreduce"] = (lambda i: ops.attention_with_scores(*qkv[i % 3]), by, fl)
        impls["tokenreduce [CLS] row"] = (lambda i: ops.attention_with_scores(*qkv[i % 3], score_rows=cls), by, fl)
        impls["sdpa flash (no scores)"] = (lambda i: sdpa_flash(*qkv[i % 3]), by, fl)
        impls["sdpa + eager scores"] = (lambda i: sdpa_plus_eager_scores(*qkv[i % 3]), by, fl)
        impls["sdpa + eager [CLS] scores"] = (lambda i: sdpa_plus_eager_scores(*qkv[i % 3], rows=[0]), by, fl)
        impls["reference"] = (lambda i: reference.attention_with_scores(*qkv[i % 3]), by, fl)
    elif op == "kcenter":
        B, N, D, k = s["B"], s["N"], s["D"], s["k"]
        xs = _inputs(lambda: g(B, N, D))
        by = B * N * D * dtype.itemsize
        fl = 2 * B * N * N * D
        impls["tokenreduce"] = (lambda i: ops.kcenter(xs[i % 3], k, first="isolated"), by, fl)
        impls["reference (DivPrune loop)"] = (lambda i: divprune_loop(xs[i % 3], k), by, fl)
    elif op == "bipartite_merge":
        # ToMe matches on the head-mean keys: metric [B, N, Dm] (Dm = head dim), merges x
        B, N, D, Dm, r = s["B"], s["N"], s["D"], s["Dm"], s["r"]
        xs = _inputs(lambda: (g(B, N, D), g(B, N, Dm)))
        size = torch.ones(B, N, device=dev, dtype=dtype)
        by = (B * N * (D + Dm) + B * (N - r) * D) * dtype.itemsize
        fl = B * N * N * Dm
        impls["tokenreduce"] = (lambda i: ops.bipartite_merge(xs[i % 3][0], r, metric=xs[i % 3][1], size=size,
                                                              protect=1), by, fl)
        impls["ToMe merge code"] = (lambda i: tome_merge(xs[i % 3][0], r, size, xs[i % 3][1]), by, fl)
        impls["reference"] = (lambda i: reference.bipartite_merge(xs[i % 3][0], r, metric=xs[i % 3][1], size=size,
                                                                  protect=1), by, fl)
    elif op == "recycle":
        B, N, D, T, S = s["B"], s["N"], s["D"], s["T"], s["S"]
        xs = _inputs(lambda: g(B, N, D))
        perm = torch.stack([torch.randperm(N, device=dev) for _ in range(B)])
        target, source = perm[:, :T].contiguous(), perm[:, T:T + S].contiguous()
        by = (B * (T + S) * D + B * T * D) * dtype.itemsize
        fl = 2 * B * S * T * D
        impls["tokenreduce"] = (lambda i: ops.recycle(xs[i % 3], target, source), by, fl)
        impls["reference (scatter_reduce)"] = (lambda i: reference.recycle(xs[i % 3], target, source), by, fl)
    elif op == "dpp_select":
        B, N, D, k = s["B"], s["N"], s["D"], s["k"]
        xs = _inputs(lambda: (g(B, N, D), torch.rand(B, N, device=dev) + 1e-6))
        by = B * N * D * dtype.itemsize + B * N * 4
        fl = 2 * B * N * N * D + 2 * B * k * k * N
        impls["tokenreduce"] = (lambda i: ops.dpp_select(xs[i % 3][0], k, relevance=xs[i % 3][1]), by, fl)
        impls["CDPruner authors' loop"] = (lambda i: peers.cdpruner_loop(*xs[i % 3], k), by, fl)
        impls["fast greedy DPP"] = (lambda i: peers.dpp_fast_greedy(*xs[i % 3], k), by, fl)
    elif op == "region_attention":
        B, G, rs, L, C, H = s["B"], s["G"], s["s"], s["L"], s["C"], s["H"]
        M, N = G * G, G * G * rs * rs
        xs = _inputs(lambda: (g(B, M, C), g(B, L, N, C), g(B, L, N, C)))
        by = (2 * B * M * C + 2 * B * L * N * C) * dtype.itemsize
        fl = 4 * B * M * L * rs * rs * C
        impls["tokenreduce"] = (lambda i: ops.region_attention(*xs[i % 3], (G, G), region=rs, heads=H), by, fl)
        impls["windows + SDPA"] = (lambda i: peers.windowed_sdpa(*xs[i % 3], (G, G), rs, H), by, fl)
        impls["reference"] = (lambda i: reference.region_attention(*xs[i % 3], (G, G), region=rs, heads=H), by, fl)
    return impls


USER_BASELINE = {"attention_with_scores": "sdpa + eager scores", "kcenter": "reference (DivPrune loop)",
                 "bipartite_merge": "ToMe merge code", "recycle": "reference (scatter_reduce)",
                 "dpp_select": "CDPruner authors' loop", "region_attention": "windows + SDPA"}
REFERENCE = {"attention_with_scores": "reference", "kcenter": "reference (DivPrune loop)",
             "bipartite_merge": "reference", "recycle": "reference (scatter_reduce)",
             "dpp_select": "CDPruner authors' loop", "region_attention": "reference"}


def check_targets(rows: List[Dict], ceil: Dict) -> List[Dict]:
    """Issue 3's targets, from the measured rows."""
    def find(op, impl, **shape):
        for r in rows:
            if r["op"] == op and r["impl"] == impl and all(r["shape"].get(k) == v for k, v in shape.items()):
                return r if r.get("median_us") is not None else None
        return None

    out = []

    def add(name, value, limit, unit):
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "met": None if value is None else bool(value <= limit)})

    r = find("kcenter", "tokenreduce", B=1, N=576, D=1024, k=64)
    add("kcenter N=576 D=1024 k=64 B=1", r and r["median_us"], 70.0, "us")
    r = find("attention_with_scores", "tokenreduce", B=64, N=577)
    f = find("attention_with_scores", "sdpa flash (no scores)", B=64, N=577)
    add("attention ViT-L/336 B=64 / SDPA flash", r and f and r["median_us"] / f["median_us"], 1.2, "x")
    r = find("attention_with_scores", "tokenreduce [CLS] row", B=1, N=577)
    add("[CLS]-row scores B=1", r and r["median_us"], 5.0, "us")
    bw = ceil.get("copy_GBps")
    for op in ("bipartite_merge", "recycle"):
        r = find(op, "tokenreduce", B=64)
        ratio = None
        if r and bw:
            ratio = r["median_us"] / (r["bytes"] / (bw * 1e9) * 1e6)
        add(f"{op} B=64 / one read+write at copy bandwidth", ratio, 3.0, "x")
    return out


def env(dev: str) -> Dict:
    e = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
         "date": _dt.datetime.now().isoformat(timespec="seconds"), "device": "cpu", "driver": None}
    if dev == "cuda":
        e["device"] = torch.cuda.get_device_name()
        try:
            e["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            pass
    else:
        e["device"] = platform.processor() or platform.machine()
    try:
        from tokenreduce.nvrtc import backend_info

        e["backends"] = backend_info()
    except Exception:
        pass
    return e


def run(args) -> Dict:
    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device (use --dry-run to check the script on the CPU)")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    warmup, reps = (1, 3) if args.dry_run else (args.warmup, args.reps)
    report = {"env": env(dev), "dtype": str(dtype).replace("torch.", ""), "results": []}
    try:
        report["ceilings"] = ceilings(dev, args.dry_run)
    except Exception as e:  # keep going without ceilings
        report["ceilings"] = {"error": repr(e)}
    for op, cases in shapes(args.dry_run, args.quick).items():
        if args.ops and op not in args.ops:
            continue
        for s in cases:
            try:
                impls = case_impls(op, s, dev, dtype)
            except Exception as e:
                report["results"].append({"op": op, "shape": s, "impl": "setup", "error": repr(e)})
                continue
            rows = {}
            for name, (fn, by, fl) in impls.items():
                row = {"op": op, "shape": s, "impl": name, "bytes": by, "flops": fl}
                try:
                    with torch.no_grad():
                        row.update(time_fn(fn, dev, warmup, reps, max_s=args.max_seconds))
                    t = row["median_us"] * 1e-6
                    row["GBps"] = by / t / 1e9
                    row["TFLOPs"] = fl / t / 1e12
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    if args.verbose:
                        traceback.print_exc()
                rows[name] = row
                if dev == "cuda":
                    torch.cuda.empty_cache()
            ours = rows.get("tokenreduce", {}).get("median_us")
            for name, row in rows.items():
                user = USER_BASELINE[op]
                if "[CLS]" in name and "sdpa + eager [CLS] scores" in rows:
                    user = "sdpa + eager [CLS] scores"  # like for like: one scored row
                for key, base in (("speedup_vs_reference", REFERENCE[op]), ("speedup_vs_user", user)):
                    b = rows.get(base, {}).get("median_us")
                    m = row.get("median_us")
                    row[key] = (b / m) if (b and m) else None
                if ours and row.get("median_us"):
                    row["relative_to_tokenreduce"] = row["median_us"] / ours
                report["results"].append(row)
                print(_line(row), flush=True)
    report["targets"] = check_targets(report["results"], report.get("ceilings", {}))
    return report


def _line(r: Dict) -> str:
    sh = ",".join(f"{k}={v}" for k, v in r["shape"].items())
    if r.get("error"):
        return f"{r['op']:<22} {sh:<32} {r['impl']:<28} ERROR {r['error'][:80]}"
    return (f"{r['op']:<22} {sh:<32} {r['impl']:<28} {r['median_us']:>10.1f} us "
            f"[{r['p10_us']:.1f}, {r['p90_us']:.1f}] {r['GBps']:>8.1f} GB/s {r['TFLOPs']:>7.2f} TFLOP/s")


def markdown(report: Dict) -> str:
    e = report["env"]
    lines = [f"# tokenreduce GPU bench: {e['device']} ({e['date']})", "",
             f"torch {e['torch']}, CUDA {e['cuda']}, driver {e['driver']}, dtype {report['dtype']}; "
             f"ceilings: {json.dumps(report.get('ceilings'))}", "",
             "| op | shape | impl | median us | p10-p90 us | GB/s | TFLOP/s | vs reference | vs user path |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f="{:.2f}": "" if v is None else f.format(v)  # noqa: E731
    for r in report["results"]:
        sh = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r.get("error"):
            lines.append(f"| {r['op']} | {sh} | {r['impl']} | error: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['op']} | {sh} | {r['impl']} | {r['median_us']:.1f} | {r['p10_us']:.1f}-{r['p90_us']:.1f} "
                     f"| {r['GBps']:.1f} | {r['TFLOPs']:.2f} | {fmt(r.get('speedup_vs_reference'))}x "
                     f"| {fmt(r.get('speedup_vs_user'))}x |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {fmt(t['value'])} {t['unit']} | {t['limit']} {t['unit']} | "
                     f"{'n/a' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    return "\n".join(lines) + "\n"


def write(report: Dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    dev = re.sub(r"[^A-Za-z0-9]+", "-", report["env"]["device"]).strip("-").lower() or "device"
    stem = os.path.join(out_dir, f"{dev}-{_dt.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    return stem + ".json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (B=1 and 64 only, no N=9000)")
    p.add_argument("--ops", nargs="+", choices=list(USER_BASELINE), help="only these ops")
    p.add_argument("--reps", type=int, default=30, help="timed calls per implementation (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--max-seconds", type=float, default=2.0, help="stop timing an impl after this (>= 3 calls)")
    p.add_argument("out_dir", nargs="?", default=None, help="output folder (default bench/results)")
    p.add_argument("--out", default=None, help="output folder (same as OUT_DIR)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    path = write(report, args.out_dir or args.out or os.path.join(HERE, "results"))
    for t in report["targets"]:
        print(f"target {t['target']}: {t['value']} {t['unit']} (limit {t['limit']}): "
              f"{'n/a' if t['met'] is None else ('met' if t['met'] else 'MISSED')}")
    print(f"results: {path} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
