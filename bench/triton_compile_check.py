"""Compile the Triton attention kernels to cubin for given GPU architectures, without a GPU.

    python bench/triton_compile_check.py                 sm_80 and sm_90, the race shapes, bf16
    python bench/triton_compile_check.py --arch 90 --dtypes bfloat16,float16,float32

The interpreter tests run the kernels' logic on the CPU but never compile them; this catches
compile errors and shared-memory overflows (printed per kernel) of the default launch configs
(`tokenreduce.triton.attention_with_scores._default_config`) before GPU time is spent. It uses
triton's bundled ptxas; it takes tens of seconds per kernel variant on a loaded CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _signature(kernel, pointers, constexprs, floats):
    return {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
            for n in kernel.arg_names}


def _registers(cubin: bytes) -> str:
    """', N regs, S B stack' from the bundled cuobjdump (stack > 0 means register spills)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return f", {m.group(1)} regs, {m.group(2)} B stack" if m else ""


def main(argv=None) -> int:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from race_attention import GPU_SHAPES
    from tokenreduce.triton import attention_with_scores as mod_fn

    mod = sys.modules[mod_fn.__module__]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--dtypes", default="bfloat16")
    args = ap.parse_args(argv)
    failures = 0
    seen = set()
    for cap in (int(a) for a in args.arch.split(",")):
        target = GPUTarget("cuda", cap, 32)
        for dtype_name in args.dtypes.split(","):
            ty = _TY[dtype_name]
            dtype = getattr(torch, dtype_name)
            for name, B, N, H, Hkv, Dh, causal, kind in GPU_SHAPES:
                R = N if kind == "full" else 1
                cfg = mod._default_config(torch.empty(0, dtype=dtype), N, N, Dh, Dh, R, False)
                bd = max(16, triton.next_power_of_2(Dh))
                fwd = dict(GROUP=H // Hkv, CAUSAL=causal, HAS_BIAS=False, DOT_FP32=False,
                           IEEE=dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                           BLOCK_D=bd, BLOCK_DV=bd)
                sc = dict(GROUP=H // Hkv, CAUSAL=causal, HAS_BIAS=False, ROWS_ARANGE=kind == "full",
                          DOT_FP32=False, IEEE=dtype == torch.float32, BLOCK_R=cfg["BLOCK_R"],
                          BLOCK_N=cfg["SCORE_BLOCK_N"], BLOCK_D=bd)
                jobs = [
                    ("flash_fwd", mod._flash_fwd, fwd,
                     dict(Q="*" + ty, K="*" + ty, V="*" + ty, Bias="*fp32", O="*" + ty, LSE="*fp32"),
                     dict(num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])),
                    ("column_scores", mod._column_scores, sc,
                     dict(Q="*" + ty, K="*" + ty, Bias="*fp32", LSE="*fp32", Rows="*i64", Part="*fp32"),
                     dict(num_warps=cfg["score_warps"], num_stages=cfg["score_stages"])),
                ]
                for kname, kernel, constexprs, pointers, options in jobs:
                    key = (cap, ty, kname, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    t = time.perf_counter()
                    src = ASTSource(kernel, _signature(kernel, pointers, constexprs, ("qk_scale", "row_weight")),
                                    constexprs)
                    try:
                        compiled = triton.compile(src, target=target, options=options)
                        smem = compiled.metadata.shared
                        ok = smem <= SMEM_LIMIT.get(cap, 99 * 1024)
                        failures += not ok
                        status = f"ok, {smem} B shared" if ok else f"SHARED MEMORY {smem} B over the sm_{cap} limit"
                        status += _registers(compiled.asm["cubin"])
                    except Exception as e:
                        failures += 1
                        status = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
                    print(f"sm_{cap} {dtype_name:<8} {name:<10} Dh={Dh:<3} causal={causal!s:<5} {kind:<4} "
                          f"{kname:<13} {options} {status} ({time.perf_counter() - t:.0f} s)", flush=True)
    print("all compiled" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
