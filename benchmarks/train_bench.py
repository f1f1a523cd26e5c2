"""Training and evaluation throughput of ncf.py's own pipeline against a bare model step, in one run.

    python benchmarks/train_bench.py --data data/cache/synthetic-ml-20m --precision bf16
    python benchmarks/train_bench.py --preset ml-1m --batch_size 65536      # makes a synthetic cache first
    python benchmarks/train_bench.py --device cuda --preset ml-20m --batch_size 1048576 --precision fp16

pipeline: whole epochs of the code ncf.py runs (dataloading.TrainBatches.epoch draws the negatives
and shuffles the epoch on the device, ncf.train_epoch does forward, backward and fused Adam).
bare step: as many steps of ncf.train_epoch on one pre-made batch, with no sampling, shuffling or
slicing. pipeline / bare is what the data pipeline costs. Also evaluation throughput (ncf.evaluate,
reference protocol), peak host RSS and peak device memory. Measured in one process, one after the
other, so the ratio holds on a noisy machine.

The settings are ncf.py's own (its parser, at its defaults), with TF32 on CUDA as ncf.py has it.
The warm-up steps train a full batch and the epoch's last, short one, so that --compile compiles
every shape before the timing starts; the JSON's compiles_while_timed counts any compilation after.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ncf
from dataloading import EvalCandidates, TrainBatches, load_cache
from utils import CliError, Progress, enable_tf32, run_main, write_results

ROOT = Path(__file__).resolve().parents[1]

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="cache directory (convert.py / prepare_dataset.sh)")
    source.add_argument("--preset", default="ml-1m", help="synthetic.py preset to generate when --data is not given")
    parser.add_argument("--workdir", type=Path, help="where a generated cache goes (default: a temporary dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype (fp16: CUDA only)")
    parser.add_argument("--batch_size", type=int, default=65536)
    parser.add_argument("--valid_batch_size", type=int, default=2**20)
    parser.add_argument("--epochs", type=int, default=1, help="timed pipeline epochs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--compile", action="store_true", help="train a torch.compile'd model (pipeline and bare step)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def training_settings(args, device, data_path):
    """ncf.py's settings for this run, made by ncf.py's own parser so that none can drift from it.

    ncf.py's --amp is fp16 on CUDA and bf16 on the CPU: it is set where --precision is that dtype.
    bf16 on CUDA, which ncf.py has no flag for, trains as ncf.py without --amp but for the autocast.
    """
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    flags = ["--data", data_path, "--batch_size", args.batch_size, "--valid_batch_size", args.valid_batch_size]
    flags += ["--dropout", args.dropout] + (["--amp"] if PRECISIONS[args.precision] == amp_dtype else [])
    return ncf.parse_args([str(flag) for flag in flags])


def synthetic_cache(preset, workdir):
    cache = workdir / "cache" / f"synthetic-{preset}"
    if not (cache / "metadata.json").exists():
        ratings = workdir / f"synthetic-{preset}" / "ratings.csv"
        for command in (
            ["synthetic.py", "--preset", preset, "--output", ratings],
            ["convert.py", "--format", "ml-20m", "--path", ratings, "--output", cache],
        ):
            subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True)
    return cache


def check_settings(args, data):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"unknown device {args.device!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"unsupported device {args.device!r} (cpu, cuda, cuda:N)")
    if args.precision == "fp16" and device.type != "cuda":
        raise CliError("--precision fp16 needs CUDA; on a CPU use bf16")
    if args.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CliError(f"{torch.cuda.get_device_name(device)} does not support bf16; use fp16")
    samples = len(data.train) * 5
    if not 1 <= args.batch_size <= samples:
        raise CliError(f"--batch_size must be between 1 and the epoch's {samples:,} samples")
    if args.epochs < 1:
        raise CliError("--epochs must be at least 1")
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_batches(epoch_batches):
    """A full batch, the epoch's last (short) one, a full one: a compiled model sees every shape of an
    epoch here, so dynamo compiles (and makes the batch dimension dynamic) before the timing starts."""
    return [epoch_batches[0], epoch_batches[-1], epoch_batches[0]]


def compiled_frames():
    """Frames dynamo has compiled in this process so far (recompilations included)."""
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["frames"]["total"]


def measure(args):
    data_path = args.data or synthetic_cache(args.preset, args.workdir or Path(tempfile.mkdtemp()))
    data = load_cache(data_path)
    device = check_settings(args, data)
    if args.threads:
        torch.set_num_threads(args.threads)
    tf32 = enable_tf32(device)
    settings = training_settings(args, device, data_path)
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    torch.manual_seed(0)
    model = ncf.make_model(settings, data, device)
    optimizer = ncf.make_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and device.type == "cuda")
    batches = TrainBatches(data.train, data.n_items, settings.negative_samples, args.batch_size, 0, 1, device)
    trained = torch.compile(model) if args.compile else model  # compiled by the warm-up steps

    def train(label, epoch_batches):
        progress = Progress(len(epoch_batches), sum(len(labels) for *_, labels in epoch_batches), label)
        ncf.train_epoch(ncf.BCE(trained), optimizer, scaler, epoch_batches, settings, autocast, progress)
        progress.close()

    warmup = warmup_batches(batches.epoch(seed=0))
    train("warm-up", warmup)
    synchronize(device)
    frames_before = compiled_frames() if args.compile else None
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train(f"pipeline epoch {epoch}", batches.epoch(seed=epoch + 1))
    synchronize(device)
    pipeline_seconds = time.perf_counter() - start
    steps = len(batches) * args.epochs
    pipeline = batches.samples_per_epoch * args.epochs / pipeline_seconds

    full_batch = warmup[0]
    start = time.perf_counter()
    train("bare steps", [full_batch] * steps)
    synchronize(device)
    bare = steps * len(full_batch[0]) / (time.perf_counter() - start)
    compiles_while_timed = compiled_frames() - frames_before if args.compile else None

    evaluator = EvalCandidates(data.test, data.test_negatives, 0, 1, device)
    ncf.evaluate(model, evaluator, settings, autocast)  # warm-up
    start = time.perf_counter()
    ncf.evaluate(model, evaluator, settings, autocast)
    synchronize(device)
    eval_seconds = time.perf_counter() - start

    return {
        "data": str(args.data or f"synthetic-{args.preset}"),
        "users": data.n_users,
        "items": data.n_items,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": args.precision,
        "compiled": args.compile,
        "compiles_while_timed": compiles_while_timed,
        "tf32": tf32,
        "batch_size": args.batch_size,
        "epoch_seconds": pipeline_seconds / args.epochs,
        "pipeline_samples_per_s": pipeline,
        "bare_step_samples_per_s": bare,
        "pipeline_over_bare": pipeline / bare,
        "eval_seconds": eval_seconds,
        "eval_users_per_s": data.n_users / eval_seconds,
        "eval_samples_per_s": evaluator.pairs / eval_seconds,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main():
    args = parse_args()
    result = measure(args)
    print(f"{result['data']}: {result['users']:,} users x {result['items']:,} items on {result['device']}")
    print("| precision | batch | epoch [s] | pipeline [samples/s] | bare step [samples/s] | pipeline / bare "
          "| eval [s] | eval [users/s] | eval [samples/s] | peak RSS [GB] | peak device [GB] |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    device_memory = result["peak_device_memory_gb"]
    print(
        f"| {result['precision']}{' compiled' if result['compiled'] else ''} | {result['batch_size']:,} "
        f"| {result['epoch_seconds']:.2f} "
        f"| {result['pipeline_samples_per_s']:,.0f} | {result['bare_step_samples_per_s']:,.0f} "
        f"| {result['pipeline_over_bare']:.2f} | {result['eval_seconds']:.2f} | {result['eval_users_per_s']:,.0f} "
        f"| {result['eval_samples_per_s']:,.0f} | {result['peak_host_rss_gb']:.2f} "
        f"| {'-' if device_memory is None else f'{device_memory:.2f}'} |"
    )
    if args.json is not None:
        write_results(args.json, result)


if __name__ == "__main__":
    run_main(main)
