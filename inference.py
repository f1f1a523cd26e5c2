"""Benchmark NeuMF inference, or recommend each user's top-K items with a trained model.

    python inference.py                                    # latency / throughput at ML-20m sizes
    python inference.py --load_checkpoint_path checkpoints/model.pth --batch_sizes 1024,1048576 --bf16
    python inference.py --mode recommend --data data/cache/ml-20m \\
        --load_checkpoint_path checkpoints/model.pth --users 1 42 --topk 10

benchmark: for each batch size, --num_batches scoring passes (sigmoid of the logits) on random
(user, item) ids; the first WARMUP_BATCHES passes are not counted.
recommend: score every item for each user, drop every item the cache records for the user (its
training, validation and test items; --include_seen keeps them), and list the K best in the raw ids
of the input data.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from convert import ITEM_IDS_FILE, USER_IDS_FILE
from dataloading import load_cache
from neumf import MODELS, NeuMF
from utils import (
    CliError,
    enable_tf32,
    load_model_weights,
    load_state_dict_file,
    make_logger,
    model_config,
    require_torch,
    run_main,
    write_text_atomically,
)

WARMUP_BATCHES = 10
DEFAULT_BATCH_SIZES = "1,4,16,64,256,1024,4096,16384,65536,262144,1048576"
ML20M = {"model": "neumf", "n_users": 138_493, "n_items": 26_744, "factors": 64, "layers": [256, 256, 128, 64]}
ID_POOL_SAMPLES = 2**24  # random (user, item) samples made up front per batch size, cycled over the passes
MODE_FLAGS = {  # the flags of one mode alone
    "benchmark": (
        "model",
        "n_users",
        "n_items",
        "factors",
        "layers",
        "batch_sizes",
        "num_batches",
        "fp16",
        "bf16",
        "log_path",
    ),
    "recommend": ("data", "users", "users_file", "topk", "include_seen", "score_batch_size", "output"),
}
TABLE_COLUMNS = (
    "Batch size",
    "Throughput [samples/s]",
    "Latency Avg [ms]",
    "Latency 90% [ms]",
    "Latency 95% [ms]",
    "Latency 99% [ms]",
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--mode", choices=["benchmark", "recommend"], default="benchmark", help="default: %(default)s")
    parser.add_argument("--load_checkpoint_path", help="model.pth (with or without DDP's `module.` prefix)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")

    bench = parser.add_argument_group("benchmark (model sizes come from the checkpoint when one is given)")
    bench.add_argument("--model", choices=MODELS, help="NeuMF, GMF or MLP (default: neumf)")
    bench.add_argument("--n_users", type=int, help=f"users of the model (default: {ML20M['n_users']}, ML-20m)")
    bench.add_argument("--n_items", type=int, help=f"items of the model (default: {ML20M['n_items']}, ML-20m)")
    bench.add_argument("-f", "--factors", type=int, help=f"size of the MF embeddings (default: {ML20M['factors']})")
    bench.add_argument("--layers", nargs="+", type=int, help=f"MLP layer sizes (default: {ML20M['layers']})")
    bench.add_argument(
        "--batch_sizes",
        nargs="+",
        default=[DEFAULT_BATCH_SIZES],
        help=f"batch sizes, comma- or space-separated (default: {DEFAULT_BATCH_SIZES})",
    )
    bench.add_argument(
        "--num_batches",
        type=int,
        default=200,
        help=f"passes per batch size; the first {WARMUP_BATCHES} are warm-up (default: %(default)s)",
    )
    precision = bench.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 model (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 model (CUDA and CPU)")
    bench.add_argument("--log_path", default="log.json", help="DLLogger JSON-lines results (default: %(default)s)")

    rec = parser.add_argument_group("recommend")
    rec.add_argument("--data", help="cache directory the model was trained on (convert.py's output)")
    rec.add_argument("--users", nargs="+", default=[], help="raw user ids, as in the input ratings file")
    rec.add_argument("--users_file", help="file with one raw user id per line")
    rec.add_argument("-k", "--topk", type=int, default=10, help="items per user (default: %(default)s)")
    rec.add_argument(
        "--include_seen",
        action="store_true",
        help="keep the items the cache records for the user (training, validation and test), left out by default",
    )
    rec.add_argument(
        "--score_batch_size",
        type=int,
        default=2**20,
        help="(user, item) pairs per forward pass, rounded down to whole users, at least one (default: %(default)s)",
    )
    rec.add_argument("--output", help="write FILE.csv or FILE.json instead of a table on stdout")
    args = parser.parse_args()
    check_mode_flags(parser, args)
    if args.mode == "benchmark":
        check_benchmark_args(args)
    else:
        check_recommend_args(args)
    return args


def check_mode_flags(parser, args):
    """Refuse a flag of the other mode: ignored, it would hide a mistake (--fp16 / --bf16 in
    particular: recommendations are scored in float32, as half precision rounds close scores into ties)."""
    other = "recommend" if args.mode == "benchmark" else "benchmark"
    for name in MODE_FLAGS[other]:
        if getattr(args, name) != parser.get_default(name):
            raise CliError(f"--{name} applies to --mode {other} only")


def check_benchmark_args(args):
    args.batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.num_batches <= WARMUP_BATCHES:
        raise CliError(f"--num_batches must be more than the {WARMUP_BATCHES} warm-up passes, got {args.num_batches}")
    given = [f"--{name}" for name in ML20M if getattr(args, name) is not None]
    if args.load_checkpoint_path and given:
        raise CliError(f"the model sizes come from the checkpoint; drop {', '.join(given)}")
    for name, default in ML20M.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("n_users", "n_items", "factors"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1")
    if any(size < 1 for size in args.layers) or args.layers[0] % 2:
        raise CliError(f"--layers must be positive and the first one even (user and item halves), got {args.layers}")


def parse_batch_sizes(values):
    """["1,4", "16"] -> [1, 4, 16]: the reference takes one comma-separated string, a shell user types spaces."""
    sizes = []
    for value in values:
        for part in value.split(","):
            try:
                size = int(part)
            except ValueError:
                raise CliError(f"--batch_sizes: {part!r} is not an integer") from None
            if size < 1:
                raise CliError(f"--batch_sizes: a batch size must be at least 1, got {size}")
            sizes.append(size)
    return sizes


def check_recommend_args(args):
    if not args.data or not args.load_checkpoint_path:
        raise CliError("--mode recommend needs --data and --load_checkpoint_path")
    if not args.users and not args.users_file:
        raise CliError("--mode recommend needs --users and/or --users_file")
    if args.topk < 1:
        raise CliError(f"--topk must be at least 1, got {args.topk}")
    if args.score_batch_size < 1:
        raise CliError(f"--score_batch_size must be at least 1, got {args.score_batch_size}")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise CliError(f"--output must end in .csv or .json, got {args.output}")


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available here")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def out_of_memory(error):
    """Whether a RuntimeError is a failed allocation: CUDA raises OutOfMemoryError, the CPU allocator a plain one."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def synchronize(device):
    """Wait for queued kernels, so that a timer around a pass measures the pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- model ------------------------------------------------------------------------------------


def load_model(path, device, n_users=None, n_items=None):
    """The checkpoint's model in eval mode on `device`; given n_users/n_items must match its embeddings."""
    state = load_state_dict_file(path)
    kind, ckpt_users, ckpt_items, factors, layers = model_config(state, path)
    model = NeuMF(n_users or ckpt_users, n_items or ckpt_items, factors, layers, kind=kind)
    load_model_weights(model, path, state)  # names the first tensor that does not fit the cache's sizes
    return model.to(device).eval()


def describe(model):
    user_table, item_table = model.embeddings()[0]
    sizes = []
    if model.has_mf:
        sizes.append(f"factors {model.mf_user_embed.embedding_dim}")
    if model.has_mlp:
        sizes.append(f"layers {[2 * model.mlp_user_embed.embedding_dim] + [layer.out_features for layer in model.mlp]}")
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{model.kind.upper()}: {user_table.num_embeddings:,} users, {item_table.num_embeddings:,} items, "
        f"{', '.join(sizes)}, {n_params:,} parameters"
    )


# --- benchmark --------------------------------------------------------------------------------


def percentile(values, q):
    """The q-th percentile, linear between closest ranks (numpy's default, as the reference reports).

    With the n values sorted as v[0] <= ... <= v[n-1] and h = (n - 1) * q / 100, it is
    v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)]).
    """
    return float(np.percentile(values, q))


def latency_stats(batch_size, latencies_ms):
    """Throughput (all samples over all time) and mean / p90 / p95 / p99 latency in ms."""
    latencies_ms = np.asarray(latencies_ms, dtype=np.float64)
    mean = float(latencies_ms.mean())
    return {
        "mean_throughput": batch_size / (mean / 1000.0),
        "mean_latency": mean,
        "p90_latency": percentile(latencies_ms, 90),
        "p95_latency": percentile(latencies_ms, 95),
        "p99_latency": percentile(latencies_ms, 99),
    }


def random_ids(batch_size, num_batches, n_users, n_items, device, generator):
    """Random (users, items) batches, made on the device before any timing.

    Each pass gets other ids than the last, so small batches do not re-read embedding rows that
    are still in cache; the pool is capped at ID_POOL_SAMPLES and cycled, so large batches fit.
    """
    n_distinct = max(1, min(num_batches, ID_POOL_SAMPLES // batch_size))
    shape = (n_distinct, batch_size)
    users = torch.randint(0, n_users, shape, device=device, generator=generator)
    items = torch.randint(0, n_items, shape, device=device, generator=generator)
    return users, items


def time_passes(model, users, items, num_batches, device):
    """Latency in ms of each scoring pass after the warm-up."""
    latencies = []
    with torch.inference_mode():
        for step in range(num_batches):
            batch_users, batch_items = users[step % len(users)], items[step % len(items)]
            synchronize(device)
            start = time.perf_counter()
            torch.sigmoid(model(batch_users, batch_items))
            synchronize(device)
            latencies.append(time.perf_counter() - start)
    return np.array(latencies[WARMUP_BATCHES:]) * 1000.0


def table_line(cells):
    return "| " + " | ".join(str(cell).rjust(len(name)) for cell, name in zip(cells, TABLE_COLUMNS, strict=True)) + " |"


def benchmark(args, device):
    if args.fp16 and device.type != "cuda":
        raise CliError("--fp16 needs CUDA; on CPU use --bf16")
    if args.load_checkpoint_path:
        model = load_model(args.load_checkpoint_path, device)
    else:
        try:
            model = NeuMF(args.n_users, args.n_items, args.factors, args.layers, kind=args.model).to(device).eval()
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            raise CliError(
                "the model does not fit in memory; use smaller --n_users/--n_items/--factors/--layers"
            ) from None
    n_users, n_items = (table.num_embeddings for table in model.embeddings()[0])
    # Casting the whole model, not autocast: embedding rows are then read in half the bytes and no
    # weight is re-cast per pass. On CPU at batch 2^20 bf16 ran about 2x faster cast than autocast.
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    model = model.to(dtype)
    enable_tf32(device)  # FP32 means TF32 matmuls on Ampere and later
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    print(f"{describe(model)}; {precision} on {device}")

    logger = make_logger(args.log_path, enabled=True)
    generator = torch.Generator(device=device).manual_seed(0)
    print(table_line(TABLE_COLUMNS))
    print("|" + "|".join("-" * (len(name) + 2) for name in TABLE_COLUMNS) + "|", flush=True)
    for batch_size in args.batch_sizes:
        try:
            users, items = random_ids(batch_size, args.num_batches, n_users, n_items, device, generator)
            stats = latency_stats(batch_size, time_passes(model, users, items, args.num_batches, device))
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            raise CliError(
                f"batch size {batch_size} does not fit in {device} memory; use smaller --batch_sizes"
            ) from None
        del users, items  # free this size's ids before the next size's are made
        for key in stats:
            logger.metadata(f"batch_{batch_size}_{key}", {"unit": "samples/s" if key == "mean_throughput" else "ms"})
        logger.log(step=(), data={f"batch_{batch_size}_{key}": value for key, value in stats.items()})
        cells = [batch_size, f"{stats['mean_throughput']:,.0f}"]
        cells += [f"{stats[key]:.3f}" for key in ("mean_latency", "p90_latency", "p95_latency", "p99_latency")]
        print(table_line(cells), flush=True)
    logger.close()


# --- recommend --------------------------------------------------------------------------------


def read_id_map(cache_dir, name, id_type, expected_len):
    """Raw ids by dense id: line k of the file (after the `raw_id` header) is dense id k's raw id."""
    path = Path(cache_dir) / name
    try:
        raw_ids = pd.read_csv(path, dtype=str if id_type == "str" else "int64", keep_default_na=False)["raw_id"]
    except (ValueError, KeyError, pd.errors.ParserError):
        raise CliError(f"{path} is corrupt; run convert.py again") from None
    if len(raw_ids) != expected_len:
        raise CliError(f"{path} holds {len(raw_ids)} ids, metadata.json says {expected_len}; run convert.py again")
    return pd.Index(raw_ids)


def requested_users(args):
    """The raw user ids asked for, as strings, in order, each once."""
    users = list(args.users)
    if args.users_file:
        try:
            users += Path(args.users_file).read_text(encoding="utf-8").split()
        except OSError as error:
            raise CliError(f"cannot read --users_file {args.users_file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise CliError(f"--users_file {args.users_file} is not UTF-8 text (one raw user id per line)") from None
    return list(dict.fromkeys(users))


def dense_user_ids(raw_requested, user_ids, id_type, cache_dir):
    """Dense ids of the requested raw ids; an id the cache does not know is a one-line error."""
    keys = []
    for raw in raw_requested:
        try:
            keys.append(int(raw) if id_type == "int" else raw)
        except ValueError:
            keys.append(None)  # not an integer: cannot be one of this cache's integer ids
    dense = user_ids.get_indexer(keys)
    unknown = [raw for raw, index in zip(raw_requested, dense, strict=True) if index < 0]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CliError(
            f"unknown user {shown}: not in the training data of {cache_dir}; cold-start users (not in the "
            "training data) are not supported"
        )
    return torch.from_numpy(dense).long()


def check_topk(k, users, seen_counts, n_items, include_seen, user_ids):
    if k > n_items:
        raise CliError(f"--topk {k} is larger than the catalogue ({n_items} items)")
    if include_seen:
        return
    unseen = n_items - seen_counts[users]
    short = int(torch.argmin(unseen))
    if unseen[short] < k:
        raise CliError(
            f"user {user_ids[int(users[short])]} has only {int(unseen[short])} items it has not interacted with, "
            f"fewer than --topk {k}; use a smaller --topk or --include_seen"
        )


def known_pairs(data, users):
    """(user, item) of every interaction the cache records for `users`, each once, sorted by user.

    Training, validation and test pairs alike: a held-out item is one the user had, not one to
    recommend. Each once: the NCF paper's files may hold a test pair among the training pairs.
    """
    n_items = data.n_items
    wanted = torch.zeros(data.n_users, dtype=torch.bool)
    wanted[users] = True
    pairs = torch.cat(
        [pairs[wanted[pairs[:, 0]]] for pairs in (data.train, data.test, data.valid) if pairs is not None]
    )
    keys = torch.unique(pairs[:, 0] * n_items + pairs[:, 1])  # sorted, so grouped by user
    return torch.stack([keys // n_items, keys % n_items], dim=1)


def seen_items(known, starts, counts, chunk):
    """(row in chunk, item) of every known pair of the chunk's users, with no Python loop.

    The known pairs are sorted by user, so user u's items are known[starts[u] : starts[u] + counts[u], 1].
    """
    chunk_counts = counts[chunk]
    rows = torch.repeat_interleave(torch.arange(len(chunk)), chunk_counts)
    first_of_row = torch.cumsum(chunk_counts, 0) - chunk_counts
    positions = starts[chunk][rows] + torch.arange(len(rows)) - first_of_row[rows]
    return rows, known[positions, 1]


def top_items(model, users, known, seen_counts, k, include_seen, batch_size, device):
    """Dense item ids [users, k] and their logits, best first, scoring chunks of users x all items.

    score_grid gives forward()'s logits, factored so that the item half of the first MLP layer runs
    once per item, and each user's row the same whichever users share its chunk. Items are ranked
    by logit, not by sigmoid score: in float32 the sigmoid rounds large logits to 1.0 and would make
    ties. Equal logits keep ascending item id (a stable descending sort), so the order is deterministic.
    """
    n_items = model.embeddings()[0][1].num_embeddings
    starts = torch.cumsum(seen_counts, 0) - seen_counts
    all_items = torch.arange(n_items, device=device)
    top, top_logits = [], []
    with torch.inference_mode():
        for chunk in users.split(max(1, batch_size // n_items)):
            logits = model.score_grid(chunk.to(device), all_items)
            if not include_seen:
                rows, items = seen_items(known, starts, seen_counts, chunk)
                logits[rows.to(device), items.to(device)] = -torch.inf
            order = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
            top.append(order.cpu())
            top_logits.append(logits.gather(1, order).cpu())
    return torch.cat(top), torch.cat(top_logits)


def write_recommendations(path, user_raw, item_raw, scores):
    """user_raw [n], item_raw and scores [n, k]: a table on stdout, or a CSV / JSON file."""
    k = item_raw.shape[1]
    table = pd.DataFrame(
        {
            "user_id": np.repeat(user_raw, k),
            "rank": np.tile(np.arange(1, k + 1), len(user_raw)),
            "item_id": item_raw.reshape(-1),
            "score": scores.reshape(-1),
        }
    )
    if path is None:
        print(table.to_string(index=False, float_format="{:.6f}".format))
        return
    if Path(path).suffix.lower() == ".csv":
        text = table.to_csv(index=False)
    else:
        records = [
            {"user_id": user, "items": [{"item_id": i, "score": s} for i, s in zip(items, row, strict=True)]}
            for user, items, row in zip(user_raw.tolist(), item_raw.tolist(), scores.tolist(), strict=True)
        ]
        text = json.dumps(records, indent=2) + "\n"
    try:
        write_text_atomically(path, text)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror}") from None
    print(f"wrote the top {k} items of {len(user_raw)} users to {path}")


def recommend(args, device):
    data = load_cache(args.data)  # a cache without the id mapping files is an error here, naming them
    n_users, n_items = data.n_users, data.n_items
    user_ids = read_id_map(args.data, USER_IDS_FILE, data.meta["user_id_type"], n_users)
    item_ids = read_id_map(args.data, ITEM_IDS_FILE, data.meta["item_id_type"], n_items)
    users = dense_user_ids(requested_users(args), user_ids, data.meta["user_id_type"], args.data)
    known = known_pairs(data, users)
    seen_counts = torch.bincount(known[:, 0], minlength=n_users)
    check_topk(args.topk, users, seen_counts, n_items, args.include_seen, user_ids)
    model = load_model(args.load_checkpoint_path, device, n_users, n_items)
    top, logits = top_items(
        model, users, known, seen_counts, args.topk, args.include_seen, args.score_batch_size, device
    )
    scores = torch.sigmoid(logits.double()).numpy()
    user_raw = user_ids.to_numpy()[users.numpy()]
    item_raw = item_ids.to_numpy()[top.numpy()]
    write_recommendations(args.output, user_raw, item_raw, scores)


def main():
    require_torch()
    args = parse_args()
    device = pick_device(args.device)
    if args.mode == "benchmark":
        benchmark(args, device)
    else:
        recommend(args, device)


if __name__ == "__main__":
    run_main(main)
