#!/usr/bin/env bash
# Every GPU check of issue 7 in one prepared run, for a lent GPU machine (a few minutes of its time):
# first the tests that need CUDA (tests/cuda), then every GPU benchmark. Here, first:
# ./scripts/gpu-wheels.sh (the packages that machine lacks, into .whl/); then through the device
# tool: `bash scripts/gpu-check.sh` with carry [".whl"]. Results land in $OUT (there) or
# artifacts/gpu-check/ (elsewhere), three files, since that tool brings back at most eight:
# results.json (each benchmark's JSON by name, rewritten after every step, so a run cut short
# keeps what finished), cuda_tests.txt and log.txt (all output).
# `--smoke` runs every step at toy sizes with .venv's Python, to check the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-artifacts/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--smoke" ]; then
  py=.venv/bin/python
  seed_run=(--images 3200 --eval-images 500 --epochs 1); steps_small=(--steps 2 --rounds 1); steps_large=(--steps 1 --rounds 1 --batch 256)
  extract=(--images 32 --copies 2 --batch 32 --workers 2)
  precompute=(--images 2000 --d-sae 4096 --k 32)
else
  py=python3
  if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  seed_run=(); steps_small=(--steps 50 --rounds 3); steps_large=(--steps 10 --rounds 3 --batch 4096)
  extract=(--images 2048 --copies 8 --batch 256 --workers 14)
  precompute=()
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
step_limit=${STEP_LIMIT:-300}  # seconds for one step (STEP_LIMIT): a hung step loses itself, not the steps after it
run() {  # name, command...: the JSON the command prints goes into results.json under name, all its output to the log
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout -k 10 "$step_limit" "$@" 2>>"$out/log.txt" | tee -a "$out/log.txt" | sed -n '/^{$/,/^}$/p' > "$parts/$name.json"
  cat "$parts/$name.json"
  $py - "$parts" "$out/results.json" <<'PY'
import json, pathlib, sys
def parsed(text):
    try:
        return json.loads(text) if text.strip() else None  # None: the step printed no JSON (see log.txt)
    except ValueError:
        return {"unparsed": text}
parts = sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime)
json.dump({p.stem: parsed(p.read_text()) for p in parts}, open(sys.argv[2], "w"), indent=2)
PY
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$out/log.txt"
echo "== tests that need CUDA" | tee -a "$out/log.txt"
timeout -k 10 "$step_limit" $py -m pytest -q -p no:cacheprovider tests/cuda 2>&1 | tee "$out/cuda_tests.txt" >> "$out/log.txt"
tail -n 3 "$out/cuda_tests.txt"
run seed_run $py bench/seed_run.py "${seed_run[@]}" --cuda-graphs both
run train_seed_64 $py bench/train_step.py --recipe seed --batch 64 "${steps_small[@]}"
run train_topk_64 $py bench/train_step.py --recipe topk --batch 64 "${steps_small[@]}"
run train_seed_large $py bench/train_step.py --recipe seed "${steps_large[@]}"
run train_topk_large $py bench/train_step.py --recipe topk "${steps_large[@]}"
for precision in fp32 bf16; do
  for resize in pil torch; do
    run "extract_${precision}_$resize" $py bench/extract.py "${extract[@]}" --precision $precision --resize $resize
  done
done
run precompute $py bench/precompute.py "${precompute[@]}"
