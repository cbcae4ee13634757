#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/system-deps.sh
exec .venv/bin/python -m pytest "$@"
