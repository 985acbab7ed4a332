#!/usr/bin/env bash
# The GPU check, first version: the CUDA tests and resnet-mini on CUDA (bf16 AMP and fp32), the
# CUDA checkpoint evaluated on the CPU and exported (verified on ONNX Runtime's CPU provider).
# Serving on the CUDA execution provider is not in it yet: it needs onnxruntime-gpu (issue 23).
#
#   bash bench/gpu_check.sh [DATA_DIR]   # DATA_DIR holds MNIST/raw (default ../shared/data)
#
# Writes its log and the two runs' metrics.csv to $OUT (default bench/results/gpu/).
set -u
data=${1:-../shared/data}
out=${OUT:-bench/results/gpu}
tmp=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)" || exit 1
echo "== CUDA tests (the rest of these files run their CPU paths)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/training/test_gpu.py \
    tests/unit/training/test_checkpoint.py tests/unit/training/test_loop.py \
    tests/unit/training/test_resume.py 2>&1 | tail -15
for amp in --amp --no-amp; do
  echo "== cnnctl train --model resnet-mini --dataset mnist --device cuda $amp"
  start=$(date +%s.%N)
  timeout 150 cnnctl train --model resnet-mini --dataset mnist --data-dir "$data" --device cuda \
      $amp --no-progress --no-plot --out "$tmp/run$amp" 2>&1 | tail -6
  echo "process wall seconds $amp: $(python3 -c "print(round($(date +%s.%N) - $start, 1))")"
  cp "$tmp/run$amp/metrics.csv" "$out/metrics$amp.csv"
done
echo "== the CUDA (bf16) checkpoint evaluated on the CPU"
timeout 60 cnnctl evaluate "$tmp/run--amp/best.pt" --dataset mnist --data-dir "$data" --device cpu \
    2>&1 | head -2
echo "== exported and verified (ONNX Runtime CPU)"
timeout 90 cnnctl export "$tmp/run--amp/best.pt" --out "$tmp/art" --data-dir "$data" \
    --precision fp16 2>&1 | tail -6
