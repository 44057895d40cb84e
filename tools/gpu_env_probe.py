#!/usr/bin/env python3
"""Step "env" of tools/gpu_validate.sh: the GPU and software as found -> OUT.json, printed too.

    python tools/gpu_env_probe.py OUT.json

GPU name, clocks (current / max SM and memory, as nvidia-smi reports them: nothing is changed),
driver, memory; Python, torch (+ CUDA), triton, transformers, numpy, cupy, onnx, onnxruntime;
torch.cuda.is_available and the compute capability; nvcc, compute-sanitizer, CUDA_HOME. Exits 1
when torch sees no CUDA device (every later GPU step would only skip).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import subprocess
import sys

SMI_FIELDS = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
              "power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current")


def run(cmd, timeout=20) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout or p.stderr).strip()
    except Exception as e:  # missing tool, timeout
        return f"unavailable: {type(e).__name__}: {e}"


def version(mod: str):
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:
        return f"missing ({type(e).__name__})"


def main(argv) -> int:
    out = argv[1] if len(argv) > 1 else "env.json"
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "CUDA_HOME": os.environ.get("CUDA_HOME")}
    smi = run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    env["nvidia_smi"] = dict(zip(SMI_FIELDS.split(","), [s.strip() for s in smi.split(",")])) \
        if "," in smi else smi
    for mod in ("torch", "triton", "transformers", "numpy", "cupy", "onnx", "onnxruntime", "safetensors"):
        env[mod] = version(mod)
    ok = False
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        ok = torch.cuda.is_available()
        env["cuda_available"] = ok
        if ok:
            p = torch.cuda.get_device_properties(0)
            env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                       memory_GiB=round(p.total_memory / 2**30, 1))
    except Exception as e:
        env["torch_error"] = repr(e)
    env["nvcc"] = run(["nvcc", "--version"]).splitlines()[-1:] or None
    env["compute_sanitizer"] = shutil.which("compute-sanitizer")
    env["ninja"] = shutil.which("ninja")
    with open(out, "w") as f:
        json.dump(env, f, indent=2)
        f.write("\n")
    print(json.dumps(env, indent=2))
    if not ok:
        print("env: torch sees no CUDA device", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
