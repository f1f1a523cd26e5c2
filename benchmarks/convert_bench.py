"""Benchmark convert.py against a bare pandas.read_csv of the same file, in one run.

    python benchmarks/convert_bench.py                      # ml-20m-shaped synthetic file (~20M rows)
    python benchmarks/convert_bench.py --preset ml-100k     # a few seconds: a smoke test
    python benchmarks/convert_bench.py --csv data/bench.csv --repeats 3 --json results/convert_bench.json

Steps: write the synthetic CSV with synthetic.py (or reuse --csv when it exists; a --csv that does not
exist yet is written there and kept), read it once to warm the page cache, then for each repeat
  (a) run `pandas.read_csv(path)` (default engine, all columns) in a child process: the time of the
      call alone, and the wall time of the whole process (interpreter start, `import pandas`, exit);
  (b) run `convert.py --format ml-20m` end to end as a child process: wall time and peak RSS;
(a) then (b) in the first, third, ... repeat, (b) then (a) in the second, fourth, ...
Each measured command runs under its own small wrapper process, so getrusage(RUSAGE_CHILDREN)
there sees that command alone (not the generator, not the other measurement). Times are the best
of the repeats, peak RSS the largest. The bars (issue "Speed and memory") are for the ml-20m preset:
convert.py <= 60 s, <= 6 GB peak RSS, <= 2.5x the read_csv time. Two ratios are printed: convert.py's
process against read_csv's process (like for like), and against the read_csv call alone (stricter:
convert.py's interpreter start and imports count, read_csv's do not).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import write_json  # noqa: E402

BARS = {"convert_s": 60.0, "convert_peak_rss_gb": 6.0, "ratio": 2.5, "ratio_to_call": 2.5}
READ_CSV_CHILD = """
import sys, time
import pandas as pd
start = time.perf_counter()
frame = pd.read_csv(sys.argv[1])
print(time.perf_counter() - start, len(frame))
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ml-20m", help="synthetic.py preset to generate (default ml-20m)")
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
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
    report = {"rc": result.returncode, "wall_s": wall, "peak_rss_bytes": peak_bytes}
    report |= {"stdout": result.stdout, "stderr": result.stderr}
    print(json.dumps(report))


def measure(command):
    """Wall time and peak RSS of COMMAND alone, via a fresh wrapper process."""
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


def run_benchmark(args, workdir):
    figures = {"preset": args.preset, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    csv = args.csv
    if csv is not None and csv.is_file():
        figures["generate_s"] = None
    else:
        csv = csv or workdir / f"synthetic-{args.preset}.csv"
        status(f"generating {csv} (synthetic.py --preset {args.preset}) ...")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "synthetic.py", "--preset", args.preset, "--output", str(csv)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        figures["generate_s"] = time.perf_counter() - start
    figures["csv"] = str(csv)
    figures["csv_bytes"] = csv.stat().st_size
    warm_page_cache(csv)

    read_s, read_process_s, read_rss, convert_s, convert_rss = [], [], [], [], []

    def measure_read_csv():
        status(f"[{repeat + 1}/{args.repeats}] pandas.read_csv ...")
        report = measure([sys.executable, "-c", READ_CSV_CHILD, csv])
        seconds, rows = report["stdout"].split()
        read_s.append(float(seconds))
        read_process_s.append(report["wall_s"])
        read_rss.append(report["peak_rss_bytes"])
        figures["rows"] = int(rows)

    def measure_convert():
        status(f"[{repeat + 1}/{args.repeats}] convert.py ...")
        output = workdir / f"cache-{repeat}"
        report = measure([sys.executable, "convert.py", "--path", csv, "--format", "ml-20m", "--output", output])
        convert_s.append(report["wall_s"])
        convert_rss.append(report["peak_rss_bytes"])
        meta = json.loads((output / "metadata.json").read_text())
        figures["cache"] = {key: meta[key] for key in ("n_users", "n_items", "n_train", "n_test", "valid_negative")}
        shutil.rmtree(output)

    for repeat in range(args.repeats):
        # the order alternates: a command runs slower right after one that freed much memory (on VMs
        # whose host takes freed memory back), and neither should always be the one that follows
        steps = (measure_read_csv, measure_convert) if repeat % 2 == 0 else (measure_convert, measure_read_csv)
        for step in steps:
            step()

    figures |= {
        "repeats": args.repeats,
        "read_csv_runs_s": read_s,
        "read_csv_process_runs_s": read_process_s,
        "convert_runs_s": convert_s,
        "read_csv_s": min(read_s),
        "read_csv_process_s": min(read_process_s),
        "read_csv_peak_rss_gb": max(read_rss) / 1e9,
        "convert_s": min(convert_s),
        "convert_peak_rss_gb": max(convert_rss) / 1e9,
    }
    figures["ratio"] = figures["convert_s"] / figures["read_csv_process_s"]
    figures["ratio_to_call"] = figures["convert_s"] / figures["read_csv_s"]
    figures["bars"] = BARS
    figures["meets_bars"] = {key: figures[key] <= bar for key, bar in BARS.items()}
    return figures


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
        f"  {'measure':<28}{'measured':>12}{'bar':>10}{'ok':>6}",
        f"  {'pandas.read_csv (call)':<28}{figures['read_csv_s']:>10.2f} s{'':>10}{'':>6}",
        f"  {'pandas.read_csv (process)':<28}{figures['read_csv_process_s']:>10.2f} s{'':>10}{'':>6}",
        f"  {'pandas.read_csv peak RSS':<28}{figures['read_csv_peak_rss_gb']:>9.2f} GB{'':>10}{'':>6}",
        f"  {'convert.py end to end':<28}{figures['convert_s']:>10.2f} s{'<= 60 s':>10}{mark[ok['convert_s']]:>6}",
        f"  {'convert.py peak RSS':<28}{figures['convert_peak_rss_gb']:>9.2f} GB"
        f"{'<= 6 GB':>10}{mark[ok['convert_peak_rss_gb']]:>6}",
        f"  {'convert / read_csv process':<28}{figures['ratio']:>10.2f} x{'<= 2.5 x':>10}{mark[ok['ratio']]:>6}{note}",
        f"  {'convert / read_csv call':<28}{figures['ratio_to_call']:>10.2f} x{'<= 2.5 x':>10}"
        f"{mark[ok['ratio_to_call']]:>6}{note}",
    ]
    print("\n".join(rows))


def main():
    args = parse_args()
    if args.measure_child is not None:
        measure_child(args.measure_child)
        return
    if args.repeats < 1:
        sys.exit("convert_bench.py: error: --repeats must be at least 1")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="convert_bench-", dir=args.workdir))
    try:
        figures = run_benchmark(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(figures)
    if args.json is not None:
        write_json(args.json, figures)
    if args.strict and not all(figures["meets_bars"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
