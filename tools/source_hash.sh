#!/usr/bin/env bash
# The hash that stamps a prebuilt extension: sha256 of every source file under csrc/ (not the
# Markdown notes) and of setup.py (paths and contents), first 16 hex digits. Run from anywhere;
# hashes the repo this script is in.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc setup.py -type f ! -path '*/__pycache__/*' ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
  | sha256sum | cut -c1-16
