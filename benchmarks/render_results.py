"""Render docs/results.md, and the results table of README.md, from the JSON the benchmarks wrote.

    python benchmarks/render_results.py            # after adding or replacing a file in benchmarks/results/
    python benchmarks/render_results.py --check    # exit 1 when docs/results.md or README.md is out of date

Each benchmarks/results/*.json is what a benchmark's --json wrote (utils.write_results):
{"provenance": {"command", "date", "machine", "versions"}, "results": ...}. Each file becomes a section
of docs/results.md, in file-name order, laid out by the benchmark named in its command (a generic
table for a benchmark without a layout here). README.md's table between RESULTS_BEGIN and RESULTS_END
comes from results/accuracy-best.json. Nothing but these files goes into the output, so the same files
always give the same bytes.
"""

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
HEADLINE = "accuracy-best.json"  # the README's table: the recommended model per dataset
RESULTS_BEGIN = "<!-- results: rendered by benchmarks/render_results.py from benchmarks/results/accuracy-best.json -->"
RESULTS_END = "<!-- end of results -->"
REGENERATE = "python benchmarks/render_results.py"


def number(value):
    """A figure as the tables show it: thousands separated above 1000, else 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def mean_std(values):
    """'mean ± std' of a figure over seeds, with 4 decimals (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def option(command, flag):
    """The value of `flag` in a shell command line, or None."""
    words = shlex.split(command)
    return words[words.index(flag) + 1] if flag in words[:-1] else None


# --- one layout per benchmark: (what was measured, its table) -----------------------------------------


def accuracy(results, command):
    what = (
        "Test HR@10 / NDCG@10 of `ncf.py` recipes on real MovieLens data (reference protocol, 100 sampled "
        "negatives), mean ± std over seeds. *Selected*: trained without each user's validation item, at the epoch "
        "of best validation HR@10; *refit*: the same recipe and seed trained on training + validation items for "
        "that many epochs, last epoch. The test set chooses nothing. Wall time: validation run and refit together."
    )
    header = ["data", "model", "seeds", "selected: test HR@10", "selected: test NDCG@10", "refit: test HR@10"]
    header += ["refit: test NDCG@10", "validation HR@10", "selected epoch / epochs run", "wall time per seed [s]"]
    rows = []
    for key, runs in results.items():
        dataset, model = key.split(" ", 1)
        figures = [mean_std([run[name] for run in runs]) for name in ("hr@10", "ndcg@10", "refit_hr@10")]
        figures += [mean_std([run[name] for run in runs]) for name in ("refit_ndcg@10", "val_hr@10")]
        epochs = ", ".join(f"{run['epoch']}/{run['epochs']}" for run in runs)
        seeds = ", ".join(str(run["seed"]) for run in runs)
        rows.append([dataset, model, seeds, *figures, epochs, number(statistics.mean(r["seconds"] for r in runs))])
    return what, table(header, rows)


def baselines(results, command):
    data = option(command, "--data")
    protocol = option(command, "--eval_protocol") or "reference"
    what = (
        f"Classic recommenders on the cache `{Path(data).name if data else '?'}` under `ncf.py`'s metrics "
        f"({protocol} protocol): each method's settings chosen on validation HR@10, then scored on test "
        "(*selected*), and refit on training + validation items (*refit*)."
    )
    header = ["method", "settings", "validation HR@10", "validation NDCG@10", "test HR@10", "test NDCG@10"]
    header += ["refit: test HR@10", "refit: test NDCG@10", "fit [s]", "all settings [s]", "all settings [CPU s]"]
    rows = []
    for method, result in results.items():
        settings = " ".join(f"{key}={value:g}" for key, value in result["settings"].items()) or "-"
        figures = [f"{result[name]:.4f}" for name in ("val_hr@10", "val_ndcg@10", "hr@10", "ndcg@10")]
        figures += [f"{result[name]:.4f}" for name in ("refit_hr@10", "refit_ndcg@10")]
        seconds = [f"{result[name]:.1f}" for name in ("fit_seconds", "seconds", "cpu_seconds")]
        rows.append([method, settings, *figures, *seconds])
    return what, table(header, rows)


def train_bench(results, command):
    runs = results if isinstance(results, list) else [results]
    what = (
        "Training throughput of `ncf.py`'s whole pipeline (negative sampling, global shuffle, batches, steps) "
        "against a bare step on one pre-made batch, and evaluation speed (reference protocol), default NeuMF."
    )
    header = ["data", "users x items", "device", "precision", "batch", "epoch [s]", "pipeline [samples/s]"]
    header += ["bare step [samples/s]", "pipeline / bare", "eval [users/s]", "peak RSS [GB]", "peak device [GB]"]
    rows = []
    for r in runs:
        precision = r["precision"] + (" compiled" if r["compiled"] else "")
        rows.append(
            [r["data"], f"{r['users']:,} x {r['items']:,}", r["device"], precision, number(r["batch_size"])]
            + [f"{r['epoch_seconds']:.2f}", number(r["pipeline_samples_per_s"]), number(r["bare_step_samples_per_s"])]
            + [f"{r['pipeline_over_bare']:.2f}", number(r["eval_users_per_s"]), f"{r['peak_host_rss_gb']:.2f}"]
            + ["-" if r["peak_device_memory_gb"] is None else f"{r['peak_device_memory_gb']:.2f}"]
        )
    return what, table(header, rows)


def convert_bench(results, command):
    r = results
    cache = r["cache"]
    what = (
        f"`convert.py` as a whole process against `pandas.read_csv` of the same file (the call alone, and a whole "
        f"process), best of {r['repeats']} runs each: {r['rows']:,} rows ({r['csv_bytes'] / 1e6:,.0f} MB, synthetic "
        f"{r['preset']} shape: {cache['n_users']:,} users, {cache['n_items']:,} items)."
    )
    bars, met = r["bars"], r["meets_bars"]

    def row(label, key, unit, bar_unit=None):
        bar = f"≤ {bars[key]:g} {bar_unit or unit}" if key in bars else ""
        return [label, f"{r[key]:.2f} {unit}", bar, {True: "yes", False: "no"}.get(met.get(key), "")]

    rows = [
        row("`pandas.read_csv`, the call", "read_csv_s", "s"),
        row("`pandas.read_csv`, a whole process", "read_csv_process_s", "s"),
        row("`convert.py`, a whole process", "convert_s", "s"),
        row("`convert.py` peak RSS", "convert_peak_rss_gb", "GB"),
        row("convert / read_csv process", "ratio", "x"),
        row("convert / read_csv call", "ratio_to_call", "x"),
    ]
    if "import_torch_process_s" in r:  # results written before it was measured lack it
        rows += [
            row("a process that only imports torch", "import_torch_process_s", "s"),
            row("import torch / read_csv process", "import_torch_ratio", "x"),
        ]
    if "repeats_ratio" in r:
        share = f"{r['repeated_share']:.0%} of the rows repeating a pair"
        rows += [
            row(f"`convert.py`, {share}", "convert_repeats_s", "s"),
            row(f"`convert.py` peak RSS, {share}", "convert_repeats_peak_rss_gb", "GB"),
            row("with repeats / without", "repeats_ratio", "x"),
        ]
    return what, table(["measure", "measured", "bar", "met"], rows)


def sharding_arithmetic(results, command):
    a = results["assumptions"]
    what = (
        f"Arithmetic, not a measurement ([sharding](sharding.md) gives the formulas): {a['model']} with tables of "
        f"{' + '.join(map(str, a['table_widths']))} floats per user and per item, {a['comm_bytes']} bytes per float "
        "sent. Per step and per GPU, MB each GPU sends (and receives): DDP's ring all-reduce of the replicated "
        "embedding gradients; TorchRec's all-to-all of the looked-up rows and their gradients (table-, column-, "
        "row-wise with sequence embeddings); row-wise with pooled embeddings (a reduce-scatter of the global "
        "batch); the dense layers' all-reduce, the same in every layout. Then the largest catalogue (users + items "
        f"rows) on GPUs of {a['device_memory_gb']:g} GB less {a['headroom']:.0%}: "
        f"{a['replicated_row_bytes']:,.0f} bytes per replicated row, {a['sharded_row_bytes']:,.0f} per sharded row."
    )
    header = ["users x items", "GPUs", "local batch", "DDP all-reduce [MB]", "all-to-all [MB]"]
    header += ["row-wise pooled [MB]", "dense all-reduce [MB]", "all-reduce / all-to-all", "break-even local batch"]
    header += ["fits replicated", "fits sharded"]
    yes = {True: "yes", False: "no"}
    rows = []
    for t in results["traffic"]:
        megabytes = [f"{t[key] / 1e6:,.1f}" for key in ("allreduce_bytes", "alltoall_bytes", "row_wise_pooled_bytes")]
        even = t["break_even_local_batch"]
        ratio = [number(t["allreduce_over_alltoall"]), "-" if even is None else f"{even:,.0f}"]
        rows.append(
            [f"{t['users']:,} x {t['items']:,}", t["gpus"], f"{t['local_batch']:,}", *megabytes]
            + [f"{t['dense_allreduce_bytes'] / 1e6:,.1f}", *ratio, yes[t["fits_replicated"]], yes[t["fits_sharded"]]]
        )
    capacity = [[c["gpus"], f"{c['replicated_rows']:,}", f"{c['sharded_rows']:,}"] for c in results["capacity"]]
    header2 = ["GPUs", "largest catalogue, replicated [rows]", "largest catalogue, sharded [rows]"]
    return what, table(header, rows) + [""] + table(header2, capacity)


def loss_bench(results, command):
    what = (
        f"Whole training epochs of each loss on `{results['data']}` ({results['users']:,} users, "
        f"{results['items']:,} items, {results['positives']:,} positives), {results['model']}, on "
        f"{results['device']}, one loss after the other in one process. A softmax loss's batch holds positives "
        "only and scores its negatives; BCE's holds the positives and their negatives."
    )
    header = ["loss", "batch", "negatives per positive", "epoch [s]", "samples/s", "positives/s", "epoch / BCE's"]
    bce = results["losses"].get("bce", {}).get("epoch_seconds")
    rows = [
        [name, f"{r['batch_size']:,}", f"{r['negatives']:,}", number(r["epoch_seconds"]), number(r["samples_per_s"])]
        + [number(r["positives_per_s"]), "-" if bce is None else f"{r['epoch_seconds'] / bce:.2f}"]
        for name, r in results["losses"].items()
    ]
    return what, table(header, rows)


def sharding_bench(results, command):
    a = results["settings"]
    what = (
        f"The same NeuMF on the same random batches, replicated (DDP) and under each CPU sharding kind: "
        f"{a['users']:,} users x {a['items']:,} items, {a['factors']} + {a['layers'][0] // 2} floats a row, "
        f"{a['optimizer']}, {a['batch_size']:,} samples a step on {a['processes']} gloo processes. Per rank "
        "(the largest): MB of table rows and of table optimizer state (all that a sharded `ncf.py` run keeps of "
        "its tables, transient buffers aside), and seconds per step."
    )
    header = ["tables", "table MB/rank", "optimizer MB/rank", "total / replicated", "step [s]", "step / replicated"]
    rows = [
        ["replicated" if layout == "none" else layout, f"{r['table_bytes'] / 2**20:,.1f}"]
        + [f"{r['optimizer_bytes'] / 2**20:,.1f}", f"{r['bytes_ratio']:.2f}", number(r["step_s"])]
        + [f"{r['step_ratio']:.2f}"]
        for layout, r in results["layouts"].items()
    ]
    return what, table(header, rows)


def generic(results, command):
    """Any other benchmark: a table of its records, or of its figures by name."""
    what = "The benchmark's results as it wrote them."
    records = list(results.items()) if isinstance(results, dict) else list(enumerate(results))
    if records and all(isinstance(value, dict) for _, value in records):
        columns = list(dict.fromkeys(key for _, value in records for key in value))
        rows = [[name, *(cell(value.get(column)) for column in columns)] for name, value in records]
        return what, table(["", *columns], rows)
    return what, table(["figure", "value"], [[name, cell(value)] for name, value in flatten(results)])


def cell(value):
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True).replace("|", "\\|")
    return number(value)


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}{index}.")
    else:
        yield prefix.removesuffix("."), value


LAYOUTS = {
    "benchmarks/accuracy.py": ("NCF accuracy", accuracy),
    "benchmarks/baselines.py": ("Baselines", baselines),
    "benchmarks/train_bench.py": ("Training throughput", train_bench),
    "benchmarks/convert_bench.py": ("Data preparation speed", convert_bench),
    "benchmarks/loss_bench.py": ("Cost of the losses", loss_bench),
    "benchmarks/sharding_arithmetic.py": ("Sharding arithmetic", sharding_arithmetic),
    "benchmarks/sharding_bench.py": ("Sharded tables", sharding_bench),
}


# --- the recommended model against the baselines ------------------------------------------------------

COMPARED = ("val_hr@10", "hr@10", "ndcg@10", "refit_hr@10", "refit_ndcg@10")


def against_baselines(paths):
    """A section comparing accuracy-best.json's model per dataset with the baselines.py rows of the same
    cache (a file whose command's --data names it): the means over seeds, each baseline, and the
    difference to the best baseline figure of each column. Empty without both kinds of file."""
    by_name = {path.name: path for path in paths}
    if HEADLINE not in by_name:
        return []
    baseline_files = {}
    for path in paths:
        provenance, results = read(path)
        data = option(provenance["command"], "--data")
        if script_of(provenance["command"]) == "benchmarks/baselines.py" and data:
            baseline_files[Path(data).name] = results
    lines = []
    for key, runs in read(by_name[HEADLINE])[1].items():
        dataset, model = key.split(" ", 1)
        if dataset not in baseline_files:
            continue
        ncf = [statistics.mean(run[name] for run in runs) for name in COMPARED]
        rows = [[f"NCF {model} (mean of {len(runs)} seeds)", *(f"{value:.4f}" for value in ncf)]]
        others = {method: result for method, result in baseline_files[dataset].items() if method != "popularity"}
        rows += [[method, *(f"{result[name]:.4f}" for name in COMPARED)] for method, result in others.items()]
        best = [max(result[name] for result in others.values()) for name in COMPARED]
        rows.append(["NCF − best baseline", *(f"{value - top:+.4f}" for value, top in zip(ncf, best, strict=True))])
        header = ["", "validation HR@10", "selected: test HR@10", "selected: test NDCG@10"]
        header += ["refit: test HR@10", "refit: test NDCG@10"]
        lines += ["", f"`{dataset}`:", "", *table(header, rows)]
    if not lines:
        return []
    intro = (
        f"The recommended model of `{HEADLINE}` against the baselines of the same cache (the files above; "
        "popularity left out): a positive last row means NCF is ahead of every baseline in that column."
    )
    return ["", "## The recommended model against the baselines", "", intro, *lines]


# --- the page ----------------------------------------------------------------------------------------


def read(path):
    """A results file's provenance and results, or a one-line error naming what is missing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"render_results.py: error: {path}: not readable JSON ({error})")
    provenance = data.get("provenance") if isinstance(data, dict) else None
    keys = ("command", "date", "machine", "versions")
    if not isinstance(provenance, dict) or not all(key in provenance for key in keys) or "results" not in data:
        sys.exit(
            f"render_results.py: error: {path}: not a benchmark's --json output "
            '({"provenance": {"command", "date", "machine", "versions"}, "results": ...})'
        )
    return provenance, data["results"]


def machine(description):
    gpus = description.get("gpus") or []
    accelerators = ", ".join(gpus) if gpus else "no GPU"
    return f"{description.get('cpu') or 'unknown CPU'}, {description.get('cores')} cores, {accelerators}"


def script_of(command):
    """The script a results file's command ran: `python benchmarks/x.py ...` -> benchmarks/x.py."""
    words = shlex.split(command)
    return words[1] if len(words) > 1 else "?"


def section(path):
    provenance, results = read(path)
    command = provenance["command"]
    script = script_of(command)
    title, layout = LAYOUTS.get(script, (f"`{script}`", generic))
    what, lines = layout(results, command)
    versions = provenance["versions"]
    software = f"torch {versions.get('torch')} (CUDA {versions.get('cuda') or '-'}), Python {versions.get('python')}"
    software += f", numpy {versions.get('numpy')}, commit `{versions.get('commit') or '-'}`"
    return [
        f"## {title}: `{path.name}`",
        "",
        what,
        "",
        f"- command: `{command}`",
        f"- date: {provenance['date']}",
        f"- machine: {machine(provenance['machine'])}",
        f"- software: {software}",
        "",
        *lines,
    ]


def render_page(paths):
    lines = [
        f"<!-- generated from benchmarks/results/*.json; do not edit: run {REGENERATE} -->",
        "# Results",
        "",
        "Every figure on this page was measured by a script of `benchmarks/` and is rendered from the JSON file it",
        "wrote (`--json`), kept in `benchmarks/results/` with the command, date, machine and versions of the",
        "measurement. To add or update one, run the benchmark with `--json benchmarks/results/NAME.json`, then",
        f"`{REGENERATE}`; a test fails when this page is not what the files render. What each benchmark",
        "measures, and its flags: [benchmarks](benchmarks.md). Times depend on the machine and on what else ran",
        "on it: compare figures within a section, not across machines.",
    ]
    if not paths:
        lines += ["", "No results yet."]
    for path in paths:
        lines += ["", *section(path)]
    lines += against_baselines(paths)
    return "\n".join(lines) + "\n"


def render_readme_table(path):
    """The README's table: the recommended model per dataset, from accuracy.py --settings best."""
    if not path.is_file():
        return [f"No results yet: see [docs/results.md](docs/results.md) for how to add `{path.name}`."]
    provenance, results = read(path)
    rows = []
    for key, runs in results.items():
        dataset, model = key.split(" ", 1)
        figures = [mean_std([run[name] for run in runs]) for name in ("hr@10", "ndcg@10", "refit_hr@10")]
        rows.append([dataset, model, len(runs), *figures])
    header = ["data", "model", "seeds", "test HR@10", "test NDCG@10", "refit: test HR@10"]
    return table(header, rows) + [
        "",
        f"Measured {provenance['date']} with `benchmarks/accuracy.py --settings best` (reference protocol, model and "
        "epoch chosen on validation); details and baselines in [docs/results.md](docs/results.md).",
    ]


def render_readme(text, results):
    before, begin, rest = text.partition(RESULTS_BEGIN)
    _, end, after = rest.partition(RESULTS_END)
    if not begin or not end:
        sys.exit(f"render_results.py: error: {README} has no {RESULTS_BEGIN} ... {RESULTS_END} block")
    return before + "\n".join([RESULTS_BEGIN, *render_readme_table(results / HEADLINE), RESULTS_END]) + after


def rendered(results=RESULTS):
    """{file: the text it should hold} for docs/results.md and README.md."""
    return {
        PAGE: render_page(sorted(results.glob("*.json"))),
        README: render_readme(README.read_text(), results),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    args = parser.parse_args()
    files = rendered()
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run {REGENERATE}", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
