#!/usr/bin/env bash
# The GPU benchmark set (one CUDA device): training pipeline vs bare step on ML-20m-shaped synthetic
# data at the default batch 2^20 (fp16 AMP and bf16), evaluation, peak device memory, inference at
# every batch size (TF32, fp16, bf16), and a short accuracy run to compare with the CPU.
# Tables on stdout, JSON in $OUT (default results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu}"
work="${WORK:-data/bench}"
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

for precision in fp16 bf16 fp32; do
    python benchmarks/train_bench.py --device cuda --preset ml-20m --workdir "$work" --batch_size 1048576 \
        --epochs 3 --precision "$precision" --json "$out/train-synthetic-ml-20m-$precision.json"
done
# does compiling the step pay on the GPU? (on the CPU it does not: see README)
python benchmarks/train_bench.py --device cuda --preset ml-20m --workdir "$work" --batch_size 1048576 \
    --epochs 3 --precision fp16 --compile --json "$out/train-synthetic-ml-20m-fp16-compiled.json"
python inference.py --device cuda --log_path "$out/inference-tf32.json"
python inference.py --device cuda --fp16 --log_path "$out/inference-fp16.json"
python inference.py --device cuda --bf16 --log_path "$out/inference-bf16.json"
python benchmarks/accuracy.py --datasets ml-1m ml-100k --settings reference --seeds 1 --epochs 10 \
    --workdir "$work/accuracy" --json "$out/accuracy.json"
