#!/usr/bin/env bash
# Build the CUDA extension for the GPU machine on the CPU machine (issue 11, section 2).
#
#   tools/build_gpu_extension.sh            build into prebuilt/gpu/ (gitignored; carried to the GPU)
#
# Against the GPU machine's torch (2.11.0+cu130, Python 3.12: the rehearsal venv of
# tools/gpu_stack_venv.sh, GPU_VENV, default .venv-gpu), for sm_90 only
# (TOKENREDUCE_CUDA_ARCHS=90), portable host code (TOKENREDUCE_NATIVE_ARCH=0: no -march=native),
# CUDA_HOME = the toolkit whose include/ has cuda_runtime.h. Built in a scratch copy of the tree
# (build/gpu-ext-tree) so the working tree's own tokenreduce/_C*.so stays as it is.
# Output, all under prebuilt/ (a few MB; `carry: ["prebuilt"]` in the device tool):
#   prebuilt/gpu/_C.cpython-312-x86_64-linux-gnu.so   the extension
#   prebuilt/gpu/SOURCE_HASH                           tools/source_hash.sh of csrc/ + setup.py
#   prebuilt/gpu/BUILD_INFO                            torch / CUDA / archs / date / glibc needs
#   prebuilt/bin/ninja                                 the ninja binary from the ninja wheel (for a
#                                                      rebuild on the GPU machine when the hash differs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
PY=$VENV/bin/python
[ -x "$PY" ] || { echo "build_gpu_extension: no venv at $VENV (run tools/gpu_stack_venv.sh --install-only)" >&2; exit 1; }
find_cuda_home() {
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-1*; do
    [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ] && [ -x "$d/bin/nvcc" ] && { echo "$d"; return; }
  done
  echo "build_gpu_extension: no CUDA toolkit with include/cuda_runtime.h found (set CUDA_HOME)" >&2; exit 1
}
export CUDA_HOME=$(find_cuda_home)
export PATH=$CUDA_HOME/bin:$VENV/bin:$PATH
export TOKENREDUCE_CUDA_ARCHS=${TOKENREDUCE_CUDA_ARCHS:-90} TOKENREDUCE_NATIVE_ARCH=0 MAX_JOBS=${MAX_JOBS:-2}
HASH=$(tools/source_hash.sh)
TREE=$ROOT/build/gpu-ext-tree
mkdir -p "$TREE"
( find csrc -type f ! -path '*/__pycache__/*'; echo setup.py; find tokenreduce -name '*.py' ) \
  | tar -cf - -T - | tar -xf - -C "$TREE"
echo "build_gpu_extension: torch $("$PY" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CUDA_HOME," \
     "archs $TOKENREDUCE_CUDA_ARCHS, source hash $HASH (log: $TREE/build.log)"
(cd "$TREE" && "$PY" setup.py build_ext --inplace > build.log 2>&1) || { tail -40 "$TREE/build.log"; exit 1; }
SO=$(ls "$TREE"/tokenreduce/_C*.so)
mkdir -p prebuilt/gpu prebuilt/bin
rm -f prebuilt/gpu/_C*.so
cp "$SO" prebuilt/gpu/
strip --strip-debug prebuilt/gpu/_C*.so   # host debug info only (35 -> 6 MB); the sm_90 fatbin stays
echo "$HASH" > prebuilt/gpu/SOURCE_HASH
NINJA_BIN=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')
cp "$NINJA_BIN" prebuilt/bin/ninja && chmod +x prebuilt/bin/ninja
{
  "$PY" -c 'import torch, platform; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())'
  echo "archs sm_${TOKENREDUCE_CUDA_ARCHS// /,sm_} portable (no -march=native) nvcc $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
  echo "built $(date -u +%FT%TZ) on $(uname -m), $(ldd --version | head -1)"
  echo "glibc symbols needed: $(objdump -T prebuilt/gpu/_C*.so | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
  echo "source hash $HASH"
} > prebuilt/gpu/BUILD_INFO
cat prebuilt/gpu/BUILD_INFO
du -sh prebuilt
