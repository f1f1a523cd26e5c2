"""Bytes moved per step and catalogue capacity: replicated embedding tables (DDP) against TorchRec sharding.

    python benchmarks/sharding_arithmetic.py                          # ML-20m and 100M x 1M, on 8 and 64 GPUs
    python benchmarks/sharding_arithmetic.py --catalogues 5000000x200000 --gpus 4 16 --batch_size 262144
    python benchmarks/sharding_arithmetic.py --json benchmarks/results/sharding-arithmetic.json

Arithmetic, not a measurement: what each layout must move and hold, from the model's shapes, for a
reader to redo with their own catalogue (docs/sharding.md explains each formula). Per step and per
GPU, with N GPUs, a global batch of B samples (positives and negatives alike: each looks up one user
row and one item row of every table) and a local batch b = B / N:

- replicated (DDP): a ring all-reduce of every embedding gradient, used rows or not;
- sharded, all-to-all (table-wise, column-wise, row-wise with sequence embeddings): the looked-up rows
  of the local batch that live on other GPUs come in forward, their gradients go back backward;
- sharded, row-wise with pooled embeddings (EmbeddingBagCollection): a reduce-scatter of the whole
  global batch's partial lookups forward, an all-gather of their gradients backward.

The dense layers (MLP, final layer) are all-reduced in every layout; they are shown apart.
"""

import argparse
import itertools
import math
import re

from utils import CliError, run_main, write_results

ID_BYTES = 8  # TorchRec sends the ids of a KeyedJaggedTensor as int64
REFERENCE_BATCH = 2**20  # samples per global batch, the reference's default (-b)
ML_20M = "138493x26744"  # users x items of ML-20m after convert.py
LARGE = "100000000x1000000"
MODELS = ("neumf", "gmf", "mlp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--catalogues", nargs="+", default=[ML_20M, LARGE], help="catalogues as USERSxITEMS, each on every --gpus"
    )
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 64], help="numbers of GPUs")
    parser.add_argument("--model", choices=MODELS, default="neumf", help="which tables the model has")
    parser.add_argument("-f", "--factors", type=int, default=64, help="floats per row of the GMF tables")
    parser.add_argument(
        "--layers", nargs="+", type=int, default=[256, 256, 128, 64], help="MLP layer sizes (tables: layers[0]/2)"
    )
    parser.add_argument(
        "-b", "--batch_size", type=int, default=REFERENCE_BATCH, help="global batch in samples, as ncf.py's -b"
    )
    parser.add_argument(
        "--comm_bytes", type=int, default=4, help="bytes per float sent: 4 (fp32), 2 with fp16/bf16 communication"
    )
    parser.add_argument(
        "--replicated_state_bytes",
        type=float,
        default=20,
        help="bytes per replicated parameter: fp32 weight, gradient, DDP's bucket copy of it, Adam's two moments",
    )
    parser.add_argument(
        "--sharded_state_bytes",
        type=float,
        default=12,
        help="bytes per sharded table parameter: fp32 weight and fbgemm's fused Adam's two moments (no gradient kept)",
    )
    parser.add_argument("--device_memory_gb", type=float, default=141, help="memory of one GPU, in 1e9 bytes (H200)")
    parser.add_argument(
        "--headroom", type=float, default=0.1, help="share of device memory kept for activations, buffers, the data"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def catalogue(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(map(int, match.groups())) < 1:
        raise CliError(f"--catalogues takes USERSxITEMS (e.g. {ML_20M}), got {text!r}")
    return int(match[1]), int(match[2])


def check(args):
    if args.model != "gmf" and (args.layers[0] < 2 or args.layers[0] % 2):
        raise CliError(f"the first MLP layer must be even and positive, got {args.layers[0]}")
    positive = {"--gpus": min(args.gpus), "-f/--factors": args.factors, "--layers": min(args.layers)}
    positive |= {"-b/--batch_size": args.batch_size, "--comm_bytes": args.comm_bytes}
    positive |= {"--replicated_state_bytes": args.replicated_state_bytes}
    positive |= {"--sharded_state_bytes": args.sharded_state_bytes, "--device_memory_gb": args.device_memory_gb}
    for flag, value in positive.items():
        if value <= 0:
            raise CliError(f"{flag} must be positive, got {value:g}")
    if not 0 <= args.headroom < 1:
        raise CliError(f"--headroom must be at least 0 and below 1, got {args.headroom:g}")
    for gpus in args.gpus:
        if args.batch_size % gpus:
            raise CliError(f"-b {args.batch_size} does not split evenly over {gpus} GPUs")


def table_widths(model, factors, layers):
    """Floats per row of each table a user (and, the same, an item) has: GMF's, then MLP's."""
    return [factors] * (model != "mlp") + [layers[0] // 2] * (model != "gmf")


def dense_parameters(model, factors, layers):
    """Parameters of the MLP and the final layer: weights and biases."""
    mlp = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(layers)) if model != "gmf" else 0
    final_in = factors * (model != "mlp") + layers[-1] * (model != "gmf")
    return mlp + final_in + 1


def ring_allreduce_bytes(elements, gpus, comm_bytes):
    """A ring all-reduce sends (and receives) 2(N-1)/N of the buffer per GPU: a reduce-scatter, then an all-gather."""
    return 2 * (gpus - 1) / gpus * elements * comm_bytes


def alltoall_bytes(local_batch, floats_per_sample, lookups_per_sample, gpus, comm_bytes):
    """Forward: the rows of the local batch held elsewhere, (N-1)/N of them when ids spread evenly, and their
    ids; backward: the gradients of those rows. The same in total for table-, column- and row-wise shards."""
    remote = (gpus - 1) / gpus * local_batch
    return remote * (2 * floats_per_sample * comm_bytes + lookups_per_sample * ID_BYTES)


def row_wise_pooled_bytes(local_batch, floats_per_sample, lookups_per_sample, gpus, comm_bytes):
    """Pooled row-wise shards return a partial lookup for every sample of the global batch (N local batches),
    summed by a reduce-scatter, and all-gather the gradients backward: N times the all-to-all's embedding bytes."""
    ids = (gpus - 1) / gpus * local_batch * lookups_per_sample * ID_BYTES
    return 2 * (gpus - 1) / gpus * gpus * local_batch * floats_per_sample * comm_bytes + ids


def usable_bytes(args, dense):
    """One GPU's memory for tables: less the headroom and the replicated dense part (weights, gradients, Adam)."""
    return args.device_memory_gb * 1e9 * (1 - args.headroom) - dense * args.replicated_state_bytes


def capacity(args, gpus):
    """Largest catalogue (users + items rows): replicated, every GPU holds all of it; sharded, each holds 1/N."""
    widths = table_widths(args.model, args.factors, args.layers)
    usable = usable_bytes(args, dense_parameters(args.model, args.factors, args.layers))
    replicated = math.floor(usable / (sum(widths) * args.replicated_state_bytes))
    sharded = gpus * math.floor(usable / (sum(widths) * args.sharded_state_bytes))
    return {"gpus": gpus, "replicated_rows": replicated, "sharded_rows": sharded}


def traffic(args, users, items, gpus):
    widths = table_widths(args.model, args.factors, args.layers)
    floats_per_sample = 2 * sum(widths)  # one user row and one item row of each table
    lookups = 2 * len(widths)
    local_batch = args.batch_size // gpus
    embedding_parameters = (users + items) * sum(widths)
    dense = dense_parameters(args.model, args.factors, args.layers)
    allreduce = ring_allreduce_bytes(embedding_parameters, gpus, args.comm_bytes)
    alltoall = alltoall_bytes(local_batch, floats_per_sample, lookups, gpus, args.comm_bytes)
    pooled = row_wise_pooled_bytes(local_batch, floats_per_sample, lookups, gpus, args.comm_bytes)
    per_sample = alltoall_bytes(1, floats_per_sample, lookups, gpus, args.comm_bytes)
    limits = capacity(args, gpus)
    return {
        "users": users,
        "items": items,
        "gpus": gpus,
        "global_batch": args.batch_size,
        "local_batch": local_batch,
        "embedding_parameters": embedding_parameters,
        "dense_parameters": dense,
        "allreduce_bytes": allreduce,
        "alltoall_bytes": alltoall,
        "row_wise_pooled_bytes": pooled,
        "dense_allreduce_bytes": ring_allreduce_bytes(dense, gpus, args.comm_bytes),
        "allreduce_over_alltoall": allreduce / alltoall if alltoall else None,
        # the local batch at which both layouts move the same embedding bytes; below it sharding moves less
        "break_even_local_batch": allreduce / per_sample if per_sample else None,
        "fits_replicated": users + items <= limits["replicated_rows"],
        "fits_sharded": users + items <= limits["sharded_rows"],
    }


def assumptions(args):
    widths = table_widths(args.model, args.factors, args.layers)
    return {
        "model": args.model,
        "factors": args.factors,
        "layers": args.layers,
        "table_widths": widths,
        "comm_bytes": args.comm_bytes,
        "id_bytes": ID_BYTES,
        "replicated_state_bytes": args.replicated_state_bytes,
        "sharded_state_bytes": args.sharded_state_bytes,
        "device_memory_gb": args.device_memory_gb,
        "headroom": args.headroom,
        "replicated_row_bytes": sum(widths) * args.replicated_state_bytes,
        "sharded_row_bytes": sum(widths) * args.sharded_state_bytes,
    }


def megabytes(value):
    return f"{value / 1e6:,.1f}"


def print_tables(figures):
    a = figures["assumptions"]
    print(
        f"{a['model']}: tables of {' + '.join(map(str, a['table_widths']))} floats per user and per item, "
        f"{a['comm_bytes']} bytes per float sent; per step and per GPU, MB sent (as many received)"
    )
    header = ["users x items", "GPUs", "local batch", "DDP all-reduce", "all-to-all", "row-wise pooled"]
    header += ["dense all-reduce", "all-reduce / all-to-all", "break-even local batch", "fits: replicated / sharded"]
    rows = []
    for t in figures["traffic"]:
        fits = f"{'yes' if t['fits_replicated'] else 'no'} / {'yes' if t['fits_sharded'] else 'no'}"
        ratio = "-" if t["allreduce_over_alltoall"] is None else f"{t['allreduce_over_alltoall']:,.2f}"
        even = "-" if t["break_even_local_batch"] is None else f"{t['break_even_local_batch']:,.0f}"
        rows.append(
            [f"{t['users']:,} x {t['items']:,}", t["gpus"], f"{t['local_batch']:,}", megabytes(t["allreduce_bytes"])]
            + [megabytes(t["alltoall_bytes"]), megabytes(t["row_wise_pooled_bytes"])]
            + [megabytes(t["dense_allreduce_bytes"]), ratio, even, fits]
        )
    print_rows(header, rows)
    print(
        f"\nlargest catalogue (users + items rows), {a['device_memory_gb']:g} GB per GPU less {a['headroom']:.0%}: "
        f"replicated {a['replicated_row_bytes']:,.0f} B/row, sharded {a['sharded_row_bytes']:,.0f} B/row"
    )
    rows = [[c["gpus"], f"{c['replicated_rows']:,}", f"{c['sharded_rows']:,}"] for c in figures["capacity"]]
    print_rows(["GPUs", "replicated", "sharded"], rows)


def print_rows(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))


def main():
    args = parse_args()
    check(args)
    catalogues = [catalogue(text) for text in args.catalogues]
    figures = {
        "assumptions": assumptions(args),
        "traffic": [traffic(args, users, items, gpus) for users, items in catalogues for gpus in args.gpus],
        "capacity": [capacity(args, gpus) for gpus in args.gpus],
    }
    print_tables(figures)
    if args.json is not None:
        write_results(args.json, figures)


if __name__ == "__main__":
    run_main(main)
