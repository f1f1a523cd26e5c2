"""What tune.py costs beyond training, and what pruning saves, on the same trials.

    python benchmarks/tune_bench.py --data CACHE --trials 8 -- --model gmf --epochs 6 --amp
    python benchmarks/tune_bench.py --data CACHE --trials 3 --pruners none -- --model gmf --epochs 3

Runs tune.py (a process of its own, timed from start to exit) on a new study without pruning,
then, when asked for, on another one with the median pruner that tries the very same parameters in
the same order (--enqueue). Flags after `--` go to both. Overhead is the share of the process's
wall time spent outside ncf.train's epochs: interpreter start, imports, loading the cache, the
study's bookkeeping, making each trial's model, and reporting to the pruner.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils import needs_extra, write_results

with needs_extra("tune"):
    import optuna

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, required=True, help="cache with a validation split")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--pruners", nargs="+", choices=["none", "median"], default=["none", "median"])
    parser.add_argument("--workdir", type=Path, help="where the studies go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("tune_flags", nargs="*", help="tune.py flags for both runs (after --)")
    return parser.parse_args()


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_study(args, pruner, workdir, enqueue):
    storage = f"sqlite:///{workdir / f'{pruner}.db'}"
    command = [sys.executable, "tune.py", "--data", str(args.data), "--trials", str(args.trials)]
    command += ["--storage", storage, "--study_name", pruner, "--pruner", pruner, "--output", str(workdir / "b.json")]
    command += [f"--enqueue={params}" for params in enqueue] + args.tune_flags
    start, cpu_start = time.time(), children_cpu_seconds()
    subprocess.run(command, cwd=ROOT, check=True)
    wall, cpu = time.time() - start, children_cpu_seconds() - cpu_start
    trials = optuna.load_study(study_name=pruner, storage=storage).trials
    training = sum(trial.user_attrs["training_seconds"] for trial in trials)
    in_trials = sum((trial.datetime_complete - trial.datetime_start).total_seconds() for trial in trials)
    pruned = [trial for trial in trials if trial.state == optuna.trial.TrialState.PRUNED]
    complete = [trial.value for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    return trials, {
        "trials": len(trials),
        "pruned": len(pruned),
        "epochs": sum(len(trial.intermediate_values) for trial in trials),
        "wall_s": wall,
        "cpu_s": cpu,
        "training_s": training,
        "overhead": 1 - training / wall,
        "overhead_in_trials": 1 - training / in_trials,
        "trials_per_hour": len(trials) / wall * 3600,
        "best": max(complete),
        "median_complete": statistics.median(complete),
    }


def main():
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ncf-tune-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results, enqueue = {}, []
    for pruner in args.pruners:
        trials, results[pruner] = run_study(args, pruner, workdir, enqueue)
        enqueue = enqueue or [",".join(f"{name}={value}" for name, value in trial.params.items()) for trial in trials]
    print("\n| pruner | trials | pruned | epochs trained | wall [s] | CPU [s] | trials/hour | overhead: process | "
          "overhead: in trials | best value | median complete |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pruner, r in results.items():
        print(
            f"| {pruner} | {r['trials']} | {r['pruned']} | {r['epochs']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['trials_per_hour']:.1f} | {r['overhead']:.1%} | {r['overhead_in_trials']:.1%} | {r['best']:.4f} | "
            f"{r['median_complete']:.4f} |"
        )
    if len(results) == 2:
        none, median = results["none"], results["median"]
        print(
            f"\npruning saved {1 - median['epochs'] / none['epochs']:.0%} of the epochs and "
            f"{1 - median['wall_s'] / none['wall_s']:.0%} of the wall time "
            f"({1 - median['cpu_s'] / none['cpu_s']:.0%} of the CPU time) on the same {args.trials} trials"
        )
    if args.json is not None:
        write_results(args.json, results)


if __name__ == "__main__":
    main()
