"""The docs cannot drift from the code.

Conventions (what these tests read):
- Each script's flags are documented in one table, on its docs/*.md page, under a heading
  `` ### `SCRIPT` flags `` (SCRIPT as run from the repository root: `ncf.py`, `benchmarks/accuracy.py`).
  The section ends at the next heading. A flag row's first cell starts with a backticked flag:
  `` | `--epochs` | ... `` or `` | `-e`, `--epochs` | ... ``; every `--name` in that cell is documented
  (short aliases such as `-e` may be shown and are not counted). Flag rows anywhere else are refused.
- The flags a script accepts are the long options its `--help` lists (aliases included, -h/--help not).
- Every docs/*.md page is linked from README.md, and every relative link (and its #anchor) resolves.
- docs/results.md and README.md's results table are what benchmarks/render_results.py renders from
  benchmarks/results/*.json, byte for byte.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# the scripts the docs must cover, whatever else grows a command line
REQUIRED = {"convert.py", "ncf.py", "inference.py", "tune.py", "plot.py", "synthetic.py", "benchmarks/accuracy.py"}

FLAGS_HEADING = re.compile(r"^#{1,6} `(?P<script>[\w./-]+\.py)` flags$")
FLAG_ROW = re.compile(r"^\|\s*`-")
LONG_FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
HELP_OPTION = re.compile(r"^  (-\S.*?)(?:  |$)")  # argparse's option lines: "  -e EPOCHS, --epochs EPOCHS  help"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_results = load_renderer()


def cli_scripts():
    """Every script of the repository root and of benchmarks/ with an argparse command line."""
    candidates = [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    return sorted(p.relative_to(ROOT).as_posix() for p in candidates if "ArgumentParser(" in p.read_text())


@cache
def help_texts():
    """{script: its --help output}, run in parallel (most import torch)."""
    environment = {**os.environ, "COLUMNS": "200"}

    def run(script):
        result = subprocess.run(
            [sys.executable, script, "--help"], cwd=ROOT, env=environment, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{script} --help failed: {result.stderr}"
        return result.stdout

    scripts = cli_scripts()
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(scripts, pool.map(run, scripts), strict=True))


def accepted_flags(help_text):
    """The long options an argparse --help lists, aliases included, --help excepted."""
    flags = set()
    for line in help_text.splitlines():
        match = HELP_OPTION.match(line)
        if match:
            flags |= {part.split()[0] for part in match.group(1).split(", ") if part.startswith("--")}
    return flags - {"--help"}


def markdown_lines(path):
    """(line number, line) of a Markdown file, without fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


@cache
def flag_tables():
    """(sections, rows, stray): where each script's flags section is, where each of its flags is
    documented ({script: {flag: [place, ...]}}), and flag rows outside any flags section."""
    sections, rows, stray = defaultdict(list), defaultdict(lambda: defaultdict(list)), []
    for path in [README, *PAGES]:
        script = None
        for number, line in markdown_lines(path):
            place = f"{path.relative_to(ROOT)}:{number}"
            if line.startswith("#"):
                match = FLAGS_HEADING.match(line)
                script = match["script"] if match else None
                if script:
                    sections[script].append(place)
            elif FLAG_ROW.match(line):
                if script is None:
                    stray.append(place)
                    continue
                first_cell = line.split("|")[1]
                for flag in LONG_FLAG.findall(first_cell):
                    rows[script][flag].append(place)
    return sections, rows, stray


@pytest.mark.parametrize("script", cli_scripts())
def test_the_flags_of_a_script_are_those_its_docs_page_lists(script):
    sections, rows, _ = flag_tables()
    assert len(sections[script]) == 1, (
        f"{script}: expected one section headed '`{script}` flags' in README.md or docs/, found {sections[script]}"
    )
    accepted, documented = accepted_flags(help_texts()[script]), set(rows[script])
    assert not accepted - documented, f"{script}: flags missing from {sections[script][0]}: {accepted - documented}"
    assert not documented - accepted, f"{script}: documented flags it does not have: {documented - accepted}"
    twice = {flag: places for flag, places in rows[script].items() if len(places) > 1}
    assert not twice, f"{script}: flags documented in more than one row: {twice}"


def test_the_docs_cover_the_required_scripts_and_name_no_other():
    sections, _, stray = flag_tables()
    assert REQUIRED <= set(cli_scripts())
    unknown = set(sections) - set(cli_scripts())
    assert not unknown, f"flag sections of scripts without a command line: {unknown}"
    assert not stray, f"flag rows outside a '`SCRIPT` flags' section: {stray}"


def test_accepted_flags_reads_aliases_groups_and_metavars():
    help_text = """usage: x.py [-h]

options:
  -h, --help            show this help message and exit
  -e EPOCHS, --epochs EPOCHS
                        number of epochs -- a --mention in help text is no flag
  --local_rank LOCAL_RANK, --local-rank LOCAL_RANK
  --fix NAME=VALUE [NAME=VALUE ...]  take a parameter out
  -b1 BETA1, --beta1 BETA1

recommend:
  --include_seen        keep them
"""
    expected = {"--epochs", "--local_rank", "--local-rank", "--fix", "--beta1", "--include_seen"}
    assert accepted_flags(help_text) == expected


def slugs(path):
    """GitHub's anchors of a Markdown file's headings."""
    seen, anchors = defaultdict(int), set()
    for _, line in markdown_lines(path):
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def links(path):
    for number, line in markdown_lines(path):
        for target in LINK.findall(re.sub(r"``.*?``|`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):
                yield number, target


def test_the_readme_is_short_and_its_first_screen_says_how_to_start():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:40])
    assert "./quickstart.sh" in first_screen and "./test.sh" in first_screen and "(docs/" in first_screen


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for _, target in links(README)}
    assert PAGES, "no docs/*.md"
    assert not [page.name for page in PAGES if page not in linked]


def test_every_relative_link_resolves():
    broken = []
    for path in [README, *PAGES]:
        for number, target in links(path):
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in slugs(resolved)):
                broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken


# --- results: rendered from the benchmarks' JSON ------------------------------------------------------


def test_results_are_what_the_json_renders():
    for path, text in render_results.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python benchmarks/render_results.py"


def test_render_check_exits_0_when_up_to_date():
    result = subprocess.run([sys.executable, "benchmarks/render_results.py", "--check"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr


PROVENANCE = {
    "date": "2026-12-05",
    "machine": {"cpu": "Some CPU", "cores": 2, "gpus": []},
    "versions": {"python": "3.12.3", "torch": "2.13.0", "cuda": None, "numpy": "2.3.0", "commit": "a7e1964"},
}


def results_file(directory, name, command, results):
    path = directory / name
    path.write_text(json.dumps({"provenance": {"command": command, **PROVENANCE}, "results": results}))
    return path


def accuracy_run(seed, hr):
    figures = {"hr@10": hr, "ndcg@10": 0.4, "val_hr@10": 0.7, "val_ndcg@10": 0.41, "refit_hr@10": 0.71}
    return figures | {"refit_ndcg@10": 0.42, "epoch": 12, "epochs": 18, "seconds": 100.0 + seed, "seed": seed}


def test_an_accuracy_file_renders_as_its_table_with_its_provenance(tmp_path):
    command = "python benchmarks/accuracy.py --settings best --json a.json"
    path = results_file(tmp_path, "a.json", command, {"ml-1m gmf": [accuracy_run(1, 0.7), accuracy_run(2, 0.8)]})
    page = render_results.render_page([path])
    assert page.startswith("<!-- generated from benchmarks/results/*.json; do not edit")
    assert "- command: `python benchmarks/accuracy.py --settings best --json a.json`" in page
    assert "- date: 2026-12-05" in page
    assert "- machine: Some CPU, 2 cores, no GPU" in page
    assert "torch 2.13.0" in page
    # mean ± sample standard deviation of 0.7 and 0.8; mean wall time of 101 and 102 s
    row = "| ml-1m | gmf | 1, 2 | 0.7500 ± 0.0707 | 0.4000 ± 0.0000 | 0.7100 ± 0.0000 | 0.4200 ± 0.0000 "
    assert row + "| 0.7000 ± 0.0000 | 12/18, 12/18 | 101.5 |" in page


def test_the_readme_table_comes_from_accuracy_best(tmp_path):
    results = {"ml-100k gmf": [accuracy_run(1, 0.66)]}
    results_file(tmp_path, "accuracy-best.json", "python benchmarks/accuracy.py", results)
    begin, end = render_results.RESULTS_BEGIN, render_results.RESULTS_END
    readme = render_results.render_readme(f"intro\n{begin}\nstale\n{end}\nrest\n", tmp_path)
    assert readme.startswith(f"intro\n{begin}\n| data | model | seeds | test HR@10 |")
    assert "| ml-100k | gmf | 1 | 0.6600 | 0.4000 | 0.7100 |" in readme
    assert "stale" not in readme and readme.endswith(f"{end}\nrest\n")


def test_baselines_train_bench_and_convert_bench_files_render_their_figures(tmp_path):
    baseline = {"hr@10": 0.6836, "ndcg@10": 0.4229, "val_hr@10": 0.7, "val_ndcg@10": 0.45, "refit_hr@10": 0.7056}
    baseline |= {"refit_ndcg@10": 0.439, "settings": {"factors": 64, "alpha": 4.0}, "fit_seconds": 1.1}
    baseline |= {"seconds": 8.5, "cpu_seconds": 15.25}
    train = {"data": "synthetic-ml-1m", "users": 6040, "items": 3706, "device": "cpu x2", "precision": "bf16"}
    train |= {"compiled": False, "batch_size": 65536, "epoch_seconds": 27.5, "pipeline_samples_per_s": 182227.4}
    train |= {"bare_step_samples_per_s": 199642.0, "pipeline_over_bare": 0.9128, "eval_seconds": 0.3}
    train |= {"eval_users_per_s": 22178.0, "eval_samples_per_s": 2e6, "peak_host_rss_gb": 1.2}
    train |= {"peak_device_memory_gb": None}
    convert = {"rows": 20000263, "csv_bytes": 541_000_000, "preset": "ml-20m", "repeats": 5}
    convert |= {"cache": {"n_users": 138493, "n_items": 26744}, "read_csv_s": 0.97, "read_csv_process_s": 1.34}
    convert |= {"convert_s": 2.03, "convert_peak_rss_gb": 0.67, "ratio": 1.516, "ratio_to_call": 2.093}
    convert |= {"bars": {"convert_s": 60, "convert_peak_rss_gb": 6, "ratio": 2.5, "ratio_to_call": 2.5}}
    convert |= {"meets_bars": {"convert_s": True, "convert_peak_rss_gb": True, "ratio": True, "ratio_to_call": True}}
    convert |= {"import_torch_process_s": 1.21, "import_torch_ratio": 0.903}
    paths = [
        results_file(tmp_path, "b.json", "python benchmarks/baselines.py --data W/cache/ml-1m", {"ials": baseline}),
        results_file(tmp_path, "t.json", "python benchmarks/train_bench.py --precision bf16", train),
        results_file(tmp_path, "c.json", "python benchmarks/convert_bench.py --repeats 5", convert),
    ]
    page = render_results.render_page(paths)
    assert "on the cache `ml-1m` under `ncf.py`'s metrics (reference protocol)" in page
    assert "| ials | factors=64 alpha=4 | 0.7000 | 0.4500 | 0.6836 | 0.4229 | 0.7056 | 0.4390 | 1.1 | 8.5 | 15.2 |" in (
        page
    )
    train_row = (
        "| synthetic-ml-1m | 6,040 x 3,706 | cpu x2 | bf16 | 65,536 | 27.50 | 182,227 | 199,642 | 0.91 | 22,178 |"
    )
    assert train_row + " 1.20 | - |" in page
    assert "| `convert.py`, a whole process | 2.03 s | ≤ 60 s | yes |" in page
    assert "| convert / read_csv process | 1.52 x | ≤ 2.5 x | yes |" in page
    assert "| import torch / read_csv process | 0.90 x |  |  |" in page


def test_the_recommended_model_is_compared_with_the_best_baseline_of_each_column(tmp_path):
    """NCF's means over seeds minus the best baseline figure of each column (popularity left out), for the
    datasets that have both files; a dataset without baselines gets no table."""
    best = {"ml-1m gmf": [accuracy_run(1, 0.69), accuracy_run(2, 0.71)], "ml-100k gmf": [accuracy_run(1, 0.6)]}
    baseline = {"val_hr@10": 0.72, "val_ndcg@10": 0.45, "hr@10": 0.68, "ndcg@10": 0.43, "refit_hr@10": 0.70}
    baseline["refit_ndcg@10"] = 0.44
    baseline |= {"settings": {}, "fit_seconds": 1.0, "seconds": 2.0, "cpu_seconds": 3.0}
    baselines = {
        "popularity": baseline | dict.fromkeys(render_results.COMPARED, 0.9),
        "ials": baseline,
        "ease": baseline | {"hr@10": 0.705},
    }
    paths = [
        results_file(tmp_path, "accuracy-best.json", "python benchmarks/accuracy.py --settings best", best),
        results_file(tmp_path, "b.json", "python benchmarks/baselines.py --data W/cache/ml-1m", baselines),
    ]
    page = render_results.render_page(paths)
    assert "| NCF gmf (mean of 2 seeds) | 0.7000 | 0.7000 | 0.4000 | 0.7100 | 0.4200 |" in page
    assert "| NCF − best baseline | -0.0200 | -0.0050 | -0.0300 | +0.0100 | -0.0200 |" in page
    assert "`ml-1m`:" in page and "`ml-100k`:" not in page
    assert "## The recommended model against the baselines" not in render_results.render_page(paths[:1])


def test_another_benchmark_renders_as_a_generic_table(tmp_path):
    rows = [{"protocol": "full", "seconds": 3.7912, "pairs": 10841385}, {"protocol": "reference", "seconds": 0.27}]
    path = results_file(tmp_path, "f.json", "python benchmarks/full_ranking_bench.py", rows)
    page = render_results.render_page([path])
    assert "## `benchmarks/full_ranking_bench.py`: `f.json`" in page
    assert "|  | protocol | seconds | pairs |" in page
    assert "| 0 | full | 3.791 | 10,841,385 |" in page and "| 1 | reference | 0.27 | - |" in page


def test_rendering_is_deterministic_and_in_file_name_order(tmp_path):
    first = results_file(tmp_path, "a.json", "python benchmarks/x.py", {"speed": 1.5})
    second = results_file(tmp_path, "b.json", "python benchmarks/x.py", {"speed": 2.5})
    page = render_results.render_page(sorted([second, first]))
    assert page == render_results.render_page([first, second])
    assert page.index("`a.json`") < page.index("`b.json`")


def test_a_file_without_provenance_is_a_one_line_error(tmp_path):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"hr@10": 0.7}))
    with pytest.raises(SystemExit, match=r"bare.json: not a benchmark's --json output"):
        render_results.render_page([path])
