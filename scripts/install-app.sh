#!/usr/bin/env bash
# The application install step of the Dockerfile (also run outside Docker by tests/test_packaging.py):
# installs ClipScope from the source tree SRC with the registry's CUDA-capable torch, then checks
# that the console command and every package import.
set -euo pipefail
SRC=${1:?usage: install-app.sh SRC_DIR}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --no-cache-dir --upgrade pip
"$PYTHON" -m pip install --no-cache-dir -e "$SRC"
"$PYTHON" -c "import backend.app, worker.pipeline, clipscope_cli.main; print('clipscope import check: ok')"
"$(dirname "$PYTHON")/clipscope" --help >/dev/null
