#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the main job on the embedded defaults
# (SQLite under ./data, offline synthetic images, random-initialised CLIP).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/clipscope demo "$@"
