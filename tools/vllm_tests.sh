#!/usr/bin/env bash
# The vLLM plugin tests (tests/vllm) in .venv-vllm, time-boxed.
#   tools/vllm_tests.sh [pytest args]       (default: tests/vllm; make the venv first: tools/vllm_venv.sh)
# VLLM_TESTS_TIMEOUT (seconds, default 1200) bounds the whole run; exit 124 when it is hit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_VLLM:-.venv-vllm}
if ! [ -x "$VENV/bin/python" ]; then
  echo "tools/vllm_tests.sh: $VENV is missing: run tools/vllm_venv.sh first" >&2
  exit 1
fi
# in-process, single-rank vLLM; OpenMP threads sleep instead of spinning (tests/vllm/conftest.py)
export VLLM_ENABLE_V1_MULTIPROCESSING=0 KMP_BLOCKTIME=0 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 \
       VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
[ $# -gt 0 ] || set -- tests/vllm
exec timeout --signal=INT --kill-after=30 "${VLLM_TESTS_TIMEOUT:-1200}" \
  "$VENV/bin/python" -m pytest -q -p no:randomly "$@"
