#!/usr/bin/env python3
"""Compile every NVRTC device source with the real NVRTC library (no GPU, no torch, no CuPy).

    python3 tools/nvrtc_check.py [--lib /path/to/libnvrtc.so] [--arch 80 90]

Loads libnvrtc through ctypes (NVRTC_LIB, --lib, or the usual places: the CUDA toolkit,
pip's nvidia-cuda-nvrtc wheel), inlines the local includes exactly as tokenreduce.nvrtc
does, adds every name expression of tokenreduce/nvrtc/_names.py, compiles for each arch
and checks that every expression has a lowered (mangled) name. Exit 0 = all compile,
1 = a compile error, 77 = no libnvrtc found (the caller may treat that as "skipped").
"""
import argparse
import ctypes
import glob
import os
import re
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def find_lib(explicit):
    cands = [explicit, os.environ.get("NVRTC_LIB")]
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            cands += sorted(glob.glob(os.path.join(base, "lib64", "libnvrtc.so*")))
    for p in sys.path:
        cands += sorted(glob.glob(os.path.join(p, "nvidia", "cu*", "lib", "libnvrtc.so*")))
        cands += sorted(glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    for c in cands:
        if c and os.path.isfile(c) and "alt" not in os.path.basename(c) and "builtins" not in c:
            return c
    return None


def load_source(rel):
    seen = set()

    def expand(path):
        path = os.path.normpath(path)
        if path in seen:
            return ""
        seen.add(path)
        text = open(path, encoding="utf-8").read()
        return INCLUDE.sub(lambda m: expand(os.path.join(os.path.dirname(path), m.group(1))), text)

    return expand(os.path.join(CSRC, rel))


def compile_one(lib, rel, names, arch, include_dirs):
    prog = ctypes.c_void_p()
    src = load_source(rel).encode()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src, rel.encode(), 0, None, None)
    assert r == 0, f"nvrtcCreateProgram: {r}"
    for n in names:
        assert lib.nvrtcAddNameExpression(prog, n.encode()) == 0, n
    opts = [b"-std=c++17", f"--gpu-architecture=compute_{arch}".encode()] + [b"-I" + d.encode() for d in include_dirs]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    res = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    missing = []
    if res == 0:
        for n in names:
            low = ctypes.c_char_p()
            if lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(low)) != 0 or not low.value:
                missing.append(n)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return res, log.value.decode(errors="replace").strip(), missing


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib")
    ap.add_argument("--arch", nargs="+", default=["80", "90"])
    args = ap.parse_args(argv)
    path = find_lib(args.lib)
    if not path:
        print("nvrtc_check: no libnvrtc found (set NVRTC_LIB); skipped")
        return 77
    for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
        if ".alt." not in b:  # NVRTC dlopens its builtins by name: preload them globally
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            break
    lib = ctypes.CDLL(path)
    ver = (ctypes.c_int(), ctypes.c_int())
    lib.nvrtcVersion(ctypes.byref(ver[0]), ctypes.byref(ver[1]))
    print(f"nvrtc_check: {path} (NVRTC {ver[0].value}.{ver[1].value})")
    names = runpy.run_path(os.path.join(ROOT, "tokenreduce", "nvrtc", "_names.py"))["NAME_EXPRESSIONS"]
    inc = [d for d in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),) if os.path.isdir(d)]
    rels = sorted(os.path.relpath(p, CSRC) for p in glob.glob(os.path.join(CSRC, "*", "*_kernels.cuh")))
    failed = False
    for rel in rels:
        for arch in args.arch:
            res, log, missing = compile_one(lib, rel, names.get(rel, []), arch, inc)
            if res != 0 or missing:
                failed = True
                print(f"FAIL nvrtc {rel} compute_{arch}: result {res}, unresolved names {missing}\n{log}")
            else:
                warn = f" (log: {log[:200]})" if log else ""
                print(f"ok   nvrtc {rel} compute_{arch}: {len(names.get(rel, []))} kernels{warn}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
