#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU, no torch needed).
#
#   tools/cuda_compile_check.sh [-j JOBS] [--arch "80 90"] [--out DIR]
#
# 1. Compiles every csrc/*/*.cu (torch-free launchers + kernels) with nvcc for each arch
#    (default sm_80 and sm_90) with -Xptxas -v, and prints a per-kernel table of
#    registers, static shared memory, stack frame and spill stores/loads.
# 2. NVRTC compatibility of every csrc/*/*_kernels.cuh (the run-time fallback compiles
#    them with NVRTC through CuPy): they may include only cuda_fp16.h, cuda_bf16.h, mma.h and
#    csrc/common/*.cuh, and the name expressions that tokenreduce/nvrtc/_names.py lists
#    for them must instantiate (a PTX-only nvcc compile of a generated unit); when a
#    libnvrtc is found (NVRTC_LIB=...), tools/nvrtc_check.py also compiles them with NVRTC.
# 3. Syntax-checks the torch glue csrc/*/*_cuda.cpp against the installed torch headers
#    (TORCH_PYTHON=/path/to/python with torch; skipped when torch does not import).
#
# Exits non-zero on any compile error, on a disallowed include, or on a local-memory
# spill in a kernel that tools/cuda_spill_allowlist.txt does not list (one demangled-name
# substring per line, each with a comment saying why the spill is justified).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS=2
ARCHS="80 90"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) JOBS="$2"; shift 2 ;;
    --arch) ARCHS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n 2,21p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
NVCC="${NVCC:-nvcc}"
PY="${PYTHON:-python3}"
command -v "$NVCC" >/dev/null || { echo "cuda_compile_check: nvcc not found" >&2; exit 2; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
[ -n "$OUT" ] || OUT="$WORK"
mkdir -p "$OUT"

cd "$ROOT"
mapfile -t CU_FILES < <(ls csrc/*/*.cu 2>/dev/null | sort)
if [ ${#CU_FILES[@]} -eq 0 ]; then echo "cuda_compile_check: no csrc/*/*.cu files" >&2; exit 2; fi
echo "nvcc: $("$NVCC" --version | tail -1)"
echo "compiling ${#CU_FILES[@]} file(s) for sm_{${ARCHS// /,}} with $JOBS job(s) ..."

# ---- 1. compile every .cu for every arch ----
JOBLIST="$WORK/jobs.txt"
: > "$JOBLIST"
for f in "${CU_FILES[@]}"; do
  for a in $ARCHS; do echo "$f $a" >> "$JOBLIST"; done
done
compile_one() {
  local f="$1" a="$2" tag
  tag="$(echo "$f" | tr '/.' '__')_sm$a"
  # the -D flags are the ones torch's CUDAExtension passes to nvcc
  if "$NVCC" -std=c++17 -O3 -lineinfo -gencode "arch=compute_$a,code=sm_$a" -Xptxas -v \
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
       -Icsrc -c "$f" -o "$OUT/$tag.o" > "$OUT/$tag.log" 2>&1; then
    echo "ok   $f sm_$a"
  else
    echo "FAIL $f sm_$a"; cat "$OUT/$tag.log"; return 1
  fi
}
export -f compile_one
export NVCC OUT
FAILED=0
xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1"' < "$JOBLIST" || FAILED=1

# ---- 2. NVRTC compatibility of the device sources ----
mapfile -t CUH_FILES < <(ls csrc/*/*_kernels.cuh 2>/dev/null | sort)
for h in "${CUH_FILES[@]}" csrc/common/cuda_common.cuh; do
  bad="$(grep -nE '^\s*#\s*include' "$h" | grep -vE '<cuda_fp16\.h>|<cuda_bf16\.h>|<mma\.h>|"(\.\./)?common/[a-z_]+\.cuh"|"[a-z_]+\.cuh"' || true)"
  if [ -n "$bad" ]; then
    echo "FAIL $h: NVRTC sources may include only cuda_fp16.h, cuda_bf16.h, mma.h and common/*.cuh:"
    echo "$bad"; FAILED=1
  fi
  if grep -nE '\b(torch|ATen|c10|std::)' "$h" | grep -vE '^\S+:\s*//' > "$WORK/torch.txt"; then
    echo "FAIL $h: torch / std-library names in a device source:"; cat "$WORK/torch.txt"; FAILED=1
  fi
done
"$PY" - "$ROOT" "$WORK" "${CUH_FILES[@]}" <<'PYEOF' > "$WORK/nvrtc_units.txt" || FAILED=1
import os, runpy, sys
root, work, files = sys.argv[1], sys.argv[2], sys.argv[3:]
names = runpy.run_path(os.path.join(root, "tokenreduce", "nvrtc", "_names.py"))["NAME_EXPRESSIONS"]
for path in files:
    rel = os.path.relpath(path, "csrc")
    unit = os.path.join(work, "nvrtc_" + rel.replace("/", "_") + ".cu")
    with open(unit, "w") as f:
        f.write(f'#include "{os.path.abspath(path)}"\n')
        for i, expr in enumerate(names.get(rel, [])):
            f.write(f"static auto* tr_inst_{i} = &{expr};\n")
    print(unit, len(names.get(rel, [])))
PYEOF
while read -r unit n; do
  if "$NVCC" -std=c++17 -arch=sm_80 -ptx "$unit" -o "$unit.ptx" > "$unit.log" 2>&1; then
    echo "ok   NVRTC-compatible $(basename "$unit" .cu | sed 's/^nvrtc_//') ($n name expressions)"
  else
    echo "FAIL NVRTC unit $unit"; cat "$unit.log"; FAILED=1
  fi
done < "$WORK/nvrtc_units.txt"

# real NVRTC compile of the same sources when a libnvrtc is around (NVRTC_LIB=...)
"$PY" "$ROOT/tools/nvrtc_check.py"
case $? in
  0) ;;
  77) echo "skip real NVRTC compile (no libnvrtc; set NVRTC_LIB=/path/to/libnvrtc.so)" ;;
  *) FAILED=1 ;;
esac

# ---- 3. syntax of the torch glue (csrc/*/*_cuda.cpp) against the installed torch headers ----
# A CPU torch wheel lacks c10's generated cuda_cmake_macros.h: an empty stand-in is enough
# for a syntax check. Skipped when torch does not import (TORCH_PYTHON picks the interpreter).
TPY="${TORCH_PYTHON:-$PY}"
if TINC="$("$TPY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)"; then
  mkdir -p "$WORK/stub/c10/cuda/impl"
  echo '#pragma once' > "$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
  CUDA_INC="$(dirname "$(dirname "$(command -v "$NVCC")")")/include"
  [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
  for f in csrc/*/*_cuda.cpp; do
    [ -e "$f" ] || continue
    if g++ -std=c++20 -fsyntax-only -Wall -Wno-unknown-pragmas $TINC -I"$WORK/stub" -I"$CUDA_INC" \
         -DTOKENREDUCE_WITH_CUDA "$f" > "$WORK/glue.log" 2>&1; then
      echo "ok   glue syntax $f"
    else
      echo "FAIL glue syntax $f"; cat "$WORK/glue.log"; FAILED=1
    fi
  done
else
  echo "skip glue syntax check (torch does not import with $TPY; set TORCH_PYTHON)"
fi

# ---- 4. resource table and spill check ----
cat "$OUT"/*.log 2>/dev/null > "$WORK/all.log"
"$PY" - "$WORK/all.log" "$ROOT/tools/cuda_spill_allowlist.txt" <<'PYEOF' || FAILED=1
import re, shutil, subprocess, sys
log, allow_path = sys.argv[1], sys.argv[2]
allow = []
try:
    for line in open(allow_path):
        line = line.split("#", 1)[0].strip()
        if line:
            allow.append(line)
except FileNotFoundError:
    pass
rows, cur = [], None
for line in open(log):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
    if m:
        cur = {"mangled": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0, "stack": 0,
               "st": 0, "ld": 0}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(s.group(1)) if s else 0
filt = shutil.which("cu++filt") or shutil.which("c++filt")
names = [r["mangled"] for r in rows]
if filt and names:
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    for r, d in zip(rows, out):
        r["name"] = d.strip() or r["mangled"]
else:
    for r in rows:
        r["name"] = r["mangled"]
def short(n):
    n = n.replace("tokenreduce::cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
    n = re.sub(r"\(.*\)$", "", n)  # drop the parameter list
    n = re.sub(r"AccOf<([^>]*)>::type", r"acc<\1>", n)
    return n
rows.sort(key=lambda r: (short(r["name"]), r["arch"]))
bad = []
print()
print(f"{'kernel':<58} {'arch':<6} {'regs':>4} {'smem B':>7} {'stack':>5} {'spill st/ld':>11}")
print("-" * 96)
for r in rows:
    n = short(r["name"])
    flag = ""
    if r["st"] or r["ld"]:
        if any(a in r["name"] or a in n for a in allow):
            flag = "  (spill allowlisted)"
        else:
            flag = "  <-- SPILL"
            bad.append(n + " " + r["arch"])
    print(f"{n[:58]:<58} {r['arch']:<6} {r['regs']:>4} {r['smem']:>7} {r['stack']:>5} "
          f"{str(r['st']) + '/' + str(r['ld']):>11}{flag}")
print(f"\n{len(rows)} kernel compilations; dynamic shared memory (set at launch) is not listed.")
if bad:
    print("FAIL: local-memory spills in: " + ", ".join(bad))
    sys.exit(1)
PYEOF

if [ "$FAILED" -ne 0 ]; then
  echo "cuda_compile_check: FAILED"; exit 1
fi
echo "cuda_compile_check: OK"
