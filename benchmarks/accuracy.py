"""Accuracy of the NCF models on real MovieLens data: test HR@10 / NDCG@10 at the validation-selected epoch.

    python benchmarks/accuracy.py                                    # GMF, MLP, NeuMF, pre-trained NeuMF, 3 seeds
    python benchmarks/accuracy.py --settings best                    # the recommended model per dataset
    python benchmarks/accuracy.py --datasets ml-100k --settings gmf --seeds 1
    python benchmarks/accuracy.py --json results/accuracy.json

The datasets come from --shared_data (default: $NCF_SHARED_DATA, else ../shared/data): ML-1m users
1-2999 (the part of the official ratings.dat that is available offline), ML-100k and ml-latest-small;
each is converted once with and once without --validation into --workdir. Every run is ncf.py in its own process,
read back from its DLLogger log; nothing is selected on the test set. For each recipe and seed:
- selected: trained without the validation items, the epoch with the best validation HR@10, and
  that epoch's test figures;
- refit: the same recipe and seed trained on all but the test items (training + validation, the
  data a baseline is fitted on) for exactly the selected number of epochs; its last epoch's test figures.
Pre-trained NeuMF starts from the GMF and MLP of the same seed and data (trained first when the
selection does not include them).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from utils import CliError, read_log, run_main, run_summary, write_results

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {  # name: (file under shared/data, name convert.py expects, format)
    "ml-1m": ("ml-1m/ratings.PARTIAL-users-1-2999.dat", "ratings.dat", "ml-1m"),
    "ml-100k": ("ml-100k/u.data", "u.data", "ml-100k"),
    "ml-latest-small": ("ml-latest-small/ratings.csv", "ratings.csv", "ml-20m"),
}
# What the recipes of the NCF family share: standard Adam betas (the reference's 0.25 / 0.5 suit its 2^20 batches),
# at most 30 epochs.
COMMON = ["-b1", "0.9", "-b2", "0.999", "-e", "30"]
# ~250-300 optimizer steps per epoch: batches of 8192 give the 100k-rating sets too few steps
BATCH = {"ml-1m": "8192", "ml-100k": "2048", "ml-latest-small": "2048"}
PATIENCE = 5  # epochs without a better validation HR@10 before a run stops
FIGURES = ("hr@10", "ndcg@10", "refit_hr@10", "refit_ndcg@10")  # test figures, as the table shows them
SIZES = {"gmf": ["-f", "128"], "mlp": ["--layers", "128", "64", "32"]}
# The recipe of each model, chosen on validation HR@10 of ML-1m users 1-2999 (README "Results"), in
# fp32: --amp (bf16) pays only on CPUs with AVX-512 BF16. Pre-trained NeuMF has the sizes of the GMF
# and MLP it starts from.
RECIPES = {
    "reference": ["--model", "neumf", "-b", "65536", "-e", "30"],  # its defaults, a small batch
    "gmf": [*COMMON, "--model", "gmf", *SIZES["gmf"], "-l", "0.002", "--l2_regularization", "0.003"],
    # ties GMF on validation HR@10 of ML-1m, with a better validation NDCG@10 (README "Results")
    "gmf-n8": [*COMMON, "--model", "gmf", *SIZES["gmf"], "-l", "0.002", "--l2_regularization", "0.001", "-n", "8"],
    "mlp": [*COMMON, "--model", "mlp", *SIZES["mlp"], "-l", "0.002", "--dropout", "0"],
    "neumf": [*COMMON, "--model", "neumf", *SIZES["gmf"], *SIZES["mlp"], "-l", "0.002", "--dropout", "0"]
    + ["--l2_regularization", "0.001"],
    "neumf-pre": [*COMMON, "--model", "neumf", *SIZES["gmf"], *SIZES["mlp"], "-l", "0.0005"]
    + ["--dropout", "0", "--l2_regularization", "0.001"],
    # softmax losses, batches of positives (SOFTMAX_BATCH), no regularization: the settings of the outside
    # probe of issue 20 (dot-product MF, 64 factors, Adam lr 0.002) that reached the baselines untuned
    "gmf-softmax": [*COMMON, "--model", "gmf", "-f", "64", "-l", "0.002", "--loss", "softmax"],
    "gmf-softmax-f128": [*COMMON, "--model", "gmf", *SIZES["gmf"], "-l", "0.002", "--loss", "softmax"],
    "gmf-sampled": [*COMMON, "--model", "gmf", "-f", "64", "-l", "0.002", "--loss", "sampled_softmax"],
    # the best validation HR@10 of a one-seed sweep of gmf-sampled's settings on ML-100k (docs/training.md)
    "gmf-sampled-lr001": [*COMMON, "--model", "gmf", "-f", "64", "-l", "0.001", "--loss", "sampled_softmax"],
    # the best trial of a tune.py study on ML-100k searching the loss and its parameters (docs/training.md):
    # a wide GMF, full softmax, L2
    "gmf-softmax-l2": [*COMMON, "--model", "gmf", "-f", "256", "-l", "0.0036", "--loss", "softmax"]
    + ["--l2_regularization", "0.005"],
}
# A softmax loss's batch holds positives only: smaller batches give it the steps BCE's get from its negatives
SOFTMAX_BATCH = {"ml-1m": "1024", "ml-100k": "256", "ml-latest-small": "256"}
BATCHES = {model: SOFTMAX_BATCH for model in RECIPES if "--loss" in RECIPES[model]}
BATCHES["gmf-softmax-l2"] = SOFTMAX_BATCH | {"ml-100k": "640", "ml-latest-small": "640"}  # its study's batch
SHARED_DATA_VARIABLE = "NCF_SHARED_DATA"  # where the MovieLens files are, when --shared_data is not given
# The recommended recipe per dataset: the best mean validation HR@10 of seeds 1-3 among gmf, gmf-softmax
# (not run on ML-1m), gmf-sampled, gmf-sampled-lr001 (ML-100k only) and gmf-softmax-l2
# (benchmarks/results/accuracy-*.json); never chosen on test.
BEST = {"ml-1m": "gmf-softmax-l2", "ml-100k": "gmf-softmax-l2", "ml-latest-small": "gmf-sampled"}


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
    parser.add_argument(
        "--shared_data",
        type=Path,
        default=Path(os.environ.get(SHARED_DATA_VARIABLE, ROOT.parent / "shared" / "data")),
        help=f"folder holding ml-1m/, ml-100k/, ... (default: ${SHARED_DATA_VARIABLE}, else ../shared/data)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where caches, logs and checkpoints go (default: a temporary one); runs "
        "already complete there are read back, not run again",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def check_sources(datasets, shared_data):
    """Every dataset's file is there before the first run starts."""
    for name in datasets:
        if not (shared_data / DATASETS[name][0]).is_file():
            raise CliError(
                f"{shared_data / DATASETS[name][0]} not found: set --shared_data or {SHARED_DATA_VARIABLE} "
                "to the folder holding the MovieLens files"
            )


def prepare(name, shared_data, workdir):
    """The dataset's cache with a validation split, and its cache without one (the refit's training data)."""
    source, raw_name, fmt = DATASETS[name]
    raw = workdir / name / raw_name
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / source, raw)
    caches = workdir / "cache" / name, workdir / "cache" / f"{name}-full"
    for cache, split in zip(caches, (["--validation"], []), strict=True):
        if not (cache / "metadata.json").exists():
            command = [sys.executable, "convert.py", "--path", raw, "--output", cache, "--format", fmt, *split]
            subprocess.run([str(c) for c in command], cwd=ROOT, check=True)
    return caches


def ncf_run(cache, model, seed, flags, workdir):
    """ncf.py with a recipe, unless that run is complete in workdir: (per-epoch records, summary, seconds)."""
    name = f"{cache.name}-{model}-seed{seed}"
    log, checkpoints = workdir / "logs" / f"{name}.json", workdir / "checkpoints" / name
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / "model.pth").exists() or not log.exists() or "best_accuracy" not in log.read_text():
        log.unlink(missing_ok=True)
        command = [sys.executable, "ncf.py", "--data", cache, "--seed", seed, *RECIPES[model], *flags]
        if model == "neumf-pre":  # the branches of the same seed, on the same data
            branches = [workdir / "checkpoints" / f"{cache.name}-{kind}-seed{seed}" for kind in ("gmf", "mlp")]
            # a refit's model is its last epoch (last.pth): its model.pth was chosen on test HR
            checkpoint = "last.pth" if cache.name.endswith("-full") else "model.pth"
            command += ["--pretrained_gmf", branches[0] / checkpoint, "--pretrained_mlp", branches[1] / checkpoint]
        command += ["--checkpoint_dir", checkpoints, "--log_path", log]
        subprocess.run([str(c) for c in command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = read_log(log)
    epochs = [r["data"] for r in records if isinstance(r["step"], list) and len(r["step"]) == 1]
    seconds = float(records[-1]["elapsedtime"])  # the run's wall time, from the log's own clock
    return epochs, run_summary(records), seconds


def run(caches, model, seed, max_epochs, workdir):
    """A recipe's test figures at the validation-selected epoch, and refit on training + validation items.

    Selected: trained without the validation items, the epoch with the best validation HR@10.
    Refit: the same recipe and seed trained on training + validation items for that many epochs; its
    last epoch is the model (nothing is chosen on test), as baselines are fitted on the whole training data.
    """
    batch = [] if model == "reference" else ["-b", BATCHES.get(model, BATCH)[caches[0].name]]
    cap = ["-e", max_epochs] if max_epochs else []
    epochs, final, seconds = ncf_run(caches[0], model, seed, [*batch, *cap, "--patience", PATIENCE], workdir)
    best = final["best_epoch"]
    refit_epochs, _, refit_seconds = ncf_run(caches[1], model, seed, [*batch, "-e", best + 1], workdir)
    result = {key: epochs[best][key] for key in ("hr@10", "ndcg@10", "val_hr@10", "val_ndcg@10")}
    result |= {f"refit_{key}": refit_epochs[best][key] for key in ("hr@10", "ndcg@10")}
    return result | {"epoch": best, "epochs": len(epochs), "seconds": seconds + refit_seconds}


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    args = parse_args()
    check_sources(args.datasets, args.shared_data)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ncf-accuracy-"))
    results = {}
    for dataset in args.datasets:
        caches = prepare(dataset, args.shared_data, workdir)
        models = [BEST[dataset]] if args.settings == ["best"] else [m for m in RECIPES if m in args.settings]
        if "neumf-pre" in models:  # its branches first
            models = [m for m in ("gmf", "mlp") if m not in models] + models
        for model in models:
            for seed in args.seeds:
                result = run(caches, model, seed, args.epochs, workdir)
                results.setdefault(f"{dataset} {model}", []).append(result | {"seed": seed})
                print(f"{dataset} {model} seed {seed}: {result}", flush=True)
    print(
        "\n| dataset | model | test HR@10 | test NDCG@10 | refit: test HR@10 | refit: test NDCG@10 | validation HR@10 "
        "| selected epoch | seconds per seed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        cells = [mean_std([r[metric] for r in runs]) for metric in (*FIGURES, "val_hr@10")]
        figures = " | ".join(f"{mean:.4f} ± {std:.4f}" for mean, std in cells)
        epochs = " ".join(f"{r['epoch']}/{r['epochs']}" for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        print(f"| {key.replace(' ', ' | ')} | {figures} | {epochs} | {seconds:.0f} |")
    if args.settings == ["best"]:
        print()
        for dataset in args.datasets:
            runs = results[f"{dataset} {BEST[dataset]}"]
            for prefix, how in (("", ""), ("refit_", ", refit on training + validation items")):
                (hr, hr_std), (ndcg, ndcg_std) = (mean_std([r[prefix + m] for r in runs]) for m in ("hr@10", "ndcg@10"))
                print(
                    f"{dataset}: test HR@10 {hr:.4f} NDCG@10 {ndcg:.4f} (mean of {len(runs)} seeds, each selected on "
                    f"validation{how}; ± {hr_std:.4f} / {ndcg_std:.4f})"
                )
    if args.json is not None:
        write_results(args.json, results)


if __name__ == "__main__":
    run_main(main)
