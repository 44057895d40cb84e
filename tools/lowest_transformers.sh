#!/usr/bin/env bash
# The model and profile tests on the lowest supported transformers (constraints-lowest.txt).
# A light second install: those few packages with --no-deps into a --target folder that goes
# first on PYTHONPATH; everything else comes from .venv (made by ./setup.sh).
#   tools/lowest_transformers.sh [pytest args]      (default: tests/models tests/profile)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.venv-lowest-transformers
want=$(grep -E '^transformers==' constraints-lowest.txt | cut -d= -f3)
if ! PYTHONPATH=$DIR .venv/bin/python -c "import sys, transformers; sys.exit(transformers.__version__ != '$want')" 2>/dev/null; then
  rm -rf "$DIR"
  .venv/bin/python -m pip install -q --no-deps --target "$DIR" -r constraints-lowest.txt
fi
PYTHONPATH=$DIR .venv/bin/python -c "import transformers; print('lowest transformers:', transformers.__version__, transformers.__file__)"
[ $# -gt 0 ] || set -- tests/models tests/profile
PYTHONPATH=$DIR exec .venv/bin/python -m pytest -q "$@"
