"""Accuracy of the NCF models on real MovieLens data: test HR@10 / NDCG@10 at the validation-selected epoch.

    python benchmarks/accuracy.py                                    # GMF, MLP, NeuMF, pre-trained NeuMF, 3 seeds
    python benchmarks/accuracy.py --settings best                    # the recommended model per dataset
    python benchmarks/accuracy.py --datasets ml-100k --settings gmf --seeds 1
    python benchmarks/accuracy.py --json results/accuracy.json

The datasets come from ../shared/data (or --shared_data): ML-1m users 1-2999 (the part of the
official ratings.dat that is available offline), ML-100k and ml-latest-small; each is converted
once with --validation into --workdir. Every run is ncf.py in its own process, read back from its
DLLogger log: the epoch is chosen on validation HR@10 and the test figures are that epoch's, so
nothing is selected on the test set. Pre-trained NeuMF starts from the GMF and MLP of the same
seed (trained first when the selection does not include them).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import write_json  # noqa: E402

DATASETS = {  # name: (file under shared/data, name convert.py expects, format)
    "ml-1m": ("ml-1m/ratings.PARTIAL-users-1-2999.dat", "ratings.dat", "ml-1m"),
    "ml-100k": ("ml-100k/u.data", "u.data", "ml-100k"),
    "ml-latest-small": ("ml-latest-small/ratings.csv", "ratings.csv", "ml-20m"),
}
# What the recipes of the NCF family share: standard Adam betas (the reference's 0.25 / 0.5 suit its 2^20 batches),
# batches of 8192, at most 30 epochs and a stop after 5 without a better validation HR@10.
COMMON = ["-b1", "0.9", "-b2", "0.999", "-b", "8192", "-e", "30", "--patience", "5"]
SIZES = {"gmf": ["-f", "128"], "mlp": ["--layers", "128", "64", "32"]}
# The recipe of each model, chosen on validation HR@10 of ML-1m users 1-2999 (README "Results").
# bf16 (--amp) where there is an MLP: twice as fast on these CPUs, same accuracy; GMF has no matrix
# product to speed up. Pre-trained NeuMF has the sizes of the GMF and MLP it starts from.
RECIPES = {
    "reference": [
        "--model",
        "neumf",
        "-b",
        "65536",
        "--amp",
        "-e",
        "30",
        "--patience",
        "5",
    ],  # its defaults, a small batch
    "gmf": [*COMMON, "--model", "gmf", *SIZES["gmf"], "-l", "0.002", "--l2_regularization", "0.003"],
    "mlp": [*COMMON, "--model", "mlp", *SIZES["mlp"], "--amp", "-l", "0.002", "--dropout", "0"],
    "neumf": [*COMMON, "--model", "neumf", *SIZES["gmf"], *SIZES["mlp"], "--amp", "-l", "0.002", "--dropout", "0"]
    + ["--l2_regularization", "0.001"],
    "neumf-pre": [*COMMON, "--model", "neumf", *SIZES["gmf"], *SIZES["mlp"], "--amp", "-l", "0.0005"]
    + ["--dropout", "0", "--l2_regularization", "0.001"],
}
BEST = {"ml-1m": "gmf", "ml-100k": "gmf", "ml-latest-small": "gmf"}  # the recommended model per dataset


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=[*RECIPES, "best"],
        default=["gmf", "mlp", "neumf", "neumf-pre"],
        help="recipes to run (reference: NeuMF with the reference's defaults), or best",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, help="train at most this many epochs (default: each recipe's)")
    parser.add_argument("--shared_data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where caches, logs and checkpoints go (default: a temporary one); runs "
        "already complete there are read back, not run again",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def prepare(name, shared_data, workdir):
    source, raw_name, fmt = DATASETS[name]
    raw = workdir / name / raw_name
    cache = workdir / "cache" / name
    if not (cache / "metadata.json").exists():
        if not (shared_data / source).is_file():
            sys.exit(f"accuracy.py: error: {shared_data / source} not found (see --shared_data)")
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / source, raw)
        command = [sys.executable, "convert.py", "--path", raw, "--output", cache, "--format", fmt, "--validation"]
        subprocess.run([str(c) for c in command], cwd=ROOT, check=True)
    return cache


def run(cache, model, seed, epochs, workdir):
    """One ncf.py run; returns the validation-selected epoch's figures and the run's wall time."""
    name = f"{cache.name}-{model}-seed{seed}"
    log, checkpoints = workdir / "logs" / f"{name}.json", workdir / "checkpoints" / name
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / "model.pth").exists() or not log.exists() or "best_accuracy" not in log.read_text():
        train(cache, model, seed, epochs, workdir, log, checkpoints)
    records = [json.loads(line[5:]) for line in log.read_text().splitlines()]
    epochs = [r["data"] for r in records if isinstance(r["step"], list) and len(r["step"]) == 1]
    final = next(r["data"] for r in records if r["step"] == [] and "best_accuracy" in r["data"])
    best = epochs[final["best_epoch"]]
    result = {key: best[key] for key in ("hr@10", "ndcg@10", "val_hr@10", "val_ndcg@10")}
    seconds = float(records[-1]["elapsedtime"])  # the run's wall time, from the log's own clock
    return result | {"epoch": final["best_epoch"], "epochs": len(epochs), "seconds": seconds}


def train(cache, model, seed, epochs, workdir, log, checkpoints):
    log.unlink(missing_ok=True)
    command = [sys.executable, "ncf.py", "--data", cache, "--seed", seed, *RECIPES[model]]
    if model == "neumf-pre":
        branches = [
            workdir / "checkpoints" / f"{cache.name}-{kind}-seed{seed}" / "model.pth" for kind in ("gmf", "mlp")
        ]
        command += ["--pretrained_gmf", branches[0], "--pretrained_mlp", branches[1]]
    command += ["--checkpoint_dir", checkpoints, "--log_path", log] + (["-e", epochs] if epochs else [])
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ncf-accuracy-"))
    results = {}
    for dataset in args.datasets:
        cache = prepare(dataset, args.shared_data, workdir)
        models = [BEST[dataset]] if args.settings == ["best"] else [m for m in RECIPES if m in args.settings]
        if "neumf-pre" in models:  # its branches first
            models = [m for m in ("gmf", "mlp") if m not in models] + models
        for model in models:
            for seed in args.seeds:
                result = run(cache, model, seed, args.epochs, workdir)
                results.setdefault(f"{dataset} {model}", []).append(result | {"seed": seed})
                print(f"{dataset} {model} seed {seed}: {result}", flush=True)
    print("\n| dataset | model | test HR@10 | test NDCG@10 | validation HR@10 | selected epoch | seconds per run |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        cells = [mean_std([r[metric] for r in runs]) for metric in ("hr@10", "ndcg@10", "val_hr@10")]
        figures = " | ".join(f"{mean:.4f} ± {std:.4f}" for mean, std in cells)
        epochs = " ".join(f"{r['epoch']}/{r['epochs']}" for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        print(f"| {key.replace(' ', ' | ')} | {figures} | {epochs} | {seconds:.0f} |")
    if args.settings == ["best"]:
        print()
        for dataset in args.datasets:
            runs = results[f"{dataset} {BEST[dataset]}"]
            (hr, hr_std), (ndcg, ndcg_std) = (mean_std([r[m] for r in runs]) for m in ("hr@10", "ndcg@10"))
            print(
                f"{dataset}: test HR@10 {hr:.4f} NDCG@10 {ndcg:.4f} (mean of {len(runs)} seeds, each selected on "
                f"validation; ± {hr_std:.4f} / {ndcg_std:.4f})"
            )
    if args.json is not None:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
