"""Time the `full` evaluation protocol (every user's test item ranked against its whole unseen catalogue).

    python benchmarks/full_ranking_bench.py                      # ML-1m users 1-2999, default model size
    python benchmarks/full_ranking_bench.py --data data/cache/ml-1m --load_checkpoint_path checkpoints/model.pth
    python benchmarks/full_ranking_bench.py --threads 1 2 --repeats 3 --json results/full_ranking.json

Without --data, the ratings file (default: ../shared/data/ml-1m/ratings.PARTIAL-users-1-2999.dat, 2,999 users
x 3,615 items) is copied as ml-1m/ratings.dat into a temporary directory and converted with
`convert.py --format ml-1m`. The model has the default sizes (factors 64, layers 256 256 128 64), randomly
initialised unless --load_checkpoint_path is given: the work does not depend on the weights.

For every precision (fp32; bf16 = the `--amp` path of ncf.py on CPU, torch.autocast('cpu', bfloat16)),
thread count and --valid_batch_size, ncf.evaluate runs the whole evaluation (scoring, masking training
items, ranking, loss) as an epoch's evaluation does; the evaluator is built once beforehand (its build
time is printed apart). The `reference` protocol (100 cached negatives per user) is timed for comparison.
Each row reports the best wall time of --repeats runs, the process CPU time of that run (on a shared
machine a wall time far above cpu/threads means the process waited for a core), and scored pairs per
second. The issue's bar: full ranking on this file in under 5 s on a 2-core machine.
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ncf
from dataloading import load_cache, make_evaluator
from neumf import NeuMF
from utils import load_model_weights, write_results

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_RATINGS = ROOT.parent / "shared" / "data" / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat"
BAR_SECONDS = 5.0


def batch_size(text):
    """An integer, or a power written 2**20 or 2^20."""
    base, _, exponent = text.replace("**", "^").partition("^")
    value = int(base) ** int(exponent) if exponent else int(base)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be at least 1, got {text}")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, help="a cache written by convert.py (default: convert --ratings)")
    parser.add_argument("--ratings", type=Path, default=DEFAULT_RATINGS, help="ML-1m ratings.dat to convert")
    parser.add_argument("--load_checkpoint_path", type=Path, help="model.pth to score with (default: random)")
    parser.add_argument("-f", "--factors", type=int, default=64)
    parser.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64])
    parser.add_argument(
        "--batch_sizes", nargs="+", type=batch_size, default=[2**18, 2**20, 2**22],
        help="--valid_batch_size values of the full protocol (2**20 or 2^20 allowed)",
    )  # fmt: skip
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--protocols", nargs="+", choices=["full", "reference", "exact"], default=["full", "reference"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the best wall time is reported")
    parser.add_argument("-k", "--topk", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser.parse_args()


def prepare_cache(ratings, workdir):
    """Copy the ratings as ml-1m/ratings.dat and convert them, as prepare_dataset.sh would."""
    if not ratings.is_file():
        sys.exit(f"{ratings} not found; pass --ratings or --data")
    raw = workdir / "ml-1m" / "ratings.dat"
    raw.parent.mkdir(parents=True)
    shutil.copyfile(ratings, raw)
    cache = workdir / "cache"
    command = [sys.executable, str(ROOT / "convert.py"), "--format", "ml-1m", "--path", str(raw)]
    subprocess.run([*command, "--output", str(cache)], check=True, capture_output=True, text=True)
    return cache


def autocast_for(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def time_evaluation(model, data, protocol, precision, batch_size, threads, repeats, topk):
    torch.set_num_threads(threads)
    args = argparse.Namespace(eval_protocol=protocol, valid_batch_size=batch_size, topk=topk)
    start = time.perf_counter()
    evaluator = make_evaluator(data, "test", args.eval_protocol, 0, 1, torch.device("cpu"))
    setup = time.perf_counter() - start
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        hr, ndcg, _, pairs = ncf.evaluate(model, evaluator, args, autocast_for(precision))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best["seconds"]:
            best = {"seconds": wall, "cpu_seconds": cpu}
    row = {"protocol": protocol, "precision": precision, "threads": threads, "batch": batch_size}
    return row | best | {"pairs": pairs, "pairs_per_s": pairs / best["seconds"], "hr": hr, "ndcg": ndcg, "setup": setup}


def print_row(row, topk):
    batch = f"2^{row['batch'].bit_length() - 1}" if row["batch"] & (row["batch"] - 1) == 0 else str(row["batch"])
    print(
        f"| {row['protocol']:9} | {row['precision']:9} | {row['threads']:7} | {batch:>5} | {row['seconds']:7.2f} | "
        f"{row['cpu_seconds']:7.2f} | {row['pairs_per_s'] / 1e6:8.3f} M | {row['hr']:.4f} | {row['ndcg']:.4f} | "
        f"{row['setup']:5.2f} |",
        flush=True,
    )


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="full_ranking_bench_") as workdir:
        cache = args.data or prepare_cache(args.ratings, Path(workdir))
        data = load_cache(cache)
    torch.manual_seed(args.seed)
    model = NeuMF(data.n_users, data.n_items, args.factors, args.layers).eval()
    if args.load_checkpoint_path:
        load_model_weights(model, args.load_checkpoint_path)
    print(
        f"{cache}: {data.n_users:,} users x {data.n_items:,} items; NeuMF factors {args.factors}, layers "
        f"{' '.join(map(str, args.layers))} ({'checkpoint' if args.load_checkpoint_path else 'random weights'}); "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    k = f"{args.topk:<2}"
    print(f"| protocol  | precision | threads | batch | seconds | cpu s   | pairs/s    | HR@{k}  | NDCG@{k}| setup |")
    print("|-----------|-----------|---------|-------|---------|---------|------------|--------|--------|-------|")
    rows = []
    for protocol in args.protocols:
        batch_sizes = args.batch_sizes if protocol == "full" else [2**20]  # the others: ncf.py's default
        for precision in args.precisions:
            # warm-up: the first bf16 matrix products build their kernels
            with torch.inference_mode(), autocast_for(precision):
                model.score_grid(torch.arange(2), torch.arange(data.n_items))
            for threads in args.threads:
                for batch_size in batch_sizes:
                    row = time_evaluation(
                        model, data, protocol, precision, batch_size, threads, args.repeats, args.topk
                    )
                    print_row(row, args.topk)
                    rows.append(row)
    full = [row for row in rows if row["protocol"] == "full"]
    if full:
        best = min(full, key=lambda row: row["seconds"])
        verdict = "meets" if best["seconds"] < BAR_SECONDS else "misses"
        print(
            f"best full ranking: {best['seconds']:.2f} s ({best['precision']}, {best['threads']} thread(s), "
            f"batch {best['batch']}): {verdict} the {BAR_SECONDS:.0f} s bar; load average now {os.getloadavg()[0]:.1f}"
        )
    if args.json is not None:
        write_results(args.json, rows)


if __name__ == "__main__":
    main()
