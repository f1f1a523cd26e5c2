#!/usr/bin/env bash
# Get a dataset and convert it into the cache that ncf.py reads, unless that cache is already there.
#
#   ./prepare_dataset.sh [DATASET] [RAW_DIR] [CACHE_DIR]
#
# DATASET: ml-20m (default), ml-1m, ml-100k (MovieLens, downloaded by download_dataset.sh),
#          synthetic (synthetic.py --preset ml-1m), synthetic-ml-100k, synthetic-ml-1m,
#          synthetic-ml-20m (no download), or the path of a CSV file with columns
#          user_id,item_id,timestamp (named after the file's stem, e.g. my_data.csv -> my_data).
# RAW_DIR defaults to $DATA_ROOT/<name>, CACHE_DIR to $DATA_ROOT/cache/<name>; $DATA_ROOT defaults
# to ./data next to this script. Relative paths are taken from the directory you call it from.
#
# Steps: 1. if CACHE_DIR holds a valid cache, stop there (delete it to rebuild); a cache that an
#           interrupted conversion left moved aside is put back first (convert.py --check);
#        2. find the raw ratings in RAW_DIR as GroupLens lays them out (ml-20m/ratings.csv,
#           ml-1m/ratings.dat, ml-100k/u.data; or the file right in RAW_DIR), else have
#           download_dataset.sh unpack RAW_DIR/<name>.zip (md5-checked) or download it;
#           synthetic data is written to RAW_DIR/ratings.csv;
#        3. run convert.py. Extra options for it go in CONVERT_ARGS, e.g. CONVERT_ARGS="--min_ratings 10";
#           for synthetic data, extra synthetic.py options in SYNTHETIC_ARGS, e.g. SYNTHETIC_ARGS="--users 500".
# Offline: put the official zip at RAW_DIR/<name>.zip (or its unpacked files in RAW_DIR) first.
# Python: $PYTHON if set, else `python` of the active virtualenv/conda environment, else ./.venv, else python3.
set -euo pipefail

prog="prepare_dataset.sh"
err() { echo "$prog: error: $*" >&2; }
usage() {
    echo "usage: $prog [DATASET] [RAW_DIR] [CACHE_DIR]"
    echo "  DATASET: ml-20m (default), ml-1m, ml-100k, synthetic, synthetic-ml-100k, synthetic-ml-1m,"
    echo "           synthetic-ml-20m, or the path of a user_id,item_id,timestamp CSV file"
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac
if [ $# -gt 3 ]; then
    err "too many arguments (expected [DATASET] [RAW_DIR] [CACHE_DIR])"
    exit 2
fi

caller_dir="$(pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
absolute() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$caller_dir/$1" ;;
    esac
}

dataset="${1:-ml-20m}"
preset="" raw_name="" format="" custom_file=""
case "$dataset" in
    ml-20m) raw_name="ml-20m/ratings.csv"; format="ml-20m" ;;
    ml-1m) raw_name="ml-1m/ratings.dat"; format="ml-1m" ;;
    ml-100k) raw_name="ml-100k/u.data"; format="ml-100k" ;;
    synthetic) preset="ml-1m" ;;
    synthetic-ml-100k | synthetic-ml-1m | synthetic-ml-20m) preset="${dataset#synthetic-}" ;;
    *)
        if [ -f "$dataset" ]; then
            custom_file="$(absolute "$dataset")"
            format="custom"
        elif [[ "$dataset" == */* || "$dataset" == *.csv ]]; then
            err "custom dataset file $dataset does not exist"
            exit 2
        else
            err "unknown dataset '$dataset' (known: ml-20m, ml-1m, ml-100k, synthetic, synthetic-ml-100k, synthetic-ml-1m, synthetic-ml-20m, or the path of a CSV file)"
            exit 2
        fi
        ;;
esac
if [ -n "$custom_file" ]; then
    name="$(basename "$custom_file")"
    name="${name%.*}"
    [ -n "$name" ] || name="custom"
else
    name="$dataset"
fi

data_root="$(absolute "${DATA_ROOT:-$here/data}")"
raw_dir="$(absolute "${2:-$data_root/$name}")"
cache_dir="$(absolute "${3:-$data_root/cache/$name}")"
read -r -a convert_args <<< "${CONVERT_ARGS:-}"
read -r -a synthetic_args <<< "${SYNTHETIC_ARGS:-}"

if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && command -v python > /dev/null 2>&1; then
    python="python"
elif [ -x "$here/.venv/bin/python" ]; then
    python="$here/.venv/bin/python"
else
    python="python3"
fi

cd "$here"

if [ -n "$custom_file" ]; then
    raw_file="$custom_file"
elif [ -n "$preset" ]; then
    raw_file="$raw_dir/ratings.csv"
    format="ml-20m"
else
    raw_file="$raw_dir/$raw_name"
    # Also accept the zip's files unpacked straight into RAW_DIR (RAW_DIR/u.data, ...).
    if [ ! -f "$raw_file" ] && [ -f "$raw_dir/$(basename "$raw_name")" ]; then
        raw_file="$raw_dir/$(basename "$raw_name")"
    fi
fi

# 1. A valid cache is all we need. convert.py --check first restores a cache that an interrupted run
#    left moved aside, and removes the temporary directories of killed runs.
if "$python" convert.py --path "$raw_file" --output "$cache_dir" --check > /dev/null 2>&1; then
    echo "$cache_dir: the $name cache is ready (delete it to rebuild)"
    for variable in CONVERT_ARGS SYNTHETIC_ARGS; do
        if [ -n "${!variable:-}" ]; then
            echo "$prog: note: $variable ignored because the cache already exists" >&2
        fi
    done
    exit 0
fi

# 2. The raw ratings.
if [ -n "$preset" ]; then
    if [ -f "$raw_file" ]; then
        echo "$raw_file: using the synthetic ratings made earlier"
        if [ -n "${SYNTHETIC_ARGS:-}" ]; then
            echo "$prog: note: SYNTHETIC_ARGS ignored because $raw_file exists" >&2
        fi
    else
        "$python" synthetic.py --preset "$preset" --output "$raw_file" ${synthetic_args[@]+"${synthetic_args[@]}"}
    fi
elif [ -z "$custom_file" ] && [ ! -f "$raw_file" ]; then
    # download_dataset.sh checks a zip already in RAW_DIR and unpacks it, or downloads one
    "$here/download_dataset.sh" "$name" "$raw_dir" || exit $?
    if [ ! -f "$raw_file" ]; then
        err "$raw_file is still missing after getting $name"
        exit 1
    fi
fi

# 3. Convert.
"$python" convert.py --path "$raw_file" --output "$cache_dir" --format "$format" \
    ${convert_args[@]+"${convert_args[@]}"}
echo "$cache_dir: the $name cache is ready; train with: python ncf.py --data $cache_dir"
