#!/usr/bin/env bash
# The CPU benchmark set: convert, training pipeline vs bare step (synthetic ML-1m and ML-20m shapes),
# evaluation, full ranking and accuracy on real ML-1m users 1-2999, inference; tables on stdout, JSON
# in $OUT (default results/cpu). Run from the repository root in the project's environment
# (./setup_env.sh or an active venv). NCF_SHARED_DATA: the folder holding ml-1m/ (default
# ../shared/data); without it the two steps on real data are skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/cpu}"
work="${WORK:-data/bench}"
mkdir -p "$out" "$work"
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"

python benchmarks/convert_bench.py --csv "$work/synthetic-ml-20m.csv" --json "$out/convert.json"
for precision in fp32 bf16; do
    python benchmarks/train_bench.py --preset ml-1m --workdir "$work" --batch_size 65536 \
        --precision "$precision" --json "$out/train-synthetic-ml-1m-$precision.json"
done
python benchmarks/train_bench.py --preset ml-20m --workdir "$work" --batch_size 65536 --precision bf16 \
    --json "$out/train-synthetic-ml-20m-bf16.json"
python inference.py --batch_sizes 1,64,4096,65536,1048576 --num_batches 30 --log_path "$out/inference-fp32.json"
python inference.py --batch_sizes 1,64,4096,65536,1048576 --num_batches 30 --bf16 --log_path "$out/inference-bf16.json"

shared_data="${NCF_SHARED_DATA:-../shared/data}"  # accuracy.py's default
if [[ -d "$shared_data" ]]; then
    python benchmarks/full_ranking_bench.py --ratings "$shared_data/ml-1m/ratings.PARTIAL-users-1-2999.dat" \
        --json "$out/full-ranking.json"
    NCF_SHARED_DATA="$shared_data" python benchmarks/accuracy.py --datasets ml-1m --settings reference --seeds 1 \
        --epochs 10 --workdir "$work/accuracy" --json "$out/accuracy.json"
else
    echo "run_cpu.sh: no MovieLens files at $shared_data: full ranking and accuracy steps skipped (set NCF_SHARED_DATA" \
        "to the folder holding ml-1m/)"
fi
