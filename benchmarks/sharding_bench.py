"""Replicated (DDP) vs TorchRec-sharded embedding tables: per-rank memory of the tables and their
optimizer state, and step time, on gloo processes of this machine, in one run.

    python benchmarks/sharding_bench.py                         # 100k users x 20k items, 32 floats a row
    python benchmarks/sharding_bench.py --users 1000 --items 500 --steps 3 --json results/sharding_bench.json

Each layout trains the same NeuMF (ncf.py's code: ncf.train_epoch on a BCE loss, ncf.make_optimizer for
the dense layers, sharding.shard for the tables) on the same random batches of --batch_size samples
(split across the processes) with the same table optimizer: none is DDP with torch's optimizer over
every parameter, the others are sharding.py's layouts with fbgemm's fused one. Bytes are the largest
of any rank: the table rows a rank holds, and the table optimizer state (Adagrad's per-element sums,
row-wise Adagrad's one per row; plain SGD has none). That is all a sharded ncf.py run keeps of its tables:
it evaluates through the shards and gathers its checkpoints onto rank 0 one shard at a time (transient
buffers, and the full protocol's lookups of the whole item tables while it scores a block, are not
counted). Step time is the mean of --steps steps after --warmup, every rank having waited for the others.
"""

import argparse
import contextlib
import os
import time
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import ncf
import sharding
from neumf import NeuMF
from utils import CliError, Progress, free_port, leave_process_group, run_main, write_results

LAYOUTS = ("none", "table_wise", "column_wise", "row_wise")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--users", type=int, default=100_000, help="rows of the user tables (default 100,000)")
    parser.add_argument("--items", type=int, default=20_000, help="rows of the item tables (default 20,000)")
    parser.add_argument("--factors", type=int, default=32, help="size of the MF embeddings (default 32)")
    parser.add_argument(
        "--layers", nargs="+", type=int, default=[64, 32], help="MLP layer sizes; the MLP tables hold half the first"
    )
    parser.add_argument("--batch_size", type=int, default=16384, help="samples per step, all processes together")
    parser.add_argument(
        "--optimizer",
        choices=sharding.CPU_TABLE_OPTIMIZERS,
        default="adagrad",
        help="the table optimizer of every layout (torch's Adagrad when replicated; --optimizer rowwise_adagrad "
        "has no torch counterpart: the replicated row then uses Adagrad)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--json", default=None, help="write the results here (for benchmarks/render_results.py)")
    args = parser.parse_args()
    for name in ("users", "items", "factors", "batch_size", "steps", "processes"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise CliError("--warmup must not be negative")
    if args.processes < 2:
        raise CliError("--processes must be at least 2: one process shards nothing")
    if args.batch_size < args.processes:
        raise CliError("--batch_size must give every process a sample")
    try:
        import torchrec  # noqa: F401
    except ImportError as error:
        raise CliError(f"needs TorchRec ({error}); {sharding.INSTALL}") from None
    return args


def settings(args, layout):
    """The ncf.py flags that ncf.train_epoch, ncf.make_optimizer and sharding.shard read."""
    return SimpleNamespace(
        embedding_sharding=layout,
        optimizer="adagrad" if layout == "none" and args.optimizer == "rowwise_adagrad" else args.optimizer,
        learning_rate=0.01,
        eps=1e-8,
        beta1=0.9,
        beta2=0.999,
        grads_accumulated=1,
        l2_regularization=0.0,
    )


def shard_bytes(tensor):
    """Bytes of the shards of a ShardedTensor on this rank, or of a whole tensor."""
    if hasattr(tensor, "local_shards"):
        return sum(local.numel() * local.element_size() for _, local in sharding.local_slices(tensor))
    return tensor.numel() * tensor.element_size()


def build(args, layout, world_size):
    """(the loss module to train through, the optimizer, this rank's table bytes, a function of its table
    optimizer bytes)."""
    torch.manual_seed(0)
    model = NeuMF(args.users, args.items, args.factors, args.layers, dropout=0.0)
    loss = ncf.BCE(model)
    names = sharding.table_names(model)
    flags = settings(args, layout)
    cpu = torch.device("cpu")
    if layout == "none":
        optimizer = ncf.make_optimizer(model, flags, cpu)
        tables = [getattr(model, name).weight for name in names]

        def state_bytes():
            return sum(shard_bytes(value) for table in tables for value in optimizer.state[table].values())

        return DistributedDataParallel(loss), optimizer, sum(shard_bytes(table) for table in tables), state_bytes
    sharded, trained, optimizer = sharding.shard(loss, flags, cpu, world_size, ncf.make_optimizer)
    # the model ncf.py evaluates and checkpoints: its tables are the rows this rank holds
    table_bytes = sum(
        shard_bytes(value) for key, value in sharded.state_dict().items() if key.removesuffix(".weight") in names
    )

    def state_bytes():
        return sum(shard_bytes(value) for states in optimizer.local_table_state().values() for value in states.values())

    return trained, optimizer, table_bytes, state_bytes


def random_batches(args, count, rank, world_size):
    generator = torch.Generator().manual_seed(rank)
    size = args.batch_size // world_size
    return [
        (
            torch.randint(0, args.users, (size,), generator=generator),
            torch.randint(0, args.items, (size,), generator=generator),
            torch.randint(0, 2, (size,), generator=generator).float(),
        )
        for _ in range(count)
    ]


def measure(args, layout, rank, world_size):
    trained, optimizer, table_bytes, state_bytes = build(args, layout, world_size)
    flags, scaler = settings(args, layout), torch.amp.GradScaler("cpu", enabled=False)

    def steps(batches):
        progress = Progress(len(batches), 0, layout, enabled=False)
        ncf.train_epoch(trained, optimizer, scaler, batches, flags, contextlib.nullcontext(), progress)
        torch.distributed.barrier()

    if args.warmup:
        steps(random_batches(args, args.warmup, rank, world_size))
    timed = random_batches(args, args.steps, rank, world_size)
    torch.distributed.barrier()
    start = time.perf_counter()
    steps(timed)
    return {
        "table_bytes": table_bytes,
        "optimizer_bytes": state_bytes(),
        "step_s": (time.perf_counter() - start) / args.steps,
    }


def worker(rank, args, port):
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank)}
    os.environ |= {"WORLD_SIZE": str(args.processes), "LOCAL_RANK": str(rank)}
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=args.processes)
    try:
        results = {}
        for layout in LAYOUTS:
            mine = measure(args, layout, rank, args.processes)
            everyone = [None] * args.processes
            torch.distributed.all_gather_object(everyone, mine)
            results[layout] = {key: max(result[key] for result in everyone) for key in mine}
        if rank == 0:
            report(args, results)
    finally:
        leave_process_group()


def report(args, results):
    base = results["none"]
    base_bytes = base["table_bytes"] + base["optimizer_bytes"]
    print(
        f"{args.users:,} users x {args.items:,} items, {args.factors} + {args.layers[0] // 2} floats a row, "
        f"{args.optimizer}, {args.batch_size:,} samples a step on {args.processes} gloo processes"
    )
    print("| tables | table MB/rank | optimizer MB/rank | total / replicated | step [s] | step / replicated |")
    print("|---|---|---|---|---|---|")
    for layout, result in results.items():
        total = result["table_bytes"] + result["optimizer_bytes"]
        result |= {"bytes_ratio": total / base_bytes, "step_ratio": result["step_s"] / base["step_s"]}
        print(
            f"| {'replicated' if layout == 'none' else layout} | {result['table_bytes'] / 2**20:,.1f} "
            f"| {result['optimizer_bytes'] / 2**20:,.1f} | {result['bytes_ratio']:.2f} | {result['step_s']:.4f} "
            f"| {result['step_ratio']:.2f} |"
        )
    if args.json is not None:
        write_results(args.json, {"settings": vars(args), "layouts": results})


def main():
    args = parse_args()
    mp.spawn(worker, args=(args, free_port()), nprocs=args.processes)


if __name__ == "__main__":
    run_main(main)
