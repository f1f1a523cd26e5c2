#!/usr/bin/env bash
# The GPU benchmark set (one CUDA device): training pipeline vs bare step on ML-20m-shaped synthetic
# data at the default batch 2^20 (fp16 AMP, bf16, fp32 with TF32, fp16 compiled), evaluation, peak
# device memory, inference at every batch size (fp32 with TF32, fp16, bf16), and a short accuracy run
# on real MovieLens files to compare with the CPU. Tables on stdout, 8 JSON files in $OUT (default
# results/gpu), generated data in $WORK (default data/bench).
#
#   benchmarks/run_gpu.sh
#   NCF_SHARED_DATA=/data/movielens OUT=/tmp/gpu benchmarks/run_gpu.sh
#   DRY_RUN=1 benchmarks/run_gpu.sh     # every step on the CPU at tiny sizes (tests/test_benchmarks.py)
#
# NCF_SHARED_DATA: the folder holding ml-1m/ and ml-100k/ (accuracy.py's --shared_data; default
# ../shared/data); without it the accuracy step is skipped with a message. DRY_RUN=1 runs every
# command below with --device cpu, tiny data, bf16 in place of fp16 and one epoch, into
# results/gpu-dry and data/bench-dry unless OUT / WORK say otherwise, so that no flag or path here can
# rot on a machine without a GPU. Needs torch, numpy, pandas, pyarrow (NVIDIA's PyTorch containers
# have them; no install).
#
# Time on one H200, estimated from the reference's A100 rates, which an H200 should at least match
# (training 34.1M samples/s with AMP, an ML-20m epoch being 99.3M samples; inference 91M samples/s),
# TF32 at half the AMP rate, and synthetic.py + convert.py measured on a 2-core CPU (27 s of CPU time,
# mostly on one core):
#   data: synthetic.py --preset ml-20m, convert.py (once; reused from $WORK)                 ~40 s
#   train_bench fp16: start-up and cache ~10 s, 2 epochs ~6 s, as many bare steps ~6 s, eval  ~25 s
#   train_bench bf16                                                                         ~25 s
#   train_bench fp32 (TF32)                                                                  ~40 s
#   train_bench fp16 --compile: compiles a static, then a dynamic graph (~60 s), then as fp16 ~90 s
#   inference.py x3: 11 batch sizes x 200 passes (~2-5 s at 2^20), start-up ~6 s each        ~50 s
#   accuracy.py: ML-1m users 1-2999 and ML-100k, 4 conversions, 4 runs of <= 10 epochs       ~70 s
#   total                                                                                    ~6 min
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    out="${OUT:-results/gpu-dry}"
    work="${WORK:-data/bench-dry}"
    data_name=synthetic-tiny shape=(--users 60 --items 200 --ratings 3000)
    device=cpu precisions=(bf16 fp32) batch_size=1024 epochs=1
    inference_sizes=(--n_users 60 --n_items 200 --batch_sizes 1,1024 --num_batches 11)
    accuracy_epochs=1
else
    out="${OUT:-results/gpu}"
    work="${WORK:-data/bench}"
    data_name=synthetic-ml-20m shape=(--preset ml-20m)
    device=cuda precisions=(fp16 bf16 fp32) batch_size=1048576 epochs=2
    inference_sizes=()
    accuracy_epochs=10
fi
half="${precisions[0]}"  # ncf.py --amp's dtype on this device
mkdir -p "$out" "$work"
if [[ "$device" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

cache="$work/cache/$data_name"
if [[ ! -f "$cache/metadata.json" ]]; then
    python synthetic.py "${shape[@]}" --output "$work/$data_name.csv"
    python convert.py --format ml-20m --path "$work/$data_name.csv" --output "$cache"
fi

for precision in "${precisions[@]}"; do
    python benchmarks/train_bench.py --device "$device" --data "$cache" --batch_size "$batch_size" \
        --epochs "$epochs" --precision "$precision" --json "$out/train-$data_name-$precision.json"
done
# does compiling the step pay on the GPU? (on the CPU it does not: see README)
python benchmarks/train_bench.py --device "$device" --data "$cache" --batch_size "$batch_size" \
    --epochs "$epochs" --precision "$half" --compile --json "$out/train-$data_name-$half-compiled.json"

for precision in "${precisions[@]}"; do
    flag=()
    if [[ "$precision" != fp32 ]]; then flag=(--"$precision"); fi
    python inference.py --device "$device" "${inference_sizes[@]}" "${flag[@]}" \
        --log_path "$out/inference-$precision.json"
done

shared_data="${NCF_SHARED_DATA:-../shared/data}"  # accuracy.py's default
if [[ -d "$shared_data" ]]; then
    NCF_SHARED_DATA="$shared_data" python benchmarks/accuracy.py --datasets ml-1m ml-100k --settings reference \
        --seeds 1 --epochs "$accuracy_epochs" --workdir "$work/accuracy" --json "$out/accuracy.json"
else
    echo "run_gpu.sh: no MovieLens files at $shared_data: accuracy step skipped (set NCF_SHARED_DATA to the folder" \
        "holding ml-1m/ and ml-100k/)"
fi
