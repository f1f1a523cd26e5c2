"""Benchmark convert.py against a bare pandas.read_csv of the same file, in one run.

    python benchmarks/convert_bench.py                      # ml-20m-shaped synthetic file (~20M rows)
    python benchmarks/convert_bench.py --preset ml-100k     # a few seconds: a smoke test
    python benchmarks/convert_bench.py --csv data/bench.csv --repeats 3 --json results/convert_bench.json
    python benchmarks/convert_bench.py --ratings 5000000 --repeated_share 0.55   # also a file with repeats

Steps: write the synthetic CSV with synthetic.py (or reuse --csv when it exists; a --csv that does not
exist yet is written there and kept), read it once to warm the page cache, then for each repeat
  (a) run `pandas.read_csv(path)` (default engine, all columns) in a child process: the time of the
      call alone, and the wall time of the whole process (interpreter start, `import pandas`, exit);
  (b) run `convert.py --format ml-20m` end to end as a child process: wall time and peak RSS;
  (b') run a process that only imports torch: the least any program that writes torch.save files (as
      convert.py does) can take, whatever the file;
  (c) with --repeated_share S: run convert.py likewise on a file of the same number of rows in which
      a share S of the rows repeat a (user, item) pair of the same file (an interaction log's plays
      or clicks), made from the synthetic file: each such row takes the item of another row of its
      user, and keeps its own timestamp, so a repeat may come before the pair's first line;
the order of the steps rotates from one repeat to the next.
Each measured command runs under its own small wrapper process, so getrusage(RUSAGE_CHILDREN)
there sees that command alone (not the generator, not the other measurement). Times are the best
of the repeats, peak RSS the largest. Each process's CPU time (user + system, its threads and children
included) is printed too: on a machine that other work shares, a process gets only a share of the cores
(with Linux's autogroups, one per session whatever its threads), so wall-time ratios swing with that
work while CPU times barely move.
The bars (issue "Speed and memory") are for the ml-20m preset:
convert.py <= 60 s, <= 6 GB peak RSS, <= 2.5x the read_csv time; with repeats, convert.py on the file
with repeats <= 1.5x its time on the file without (issue "First run and real-world data"). Two ratios
to read_csv are printed: convert.py's process against read_csv's process (like for like), and against
the read_csv call alone (stricter: convert.py's interpreter start and imports count, read_csv's do not).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from utils import write_results

ROOT = Path(__file__).resolve().parents[1]

BARS = {"convert_s": 60.0, "convert_peak_rss_gb": 6.0, "ratio": 2.5, "ratio_to_call": 2.5}
REPEATS_BAR = 1.5  # convert.py on the file with repeats, over the file without
READ_CSV_CHILD = """
import sys, time
import pandas as pd
start = time.perf_counter()
frame = pd.read_csv(sys.argv[1])
print(time.perf_counter() - start, len(frame))
"""
IMPORT_TORCH_CHILD = "import torch"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="ml-20m", help="synthetic.py preset to generate (default ml-20m)")
    parser.add_argument(
        "--ratings", type=int, help="about this many rows (synthetic.py --ratings; default: the preset.s)"
    )
    parser.add_argument(
        "--repeated_share", type=float, help="also convert a file of as many rows, this share of them repeated pairs"
    )
    parser.add_argument("--csv", type=Path, help="ratings CSV (ml-20m layout) to use; generated there if absent")
    parser.add_argument("--repeats", type=int, default=1, help="measure each step this many times")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--workdir", type=Path, help="where temporary files go (default: the system temp dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    parser.add_argument("--measure-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args()


def measure_child(command):
    """Run in the wrapper process: run COMMAND, then report its wall time, peak RSS and output as JSON."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_bytes = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # Linux reports KiB
    report = {"rc": result.returncode, "wall_s": wall, "cpu_s": [usage.ru_utime, usage.ru_stime]}
    report["peak_rss_bytes"] = peak_bytes
    report |= {"stdout": result.stdout, "stderr": result.stderr}
    print(json.dumps(report))


def measure(command):
    """Wall time, CPU time and peak RSS of COMMAND alone, via a fresh wrapper process."""
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--measure-child", *map(str, command)]
    result = subprocess.run(wrapper, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"convert_bench.py: error: the measuring wrapper failed: {result.stderr.strip()}")
    report = json.loads(result.stdout)
    if report["rc"] != 0:
        sys.exit(f"convert_bench.py: error: {' '.join(map(str, command))} failed:\n{report['stderr'].strip()}")
    return report


def warm_page_cache(path):
    with open(path, "rb") as file:
        while file.read(1 << 24):
            pass


def status(text):
    print(text, file=sys.stderr, flush=True)


def with_repeats(source, output, share, seed=0):
    """Write `source` (ml-20m layout, grouped by user) again with `share` of its rows turned into repeats:
    each such row takes the item of one of its user's other rows that stay as they are (a user's first
    row always does), keeping its own timestamp and rating."""
    table = pacsv.read_csv(source)
    users, items = table.column("userId").to_numpy(), table.column("movieId").to_numpy().copy()
    rng = np.random.default_rng(seed)
    first = np.r_[True, users[1:] != users[:-1]]
    repeated = (rng.random(len(users)) < share * len(users) / (~first).sum()) & ~first
    originals = np.flatnonzero(~repeated)
    low = np.searchsorted(users[originals], users[repeated])
    high = np.searchsorted(users[originals], users[repeated], side="right")
    items[repeated] = items[originals[low + (rng.random(len(low)) * (high - low)).astype(np.int64)]]
    table = table.set_column(1, "movieId", pa.array(items))
    with open(output, "wb") as file:
        file.write(b"userId,movieId,rating,timestamp\n")
        pacsv.write_csv(table, file, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def generate(args, csv, figures):
    status(f"generating {csv} (synthetic.py --preset {args.preset}) ...")
    command = [sys.executable, "synthetic.py", "--preset", args.preset, "--output", str(csv)]
    if args.ratings is not None:
        command += ["--ratings", str(args.ratings)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    figures["generate_s"] = time.perf_counter() - start


def run_benchmark(args, workdir):
    figures = {"preset": args.preset, "cpus": os.cpu_count(), "python": sys.version.split()[0], "generate_s": None}
    name = f"synthetic-{args.preset}" if args.ratings is None else f"synthetic-{args.preset}-{args.ratings}"
    csv = args.csv or workdir / f"{name}.csv"
    if not csv.is_file():
        generate(args, csv, figures)
    figures["csv"] = str(csv)
    figures["csv_bytes"] = csv.stat().st_size
    warm_page_cache(csv)
    repeats_csv = None
    if args.repeated_share is not None:
        # beside --csv, kept and reused like it; else in the temporary directory
        repeats_csv = csv.with_name(f"{csv.stem}-repeated{round(args.repeated_share * 100)}.csv")
        if not repeats_csv.is_file():
            status(f"writing {repeats_csv} ({args.repeated_share:.0%} of the rows repeat a pair) ...")
            with_repeats(csv, repeats_csv, args.repeated_share)
        figures["repeats_csv"] = str(repeats_csv)
        warm_page_cache(repeats_csv)

    runs = {"read_csv": [], "read_csv_process": [], "read_csv_rss": [], "convert": [], "convert_rss": []}
    runs |= {"read_csv_cpu": [], "convert_cpu": []}  # [user, system] seconds of each run
    runs |= {"convert_repeats": [], "convert_repeats_rss": [], "import_torch_process": []}

    def measure_read_csv():
        status(f"[{repeat + 1}/{args.repeats}] pandas.read_csv ...")
        report = measure([sys.executable, "-c", READ_CSV_CHILD, csv])
        seconds, rows = report["stdout"].split()
        runs["read_csv"].append(float(seconds))
        runs["read_csv_process"].append(report["wall_s"])
        runs["read_csv_cpu"].append(report["cpu_s"])
        runs["read_csv_rss"].append(report["peak_rss_bytes"])
        figures["rows"] = int(rows)

    def measure_convert(path, key):
        status(f"[{repeat + 1}/{args.repeats}] convert.py {path.name} ...")
        output = workdir / f"cache-{repeat}"
        report = measure([sys.executable, "convert.py", "--path", path, "--format", "ml-20m", "--output", output])
        runs[key].append(report["wall_s"])
        runs[f"{key}_rss"].append(report["peak_rss_bytes"])
        if key == "convert":
            runs["convert_cpu"].append(report["cpu_s"])
        meta = json.loads((output / "metadata.json").read_text())
        figures[f"{key}_cache"] = {k: meta[k] for k in ("n_users", "n_items", "n_train", "n_test", "valid_negative")}
        shutil.rmtree(output)

    def measure_import_torch():
        status(f"[{repeat + 1}/{args.repeats}] import torch ...")
        runs["import_torch_process"].append(measure([sys.executable, "-c", IMPORT_TORCH_CHILD])["wall_s"])

    steps = [measure_read_csv, lambda: measure_convert(csv, "convert"), measure_import_torch]
    if repeats_csv is not None:
        steps.append(lambda: measure_convert(repeats_csv, "convert_repeats"))
    for repeat in range(args.repeats):
        # the order rotates: a command runs slower right after one that freed much memory (on VMs
        # whose host takes freed memory back), and none should always be the one that follows
        for step in steps[repeat % len(steps) :] + steps[: repeat % len(steps)]:
            step()

    figures |= {
        "repeats": args.repeats,
        "read_csv_runs_s": runs["read_csv"],
        "read_csv_process_runs_s": runs["read_csv_process"],
        "convert_runs_s": runs["convert"],
        "read_csv_process_cpu_runs_s": runs["read_csv_cpu"],
        "convert_cpu_runs_s": runs["convert_cpu"],
        "read_csv_s": min(runs["read_csv"]),
        "read_csv_process_s": min(runs["read_csv_process"]),
        "read_csv_peak_rss_gb": max(runs["read_csv_rss"]) / 1e9,
        "convert_s": min(runs["convert"]),
        "convert_peak_rss_gb": max(runs["convert_rss"]) / 1e9,
        "read_csv_process_cpu_s": min(map(sum, runs["read_csv_cpu"])),
        "convert_cpu_s": min(map(sum, runs["convert_cpu"])),
        "import_torch_process_runs_s": runs["import_torch_process"],
        "import_torch_process_s": min(runs["import_torch_process"]),
    }
    figures["cache"] = figures.pop("convert_cache")
    figures["ratio"] = figures["convert_s"] / figures["read_csv_process_s"]
    figures["ratio_to_call"] = figures["convert_s"] / figures["read_csv_s"]
    figures["cpu_ratio"] = figures["convert_cpu_s"] / figures["read_csv_process_cpu_s"]  # no bar: a diagnostic
    figures["import_torch_ratio"] = figures["import_torch_process_s"] / figures["read_csv_process_s"]  # the floor
    figures["bars"] = dict(BARS)
    figures["meets_bars"] = {key: figures[key] <= bar for key, bar in BARS.items()}
    if repeats_csv is not None:
        figures |= {
            "repeated_share": args.repeated_share,
            "convert_repeats_runs_s": runs["convert_repeats"],
            "convert_repeats_s": min(runs["convert_repeats"]),
            "convert_repeats_peak_rss_gb": max(runs["convert_repeats_rss"]) / 1e9,
            # per repeat: the two runs of one repeat are the closest in time, so the least noisy pair
            "repeats_ratio_runs": [r / n for r, n in zip(runs["convert_repeats"], runs["convert"], strict=True)],
        }
        figures["repeats_ratio"] = figures["convert_repeats_s"] / figures["convert_s"]
        figures["bars"]["repeats_ratio"] = REPEATS_BAR
        figures["meets_bars"]["repeats_ratio"] = figures["repeats_ratio"] <= REPEATS_BAR
    return figures


def cpu_runs(runs):
    return ", ".join(f"{user:.2f} + {system:.2f}" for user, system in runs)


def print_table(figures):
    ok = figures["meets_bars"]
    mark = {True: "yes", False: "NO"}
    generate = "reused" if figures["generate_s"] is None else f"{figures['generate_s']:.1f} s"
    cache = figures["cache"]
    note = "" if figures["preset"] == "ml-20m" else "   (the bars are for the ml-20m preset)"
    rows = [
        f"convert.py benchmark: {figures['csv']}",
        f"  {figures['rows']:,} rows, {figures['csv_bytes'] / 1e6:,.0f} MB, preset {figures['preset']}, "
        f"{figures['cpus']} CPUs, best of {figures['repeats']}",
        f"  cache: {cache['n_users']:,} users, {cache['n_items']:,} items, {cache['n_train']:,} training pairs",
        f"  synthetic.py (generate): {generate}",
        "",
        f"  {'measure':<32}{'measured':>12}{'bar':>10}{'ok':>6}",
        f"  {'pandas.read_csv (call)':<32}{figures['read_csv_s']:>10.2f} s{'':>10}{'':>6}",
        f"  {'pandas.read_csv (process)':<32}{figures['read_csv_process_s']:>10.2f} s{'':>10}{'':>6}",
        f"  {'pandas.read_csv peak RSS':<32}{figures['read_csv_peak_rss_gb']:>9.2f} GB{'':>10}{'':>6}",
        f"  {'convert.py end to end':<32}{figures['convert_s']:>10.2f} s{'<= 60 s':>10}{mark[ok['convert_s']]:>6}",
        f"  {'convert.py peak RSS':<32}{figures['convert_peak_rss_gb']:>9.2f} GB"
        f"{'<= 6 GB':>10}{mark[ok['convert_peak_rss_gb']]:>6}",
        f"  {'convert / read_csv process':<32}{figures['ratio']:>10.2f} x{'<= 2.5 x':>10}{mark[ok['ratio']]:>6}{note}",
        f"  {'convert / read_csv call':<32}{figures['ratio_to_call']:>10.2f} x{'<= 2.5 x':>10}"
        f"{mark[ok['ratio_to_call']]:>6}{note}",
        f"  {'import torch alone (process)':<32}{figures['import_torch_process_s']:>10.2f} s"
        f"   ({figures['import_torch_ratio']:.2f} x the read_csv process: the floor of a torch.save writer)",
        f"  {'pandas.read_csv process CPU':<32}{figures['read_csv_process_cpu_s']:>10.2f} s"
        f"   (user + system per run: {cpu_runs(figures['read_csv_process_cpu_runs_s'])})",
        f"  {'convert.py CPU':<32}{figures['convert_cpu_s']:>10.2f} s"
        f"   (user + system per run: {cpu_runs(figures['convert_cpu_runs_s'])})",
        f"  {'convert / read_csv CPU':<32}{figures['cpu_ratio']:>10.2f} x",
    ]
    if "repeats_ratio" in figures:
        share = f"{figures['repeated_share']:.0%} repeats"
        per_run = ", ".join(f"{ratio:.2f}" for ratio in figures["repeats_ratio_runs"])
        rows += [
            f"  {'convert.py, ' + share:<32}{figures['convert_repeats_s']:>10.2f} s{'':>10}{'':>6}",
            f"  {'convert.py, ' + share + ' RSS':<32}{figures['convert_repeats_peak_rss_gb']:>9.2f} GB{'':>10}{'':>6}",
            f"  {'repeats / no repeats':<32}{figures['repeats_ratio']:>10.2f} x{'<= 1.5 x':>10}"
            f"{mark[ok['repeats_ratio']]:>6}   (per repeat: {per_run})",
        ]
    print("\n".join(rows))


def main():
    args = parse_args()
    if args.measure_child is not None:
        measure_child(args.measure_child)
        return
    if args.repeats < 1:
        sys.exit("convert_bench.py: error: --repeats must be at least 1")
    if args.repeated_share is not None and not 0 <= args.repeated_share < 1:
        sys.exit("convert_bench.py: error: --repeated_share must be at least 0 and below 1")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="convert_bench-", dir=args.workdir))
    try:
        figures = run_benchmark(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(figures)
    if args.json is not None:
        write_results(args.json, figures)
    if args.strict and not all(figures["meets_bars"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
