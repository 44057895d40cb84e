#!/usr/bin/env bash
# One prepared run on a fresh GPU machine (issue 11, section 3): extension, every GPU path, timings.
#
#   tools/gpu_validate.sh RESULTS_DIR                  on the GPU machine (budget 540 s wall)
#   tools/gpu_validate.sh --dry-run RESULTS_DIR        CPU check of the plumbing (CI runs it)
#   GPU_VALIDATE_BUDGET=300 tools/gpu_validate.sh ...  another wall-time budget (seconds)
#   GPU_VALIDATE_ONLY="extension cuda_compiled" ...     these steps only (a short rerun after a fix)
#
# Fail-soft: every step runs under `timeout`, clipped to the time left; a failing step never
# stops the run. Per step: RESULTS_DIR/<step>.log and RESULTS_DIR/<step>.status
# ("status rc seconds limit"; status ok | FAIL | TIMEOUT | EMPTY (pytest ran no test or skipped
# them all) | SKIP (no time left, or a step it needs failed) | DRY). Last: tools/gpu_summary.py
# writes RESULTS_DIR/summary.{json,md} (device, versions, steps, ceilings, issue-11 targets as
# measured / target) and prints the short table. Exit 0: every step that ran passed; 1: some step
# failed; 2: nothing ran (no step passed).
#
# Steps, in order of value:
#   1 env        GPU name, clocks, driver, versions            3 info         python -m tokenreduce info
#   2 extension  the prebuilt extension (hash of csrc/ + setup.py matches and it loads) or a build
#                here with the carried ninja, sm_90 only
#   4-8 in parallel: cuda_compiled (tests/test_cuda.py through the compiled kernels) then
#                cuda_nvrtc (the NVRTC path); methods_cuda (every method fp32/bf16/fp16 vs CPU, no
#                sync, CUDA graph); triton_gpu; sanitize_memcheck then sanitize_racecheck
#   9-  with the GPU to itself: bench_quick (bench/gpu_bench.py --quick, with the ceilings),
#                race_attention, profile_{llava,qwen2vl}_b{1,16} (random bf16 7B, 4 LLM layers,
#                576 -> 192/128/64, five methods), bench_full with what time is left
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUTDIR=${1:?usage: tools/gpu_validate.sh [--dry-run] RESULTS_DIR}
mkdir -p "$OUTDIR/steps"
OUTDIR=$(cd "$OUTDIR" && pwd)
R=$OUTDIR/steps   # every log, status and result file; packed into OUTDIR/results.tar.gz at the end
BUDGET=${GPU_VALIDATE_BUDGET:-540}
RESERVE=${GPU_VALIDATE_RESERVE:-15}        # kept for the summary
PY=${PYTHON:-python3}
# the repository arrives as a copy of the working tree, not installed: import it from here
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ONLY=" ${GPU_VALIDATE_ONLY:-} "   # e.g. "extension cuda_compiled": run these steps only (a rerun)
T0=$(date +%s)
STEPS=()
# the toolkit whose include/ has cuda_runtime.h (torch would guess /usr/local from the nvcc wrapper)
if [ "$DRY" = 0 ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-1* /usr/cuda \
           "$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$(command -v nvcc 2>/dev/null || echo /dev/null)" 2>/dev/null)" \
           "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x)")")")"; do
    [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ] && { export CUDA_HOME=$d CUDA_PATH=$d; break; }
  done
  export PATH="$ROOT/prebuilt/bin:${CUDA_HOME:+$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer:}$PATH"
fi

left() { echo $(( BUDGET - RESERVE - ($(date +%s) - T0) )); }

write_status() {  # name status rc seconds limit
  echo "$2 $3 $4 $5" > "$R/$1.status"
}

# pytest's closing line: "no tests ran" or only skips count as EMPTY, not ok
pytest_empty() {
  local last
  last=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran' "$1" | tail -1)
  [ -n "$last" ] && ! echo "$last" | grep -qE '[0-9]+ (passed|failed)'
}

# step NAME LIMIT_S [needs=OTHER] -- COMMAND...   (COMMAND runs in bash -c, cwd = repo root)
step() {
  local name=$1 limit=$2; shift 2
  local need=""
  if [ "${1:-}" != "--" ]; then need=${1#needs=}; shift; fi
  shift  # --
  local cmd="$*"
  STEPS+=("$name")
  echo "$cmd" > "$R/$name.cmd"
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then
    echo "skipped: not in GPU_VALIDATE_ONLY" > "$R/$name.log"
    write_status "$name" SKIP - 0 0; return
  fi
  if [ -n "$need" ] && [ "$(cut -d' ' -f1 "$R/$need.status" 2>/dev/null)" != ok ] \
     && [ "$(cut -d' ' -f1 "$R/$need.status" 2>/dev/null)" != DRY ]; then
    echo "skipped: needs step $need, which did not pass" > "$R/$name.log"
    write_status "$name" SKIP - 0 0; return
  fi
  local l
  l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 5 ]; then
    echo "skipped: no time left" > "$R/$name.log"
    write_status "$name" SKIP - 0 0; return
  fi
  if [ "$DRY" = 1 ]; then  # the plumbing only: a stand-in command (GPU_VALIDATE_DRY_<name>=...)
    local var="GPU_VALIDATE_DRY_${name}"
    cmd=${!var:-"echo '[dry-run] would run:'; cat '$R/$name.cmd'"}
  fi
  local t=$(date +%s) rc
  timeout -k 5 "$limit" bash -c "$cmd" > "$R/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t )) st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=TIMEOUT
  elif [ $rc -eq 5 ] || { [ $rc -eq 0 ] && pytest_empty "$R/$name.log"; }; then st=EMPTY
  elif [ $rc -ne 0 ]; then st=FAIL
  elif [ "$DRY" = 1 ] && [ -z "${!var:-}" ]; then st=DRY
  fi
  write_status "$name" "$st" "$rc" "$dt" "$limit"
  echo "[$(( $(date +%s) - T0 ))s] $name: $st (rc $rc, ${dt}s of ${limit}s)"
}

# ------------------------------------------------------------------ 1-3: environment, extension
step env 40 -- "$PY tools/gpu_env_probe.py '$R/env.json'"
step extension 200 -- "tools/gpu_extension.sh"
step info 40 needs=extension -- "$PY -m tokenreduce info"

# ------------------------------------------------------------------ 4-8: checks, in parallel
SAN="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 1 --print-limit 50"
L=$(left); P=$(( L > 400 ? 200 : L / 2 ))   # the parallel group's time box
(
  step cuda_compiled $(( P / 2 )) needs=extension -- "$PY -m pytest -q -p no:randomly -p no:cacheprovider tests/test_cuda.py -k 'not nvrtc'"
  step cuda_nvrtc $(( P / 2 )) -- "$PY -m pytest -q -p no:randomly -p no:cacheprovider tests/test_cuda.py tests/test_nvrtc.py -k nvrtc"
) &
( step methods_cuda "$P" needs=extension -- "$PY -m pytest -q -p no:randomly -p no:cacheprovider tests/methods/test_methods_cuda.py" ) &
( step triton_gpu "$P" -- "$PY -m pytest -q -p no:randomly -p no:cacheprovider tests/test_triton_attention.py tests/test_attention_with_scores.py" ) &
(
  step sanitize_memcheck $(( P * 3 / 5 )) needs=extension -- "$SAN --tool memcheck $PY tools/cuda_sanitize_cases.py"
  step sanitize_racecheck $(( P * 2 / 5 )) needs=extension -- "$SAN --tool racecheck $PY tools/cuda_sanitize_cases.py"
) &
wait
STEPS+=(cuda_compiled cuda_nvrtc methods_cuda triton_gpu sanitize_memcheck sanitize_racecheck)

# ------------------------------------------------------------------ 9-: timings, GPU to itself
step bench_quick 90 needs=extension -- "$PY bench/gpu_bench.py '$R' --quick --reps 20 --max-seconds 1"
step race_attention 60 -- "$PY bench/race_attention.py '$R' --shapes vit336,llava_next"
PROF="$PY -m tokenreduce profile --random-weights --device cuda --dtype bf16 --layers 4 --keep 192 128 64 --warmup 1 --repeat 3 --new-tokens 2 --no-memory"
LLAVA_METHODS="fastv visionzip divprune prumerge+ pdrop"
QWEN_METHODS="fastv divprune pdrop todre pool"   # no [CLS] in Qwen2-VL; 672 px = 576 merged image tokens
step profile_llava_b1 60 needs=extension -- "$PROF --model llava-1.5-7b --batch 1 --method $LLAVA_METHODS --json '$R/profile-llava-1.5-7b-b1.json'"
step profile_llava_b16 70 needs=extension -- "$PROF --model llava-1.5-7b --batch 16 --method $LLAVA_METHODS --json '$R/profile-llava-1.5-7b-b16.json'"
step profile_qwen2vl_b1 60 needs=extension -- "$PROF --model qwen2-vl-7b --image-size 672 --batch 1 --method $QWEN_METHODS --json '$R/profile-qwen2-vl-7b-b1.json'"
step profile_qwen2vl_b16 70 needs=extension -- "$PROF --model qwen2-vl-7b --image-size 672 --batch 16 --method $QWEN_METHODS --json '$R/profile-qwen2-vl-7b-b16.json'"
step bench_full 120 needs=extension -- "mkdir -p '$R/full' && $PY bench/gpu_bench.py '$R/full' --reps 20 --max-seconds 1"

# ------------------------------------------------------------------ summary (printed last)
# The device tool brings back at most 8 files from $OUT: OUTDIR gets summary.{md,json}, the op
# benchmark's and the race's JSON + Markdown, and results.tar.gz (every log, status and result)
timeout -k 2 $(( RESERVE > 5 ? RESERVE : 5 )) "$PY" tools/gpu_summary.py "$R" $([ "$DRY" = 1 ] && echo --dry-run) \
  --elapsed $(( $(date +%s) - T0 )) --budget "$BUDGET" --steps "${STEPS[@]}" > "$R/summary.txt" 2>&1
rc=$?
cp "$R"/summary.md "$R"/summary.json "$OUTDIR/" 2>/dev/null
for f in "$R"/*-20[0-9][0-9]-*.json "$R"/race-attention-*.json; do
  [ -f "$f" ] && cp "$f" "${f%.json}.md" "$OUTDIR/" 2>/dev/null
done
tar -czf "$OUTDIR/results.tar.gz" -C "$OUTDIR" steps
[ "${GPU_VALIDATE_KEEP_STEPS:-0}" = 1 ] || rm -rf "$R"
cat "$OUTDIR/summary.md" > /dev/null 2>&1 || echo "gpu_validate: no summary written (rc $rc)"
[ -f "$R/summary.txt" ] && cat "$R/summary.txt" || tar -xzOf "$OUTDIR/results.tar.gz" steps/summary.txt
exit $rc
