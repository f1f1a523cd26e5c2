"""Training stability: one ncf.py configuration over many seeds, on a cache with a validation split.

    python benchmarks/stability.py --data CACHE --seeds 20 -- --model gmf -e 30 --patience 5 -b 8192 -l 0.002
    python benchmarks/stability.py --data CACHE --seeds 10 --workdir runs/stability --json stability.json -- ...

Every seed is an ncf.py run of its own (the flags after `--`, plus --seed, --log_path and
--checkpoint_dir), read back from its DLLogger log. Prints the mean, standard deviation, minimum and
maximum over the seeds of the best validation HR@10 and of the test HR@10 at the epoch it selects,
and writes their box plot (plot.py's best_hr.png) into --workdir.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import plot
from utils import CliError, read_log, run_main, run_summary, write_results

ROOT = Path(__file__).resolve().parents[1]

OWN_FLAGS = ("--data", "--seed", "-s", "--log_path", "--checkpoint_dir", "--mode", "--resume")
METRICS = {  # key in the results: what the table calls it
    "val_hr@10": "best validation HR@10",
    "hr@10": "test HR@10 at that epoch",
    "epoch": "selected epoch",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, required=True, help="cache with a validation split")
    parser.add_argument("--seeds", type=int, default=20, help="number of runs")
    parser.add_argument("--first_seed", type=int, default=1, help="the runs' seeds are this and the next ones")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once; on a CPU with OMP_NUM_THREADS=1 (two one-thread runs beat one two-thread run)",
    )
    parser.add_argument("--workdir", type=Path, help="logs, checkpoints and best_hr.png (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("ncf_flags", nargs="*", help="ncf.py flags of every run (after --)")
    args = parser.parse_args()
    if args.seeds < 2:
        raise CliError(f"--seeds must be at least 2 for a spread, got {args.seeds}")
    if args.jobs < 1:
        raise CliError(f"--jobs must be at least 1, got {args.jobs}")
    own = [flag for flag in args.ncf_flags if flag.split("=")[0] in OWN_FLAGS]
    if own:
        raise CliError(f"{own[0]} is set by stability.py; give the ncf.py flags of the configuration only")
    try:
        validation = json.loads((args.data / "metadata.json").read_text()).get("validation")
    except (OSError, ValueError):
        raise CliError(f"{args.data} is not a data cache (no readable metadata.json)") from None
    if not validation:
        raise CliError(f"{args.data} has no validation split; make the cache with convert.py --validation")
    return args


def run(args, seed, workdir):
    """One ncf.py run: its validation-selected epoch's figures, and its wall time."""
    log, checkpoints = workdir / "logs" / f"seed{seed}.json", workdir / "checkpoints" / f"seed{seed}"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    command = [sys.executable, "ncf.py", "--data", args.data, "--seed", seed, *args.ncf_flags]
    command += ["--log_path", log, "--checkpoint_dir", checkpoints]
    start = time.time()
    result = subprocess.run([str(c) for c in command], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise CliError(f"ncf.py failed with seed {seed}: {lines[-1] if lines else f'exit {result.returncode}'}")
    final = run_summary(read_log(log))
    figures = {"val_hr@10": final["best_val_accuracy"], "hr@10": final["best_accuracy"], "epoch": final["best_epoch"]}
    return figures | {"seed": seed, "seconds": time.time() - start}, log


def main():
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ncf-stability-"))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with ThreadPoolExecutor(args.jobs) as pool:  # threads that wait for ncf.py processes
        results = pool.map(lambda seed: run(args, seed, workdir), seeds)
        runs, logs = [], []
        for seed, (figures, log) in zip(seeds, results, strict=True):
            runs.append(figures)
            logs.append(log)
            print(
                f"seed {seed}: best validation HR@10 {figures['val_hr@10']:.4f}, test HR@10 {figures['hr@10']:.4f} "
                f"at epoch {figures['epoch']}  {figures['seconds']:.0f} s",
                flush=True,
            )
    summary = {}
    for key in METRICS:
        values = [r[key] for r in runs]
        summary[key] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values),
            "min": min(values),
            "max": max(values),
        }
    print(f"\n{args.seeds} seeds of ncf.py {' '.join(args.ncf_flags)}\n")
    print("| metric | mean | std | min | max |\n|---|---|---|---|---|")
    for key, name in METRICS.items():
        print(f"| {name} | " + " | ".join(f"{summary[key][stat]:.4f}" for stat in ("mean", "std", "min", "max")) + " |")
    parsed = [run for log in logs for run in plot.read_runs(log)]
    figure = plot.box_figure(plot.configurations(parsed), plot.topk(parsed))
    figure.savefig(workdir / "best_hr.png", dpi=100)
    print(f"\nbox plot: {workdir / 'best_hr.png'}")
    if args.json is not None:
        write_results(args.json, {"ncf_flags": args.ncf_flags, "runs": runs, "summary": summary})


if __name__ == "__main__":
    run_main(main)
