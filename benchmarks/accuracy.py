"""Accuracy of ncf.py on real MovieLens data: HR@10 / NDCG@10 per epoch and time to best, per setting.

    python benchmarks/accuracy.py                                  # every setting on ML-1m users 1-2999 and ML-100k
    python benchmarks/accuracy.py --datasets ml-1m --settings reference-b65536 --epochs 10
    python benchmarks/accuracy.py --json results/accuracy.json

The datasets come from ../shared/data (or --shared_data): ML-1m users 1-2999 (the part of the
official ratings.dat that is available offline) and ML-100k; each is converted once into
--workdir. Every setting runs ncf.py in its own process with --seed 1 and is read back from
ncf.py's DLLogger log, so the figures are those a user gets from the command line.
"""

import argparse
import json
import shutil
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
}
SETTINGS = {  # the reference defaults but the batch size, and what we tried for small data
    "reference-b65536": ["-b", "65536"],
    "b16384": ["-b", "16384"],
    "b8192-lr0.002-dropout0.2": ["-b", "8192", "-l", "0.002", "--dropout", "0.2"],
    "b16384-small": ["-b", "16384", "-f", "16", "--layers", "64", "32", "16"],
    "b16384-n8": ["-b", "16384", "-n", "8"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--amp", action="store_true", help="train with --amp (bf16 on CPU)")
    parser.add_argument("--shared_data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, help="where caches and logs go (default: a temporary directory)")
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
        command = [sys.executable, "convert.py", "--path", raw, "--output", cache, "--format", fmt]
        subprocess.run([str(c) for c in command], cwd=ROOT, check=True)
    return cache


def run(cache, setting, args, workdir):
    log = workdir / "logs" / f"{cache.name}-{setting}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    command = [sys.executable, "ncf.py", "--data", cache, "-e", args.epochs, "--seed", "1", *SETTINGS[setting]]
    command += ["--checkpoint_dir", workdir / "checkpoints" / f"{cache.name}-{setting}", "--log_path", log]
    command += ["--amp"] * args.amp
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True)
    records = [json.loads(line[5:]) for line in log.read_text().splitlines()]
    epochs = [r["data"] for r in records if isinstance(r["step"], list) and len(r["step"]) == 1]
    final = next(r["data"] for r in records if r["step"] == [] and "best_accuracy" in r["data"])
    return {"epochs": epochs, "final": final}


def main():
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ncf-accuracy-"))
    results = {}
    for name in args.datasets:
        cache = prepare(name, args.shared_data, workdir)
        for setting in args.settings:
            results[f"{name} {setting}"] = run(cache, setting, args, workdir)
    print("\n| dataset / setting | best HR@10 | NDCG@10 there | best epoch | time to best [s] | HR@10 per epoch |")
    print("|---|---|---|---|---|---|")
    for key, result in results.items():
        final, epochs = result["final"], result["epochs"]
        best = epochs[final["best_epoch"]]
        per_epoch = " ".join(f"{e['hr@10']:.3f}" for e in epochs)
        print(
            f"| {key} | {final['best_accuracy']:.4f} | {best['ndcg@10']:.4f} | {final['best_epoch']} | "
            f"{final['time_to_best_model']:.0f} | {per_epoch} |"
        )
    if args.json is not None:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
