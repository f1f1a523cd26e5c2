"""What each training loss costs against BCE: seconds per epoch and samples/s on the same data, in one run.

    python benchmarks/loss_bench.py                                   # synthetic ML-1m, GMF, every loss
    python benchmarks/loss_bench.py --data data/cache/ml-1m --model neumf --losses bce sampled_softmax
    python benchmarks/loss_bench.py --device cuda --preset ml-20m --softmax_batch 65536 --json loss.json

Every loss trains whole epochs of the code ncf.py runs (dataloading.TrainBatches.epoch, then
ncf.train_epoch with the loss), one loss after the other in one process, after a few warm-up steps.
An epoch trains on every positive once under any loss: BCE's samples are the positives and -n
negatives each, a softmax loss's are the positives alone (its negatives are scored, not sampled into
the batch), so seconds per epoch, and positives/s, are the comparable figures.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import ncf
from benchmarks.train_bench import synchronize, synthetic_cache
from dataloading import TrainBatches, load_cache
from neumf import MODELS
from utils import CliError, Progress, enable_tf32, run_main, write_results

WARMUP_STEPS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="cache directory (convert.py / prepare_dataset.sh)")
    source.add_argument("--preset", default="ml-1m", help="synthetic.py preset to generate when --data is not given")
    parser.add_argument("--workdir", type=Path, help="where a generated cache goes (default: a temporary dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--losses", nargs="+", choices=ncf.LOSSES, default=list(ncf.LOSSES))
    parser.add_argument("--model", choices=MODELS, default="gmf")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64])
    parser.add_argument("--bce_batch", type=int, default=8192, help="BCE's batch (positives and negatives)")
    parser.add_argument("--softmax_batch", type=int, default=1024, help="the softmax losses' batch (positives)")
    parser.add_argument(
        "--softmax_negatives", type=int, default=ncf.SAMPLED_NEGATIVES, help="sampled_softmax's negatives per batch"
    )
    parser.add_argument("--amp", action="store_true", help="ncf.py --amp: fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per loss")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise CliError("--epochs must be at least 1")
    return args


def loss_settings(args, loss, data_path):
    """ncf.py's settings for one loss, made by ncf.py's own parser (it refuses what ncf.py refuses)."""
    flags = ["--data", data_path, "--model", args.model, "-f", args.factors, "--layers", *args.layers, "--loss", loss]
    flags += ["-b", args.bce_batch if loss == "bce" else args.softmax_batch, "--dropout", "0"]
    flags += ["--softmax_negatives", args.softmax_negatives] if loss == "sampled_softmax" else []
    return ncf.parse_args([str(flag) for flag in flags + (["--amp"] if args.amp else [])])


def measure_loss(args, loss, data, data_path, device):
    settings = loss_settings(args, loss, data_path)
    torch.manual_seed(0)
    model = ncf.make_model(settings, data, device)
    loss_module = ncf.make_loss(settings, model, data.n_items)
    optimizer = ncf.make_optimizer(model, settings, device)
    scaler = ncf.make_scaler(settings, device)
    autocast = ncf.make_autocast(settings, device)
    batches = TrainBatches(data.train, data.n_items, settings.negative_samples, settings.batch_size, 0, 1, device)

    def train(label, epoch_batches):
        progress = Progress(len(epoch_batches), sum(len(labels) for *_, labels in epoch_batches), label)
        ncf.train_epoch(loss_module, optimizer, scaler, epoch_batches, settings, autocast, progress)
        progress.close()

    loss_module.start_epoch(0)
    train(f"{loss} warm-up", batches.epoch(seed=0)[:WARMUP_STEPS])
    synchronize(device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss_module.start_epoch(epoch + 1)
        train(f"{loss} epoch {epoch}", batches.epoch(seed=epoch + 1))
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.epochs
    return {
        "batch_size": settings.batch_size,
        "negatives": {"bce": settings.negative_samples, "softmax": data.n_items - 1}.get(
            loss, settings.softmax_negatives
        ),
        "epoch_seconds": seconds,
        "samples_per_s": batches.samples_per_epoch / seconds,
        "positives_per_s": len(data.train) / seconds,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main():
    args = parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"unknown device {args.device!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda, but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    enable_tf32(device)
    data_path = args.data or synthetic_cache(args.preset, args.workdir or Path(tempfile.mkdtemp()))
    data = load_cache(data_path)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    results = {"data": str(args.data or f"synthetic-{args.preset}"), "users": data.n_users, "items": data.n_items}
    results |= {"positives": len(data.train), "device": where, "model": args.model, "amp": args.amp, "losses": {}}
    for loss in args.losses:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results["losses"][loss] = measure_loss(args, loss, data, data_path, device)
    print(
        f"{results['data']}: {data.n_users:,} users x {data.n_items:,} items, {len(data.train):,} positives; "
        f"{args.model} on {where}{' --amp' if args.amp else ''}"
    )
    print(
        "| loss | batch | negatives per positive | epoch [s] | samples/s | positives/s | epoch / BCE's "
        "| peak device [GB] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    bce = results["losses"].get("bce")
    for loss, result in results["losses"].items():
        ratio = f"{result['epoch_seconds'] / bce['epoch_seconds']:.2f}" if bce else "-"
        memory = result["peak_device_memory_gb"]
        print(
            f"| {loss} | {result['batch_size']:,} | {result['negatives']:,} | {result['epoch_seconds']:.2f} "
            f"| {result['samples_per_s']:,.0f} | {result['positives_per_s']:,.0f} | {ratio} "
            f"| {'-' if memory is None else f'{memory:.2f}'} |"
        )
    if args.json is not None:
        write_results(args.json, results)


if __name__ == "__main__":
    run_main(main)
