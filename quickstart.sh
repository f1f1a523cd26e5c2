#!/usr/bin/env bash
# The main job in one command: prepare a dataset (default: the embedded synthetic one, no download)
# and train + evaluate NeuMF on it. Installs what it needs into ./.venv when no environment is active.
#   ./quickstart.sh                      # synthetic ML-1m-shaped data, 5 epochs, batch 65536
#   DATASET=ml-1m ./quickstart.sh -e 20  # any prepare_dataset.sh name; extra flags go to ncf.py
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements.txt
dataset="${DATASET:-synthetic}"
./prepare_dataset.sh "$dataset"
name="$(basename "$dataset")"
cache="${DATA_ROOT:-./data}/cache/${name%.*}"
python ncf.py --data "$cache" --epochs 5 --batch_size 65536 \
    --checkpoint_dir "${DATA_ROOT:-./data}/checkpoints/$(basename "$cache")" "$@"
