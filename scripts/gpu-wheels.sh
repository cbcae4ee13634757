#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels a lent GPU machine lacks for scripts/gpu-check.sh:
# that machine has PyTorch, torchvision, timm, numpy, safetensors and tqdm but no registry access,
# and runs Python 3.12. Versions are the ones installed in .venv here (run ./scripts/setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
names=(pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions
       sqlalchemy alembic mako open_clip_torch ftfy wcwidth orjson)
rm -rf .whl && mkdir .whl
for name in "${names[@]}"; do
  version=$(.venv/bin/python -m pip show "$name" | sed -n 's/^Version: //p')
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
du -sh .whl
