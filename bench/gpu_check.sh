#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one GPU (each step has its own timeout).
#   1. the CUDA tests (tests marked or skipped "needs a CUDA device" run their CUDA paths);
#   2. resnet-mini's default recipe on full MNIST on CUDA (bf16 AMP, device-resident data): whole
#      process wall time, then the test accuracy of last.pt (cnnctl evaluate, on the CPU too);
#   3. cnnctl serve on ONNX Runtime's CUDA execution provider, lenet5 and cifar-net-v3, batch 1 and
#      64 per request, dynamic batching on and off, the fp16 file, IO binding (bench/gpu_serve.py);
# results (training + serving) to bench/results/gpu.json, the log to bench/results/gpu/log.txt.
#
#   bash bench/gpu_check.sh [DATA_DIR]            # on a GPU; DATA_DIR holds MNIST/raw
#   bash bench/gpu_check.sh --dry-run [DATA_DIR]  # anywhere: says what it would run on a GPU and
#                                                 # runs the CPU-side parts (CI does this); the
#                                                 # same happens without --dry-run where torch
#                                                 # sees no CUDA device
# Exits non-zero when a step fails.
set -u
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
data=${1:-../shared/data}
if [ -x .venv/bin/python ]; then py=${PYTHON:-.venv/bin/python}; else py=${PYTHON:-python3}; fi
results=${RESULTS:-bench/results}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PYTHONUNBUFFERED=1
failed=0

step() {  # step SECONDS DESCRIPTION COMMAND...: run it (or, in a dry run, say it)
  local limit=$1 what=$2
  shift 2
  echo "== $what"
  if [ $dry = 1 ]; then
    echo "   would run (timeout ${limit}s): $*"
    return 0
  fi
  timeout "$limit" "$@" || { echo "FAILED ($?): $what"; failed=1; }
}

if [ $dry = 0 ] && ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "no CUDA device here: a dry run (what it would run on a GPU, and its CPU-side parts)"
  dry=1
fi
if [ $dry = 0 ]; then
  mkdir -p "$results/gpu"
  exec > >(tee "$results/gpu/log.txt") 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || exit 1
  $py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)" || exit 1
  $py -c "import onnxruntime as ort; p = ort.get_available_providers(); print('onnxruntime', ort.__version__, p); assert 'CUDAExecutionProvider' in p, 'onnxruntime has no CUDA provider (pip install onnxruntime-gpu)'" || exit 1
else
  echo "dry run: nothing below runs on a GPU; the CPU-side parts (serving machinery) run here"
fi

step 240 "CUDA tests (the rest of these files run their CPU paths)" \
  $py -m pytest -q -p no:cacheprovider tests/unit/training/test_gpu.py \
    tests/unit/training/test_checkpoint.py tests/unit/training/test_resume.py \
    tests/unit/serving/test_runtime.py

run="$tmp/resnet-mini"
start=$(date +%s.%N)
step 120 "cnnctl train --model resnet-mini --dataset mnist --device cuda (the default recipe)" \
  $py -m cnnctl train --model resnet-mini --dataset mnist --data-dir "$data" --device cuda \
    --no-progress --no-plot --out "$run"
wall=$($py -c "print(round($(date +%s.%N) - $start, 2))")
step 60 "test accuracy of the CUDA checkpoint, evaluated on the CPU" \
  sh -c "$py -m cnnctl evaluate '$run/last.pt' --dataset mnist --data-dir '$data' --device cpu --json > '$tmp/eval.json'"
if [ $dry = 0 ] && [ -s "$tmp/eval.json" ]; then
  $py - "$results/gpu.json" "$tmp/eval.json" "$run/metrics.csv" "$wall" <<'EOF'
import csv, json, sys
from pathlib import Path
out, evaluation, metrics, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
results = json.loads(out.read_text()) if out.exists() else {}
acc = json.loads(Path(evaluation).read_text())["accuracy"]
results["training"] = {"command": "cnnctl train --model resnet-mini --dataset mnist --device cuda",
                       "process_wall_s": wall, "test_accuracy": acc,
                       "epochs": list(csv.DictReader(open(metrics)))}
out.write_text(json.dumps(results, indent=2) + "\n")
print(f"resnet-mini on CUDA: test accuracy {100 * acc:.2f}%, whole process {wall:.1f} s")
EOF
fi

if [ $dry = 0 ]; then
  step 300 "cnnctl serve on the CUDA execution provider (bench/gpu_serve.py)" \
    $py bench/gpu_serve.py --device cuda --out "$results/gpu.json"
else
  echo "== cnnctl serve on the CUDA execution provider (bench/gpu_serve.py)"
  echo "   would run (timeout 300s): $py bench/gpu_serve.py --device cuda --out $results/gpu.json"
  echo "   now, the same steps on the CPU (short measurements, results to a temp file):"
  timeout 300 $py bench/gpu_serve.py --device cpu --duration 0.2 --warmup 0 --concurrency 1 \
    --out "$tmp/gpu.json" || { echo "FAILED: the serving steps on the CPU"; failed=1; }
fi
[ $dry = 0 ] && echo "results: $results/gpu.json, log: $results/gpu/log.txt"
exit $failed
