#!/usr/bin/env bash
# The extension on the GPU machine (step "extension" of tools/gpu_validate.sh).
# 1. prebuilt/gpu/ (tools/build_gpu_extension.sh on the CPU machine): used when its SOURCE_HASH
#    equals tools/source_hash.sh here and it loads with every op's CUDA kernel registered;
# 2. otherwise built here: setup.py build_ext --inplace with the carried prebuilt/bin/ninja, sm_90
#    only, portable flags, CUDA_HOME = the toolkit whose include/ has cuda_runtime.h.
# Writes tokenreduce/_C*.so and prints one line "extension: prebuilt|built ..." last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PATH="$PWD/prebuilt/bin:$PATH"
check() {  # every op has a CUDA kernel in the loaded extension
  "$PY" - <<'PY'
import torch, tokenreduce  # noqa: F401
from tokenreduce.ops.registry import OPS as ops
has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenreduce::{op}", "CUDA") for op in ops}
from tokenreduce.nvrtc import backend_info
print("CUDA kernels:", has, "| backends:", backend_info())
raise SystemExit(0 if all(has.values()) else 3)
PY
}
HASH=$(tools/source_hash.sh)
SO_HERE="tokenreduce/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
WANT=$(cat prebuilt/gpu/SOURCE_HASH 2>/dev/null || echo none)
echo "source hash here $HASH, prebuilt $WANT"
if [ "$HASH" = "$WANT" ] && ls prebuilt/gpu/_C*.so >/dev/null 2>&1; then
  cat prebuilt/gpu/BUILD_INFO 2>/dev/null
  rm -f "$SO_HERE" && cp prebuilt/gpu/_C*.so tokenreduce/
  if check; then echo "extension: prebuilt ($HASH)"; exit 0; fi
  echo "the prebuilt extension does not load or lacks CUDA kernels: building here"
fi
rm -f "$SO_HERE"
command -v ninja >/dev/null || echo "warning: no ninja on the PATH (setup.py falls back to a slow serial build)"
echo "building: CUDA_HOME=${CUDA_HOME:-unset}, nvcc $(command -v nvcc), $(nproc) jobs"
TOKENREDUCE_CUDA_ARCHS=90 TOKENREDUCE_NATIVE_ARCH=0 MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace \
  > build_ext.log 2>&1 || { tail -40 build_ext.log; echo "extension: build FAILED"; exit 1; }
check || { echo "extension: built but CUDA kernels missing"; exit 1; }
echo "extension: built here ($HASH)"
