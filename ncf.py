"""Train and evaluate an NCF model (NeuMF, GMF or MLP) on a data cache: one process, DDP on many GPUs or nodes, or CPU.

    python ncf.py --data data/cache/ml-20m
    torchrun --nproc_per_node=8 ncf.py --data data/cache/ml-20m --amp
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth

After every epoch each user's held-out item is ranked among its 100 test negatives and HR@K and
NDCG@K are reported (and likewise its validation item, when the cache has a validation split);
the best model so far — on validation when there is a split — is written to --checkpoint_dir/model.pth.
"""

import argparse
import contextlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dataloading import FullRanking, TrainBatches, load_cache, make_evaluator, metrics_from_histogram, rank_histogram
from neumf import MODELS, NeuMF
from utils import (
    CliError,
    Progress,
    all_reduce_sum,
    atomic_save,
    broadcast_int,
    init_distributed,
    load_model_weights,
    make_logger,
    model_state,
    read_checkpoint,
    require_torch,
    run_main,
)

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "model.pth"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train an NCF model (NeuMF, GMF or MLP) and report HR@K / NDCG@K.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data", required=True, help="cache directory written by convert.py / prepare_dataset.sh")
    parser.add_argument("--model", choices=MODELS, default="neumf", help="NeuMF, or one of its branches alone")
    parser.add_argument("-e", "--epochs", type=int, default=30, help="number of epochs")
    parser.add_argument("-b", "--batch_size", type=int, default=2**20, help="global batch size, split across ranks")
    parser.add_argument("--valid_batch_size", type=int, default=2**20, help="samples scored at once in evaluation")
    parser.add_argument("-f", "--factors", type=int, default=64, help="size of the MF embeddings")
    parser.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64], help="MLP layer sizes")
    parser.add_argument("-n", "--negative_samples", type=int, default=4, help="negatives per positive in training")
    parser.add_argument("-l", "--learning_rate", type=float, default=0.0045)
    parser.add_argument("-k", "--topk", type=int, default=10, help="K of HR@K and NDCG@K")
    parser.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: drawn and logged)")
    parser.add_argument("-t", "--threshold", type=float, default=1.0, help="stop once HR@K reaches it")
    parser.add_argument("-b1", "--beta1", type=float, default=0.25, help="Adam beta1")
    parser.add_argument("-b2", "--beta2", type=float, default=0.5, help="Adam beta2")
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout after each MLP layer (0 disables it)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="sgd: plain SGD, no momentum")
    parser.add_argument(
        "--l2_regularization",
        type=float,
        default=0.0,
        help="add this times the squared norms of the embedding rows each sample uses, per sample, to the loss",
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="stop after this many epochs without a better (validation) HR@K"
    )
    parser.add_argument("--pretrained_gmf", help="GMF model.pth to initialise NeuMF's MF branch from")
    parser.add_argument("--pretrained_mlp", help="MLP model.pth to initialise NeuMF's MLP branch from")
    parser.add_argument(
        "--pretrain_alpha", type=float, default=0.5, help="weight of the GMF's final layer in NeuMF's (MLP: 1 - it)"
    )
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where model.pth and last.pth are written")
    parser.add_argument("--load_checkpoint_path", default=None, help="model.pth to evaluate (test) or start from")
    parser.add_argument("--mode", choices=["train", "test"], default="train")
    parser.add_argument(
        "--eval_protocol",
        choices=["reference", "exact", "full"],
        default="reference",
        help="reference: the cached 100 negatives, duplicates masked; exact: 100 distinct never-seen "
        "negatives per user; full: rank against every item the user did not train on",
    )
    parser.add_argument("--grads_accumulated", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--amp", action="store_true", help="mixed precision: fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--log_path", default="log.json", help="DLLogger JSON-lines log")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint_dir/last.pth")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by torch.distributed.launch; else LOCAL_RANK"
    )
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    positive = ("epochs", "batch_size", "valid_batch_size", "factors", "topk", "grads_accumulated")
    for name in positive:
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1")
    if args.patience is not None and args.patience < 1:
        raise CliError("--patience must be at least 1")
    if args.negative_samples < 0:
        raise CliError("--negative_samples must not be negative")
    if any(size < 1 for size in args.layers) or args.layers[0] % 2:
        raise CliError(f"--layers must be positive and the first one even (user and item halves), got {args.layers}")
    in_range = {  # name: (low, high, high included); NaN is in no range
        "dropout": (0, 1, False),
        "beta1": (0, 1, False),
        "beta2": (0, 1, False),
        "pretrain_alpha": (0, 1, True),
        "eps": (0, math.inf, False),
        "l2_regularization": (0, math.inf, False),
    }
    for name, (low, high, high_included) in in_range.items():
        value = getattr(args, name)
        if not (low <= value < high or (high_included and value == high)):
            raise CliError(f"--{name} must be in [{low}, {high}{']' if high_included else ')'}, got {value}")
    if not 0 < args.learning_rate < math.inf:
        raise CliError(f"--learning_rate must be positive and finite, got {args.learning_rate}")
    if math.isnan(args.threshold):
        raise CliError("--threshold must be a number")
    if args.mode == "test" and not args.load_checkpoint_path:
        raise CliError("--mode test needs --load_checkpoint_path")
    if args.mode == "test" and args.resume:
        raise CliError("--resume only applies to --mode train")
    pretrained = [flag for flag in ("pretrained_gmf", "pretrained_mlp") if getattr(args, flag)]
    if pretrained:
        if args.model != "neumf":
            raise CliError(f"--{pretrained[0]} initialises NeuMF: it needs --model neumf, not {args.model}")
        if len(pretrained) == 1:
            raise CliError("pre-training needs both --pretrained_gmf and --pretrained_mlp")
        if args.mode == "test" or args.resume or args.load_checkpoint_path:
            raise CliError(
                "--pretrained_gmf/--pretrained_mlp start a new training run: not with --mode test, "
                "--resume or --load_checkpoint_path"
            )


# --- evaluation -------------------------------------------------------------------------------


def scored_blocks(model, evaluator, batch_size):
    """(logits [users, n + 1] with the positive last, counted [users, n]) for blocks of users."""
    if isinstance(evaluator, FullRanking):
        per_block = max(1, batch_size // evaluator.n_items)
        for start in range(0, evaluator.n_users, per_block):
            stop = min(start + per_block, evaluator.n_users)
            positives = evaluator.positives[start:stop, None]
            logits = model.score_grid(evaluator.users[start:stop], evaluator.items).float()
            counted = ~evaluator.seen(start, stop)
            counted.scatter_(1, positives, False)
            yield torch.cat([logits, logits.gather(1, positives)], dim=1), counted
        return
    per_block = max(1, batch_size // evaluator.items.shape[1])
    blocks = zip(
        evaluator.users.split(per_block),
        evaluator.items.split(per_block),
        evaluator.counted.split(per_block),
        strict=True,
    )
    for users, items, counted in blocks:
        yield model.score_grid(users, items).float(), counted


def evaluate(model, evaluator, args, autocast):
    """HR@K, NDCG@K, BCE loss and the number of (user, item) pairs scored, summed exactly over ranks.

    The loss is over the candidates that count (label 0) and the positives (label 1). The device
    is not synchronised until the single all-reduce at the end.
    """
    model.eval()
    device = evaluator.users.device
    histogram = torch.zeros(args.topk + 1, dtype=torch.float64, device=device)  # exact integer counts
    loss, candidates = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    with torch.inference_mode(), autocast:
        for logits, counted in scored_blocks(model, evaluator, args.valid_batch_size):
            histogram += rank_histogram(logits, counted, args.topk)
            loss += (F.softplus(logits[:, :-1]) * counted).sum() + F.softplus(-logits[:, -1]).sum()
            candidates += counted.sum() + len(logits)
    pairs = torch.tensor([evaluator.pairs], dtype=torch.float64, device=device)
    totals = all_reduce_sum(torch.cat([histogram, loss[None], candidates[None], pairs]))
    hits, ndcg = metrics_from_histogram(totals[: args.topk + 1])
    loss, candidates, pairs = totals[args.topk + 1 :].tolist()
    return hits.item() / evaluator.n_users_total, ndcg.item() / evaluator.n_users_total, loss / candidates, pairs


# --- training ---------------------------------------------------------------------------------


def evaluate_splits(model, evaluators, args, autocast):
    """{metric name: value} of every split (test keys as the reference names them, validation ones
    prefixed `val_`), and the pairs scored."""
    metrics, pairs = {}, 0
    for split, evaluator in evaluators.items():
        hr, ndcg, loss, scored = evaluate(model, evaluator, args, autocast)
        prefix = "val_" if split == "valid" else ""
        metrics |= {f"{prefix}hr@{args.topk}": hr, f"{prefix}ndcg@{args.topk}": ndcg}
        metrics["val_loss" if split == "valid" else "validation_loss"] = loss
        pairs += scored
    return metrics, pairs


def metrics_line(metrics, k):
    line = f"HR@{k} {metrics[f'hr@{k}']:.4f}  NDCG@{k} {metrics[f'ndcg@{k}']:.4f}"
    if f"val_hr@{k}" in metrics:
        line = f"valid HR@{k} {metrics[f'val_hr@{k}']:.4f}  NDCG@{k} {metrics[f'val_ndcg@{k}']:.4f}  test {line}"
    return line


# --- training ---------------------------------------------------------------------------------


def make_model(args, data, device):
    """The model --model names, initialised from the pre-trained GMF and MLP when given."""
    model = NeuMF(data.n_users, data.n_items, args.factors, args.layers, args.dropout, kind=args.model)
    if args.pretrained_gmf:
        branches = {}
        for kind, path in (("gmf", args.pretrained_gmf), ("mlp", args.pretrained_mlp)):
            branches[kind] = NeuMF(data.n_users, data.n_items, args.factors, args.layers, kind=kind)
            load_model_weights(branches[kind], path)
        model.init_from_pretrained(branches["gmf"], branches["mlp"], args.pretrain_alpha)
    return model.to(device)


def make_optimizer(model, args, device):
    """Adam as the reference, fused: apex's FusedAdam when installed on CUDA, else torch's; or plain SGD.

    Not apex's with --amp on CUDA: GradScaler reads its inf check with .item(), a host sync every
    step, unless the optimizer takes the check on the device, as torch's fused ones do.
    """
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, fused=True)
    settings = dict(lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.eps)
    if device.type == "cuda" and not args.amp:
        with contextlib.suppress(ImportError):
            from apex.optimizers import FusedAdam

            return FusedAdam(model.parameters(), **settings)
    return torch.optim.Adam(model.parameters(), fused=True, **settings)


def train_epoch(model, optimizer, scaler, batches, args, autocast, progress):
    """One pass over this rank's batches; returns the summed loss (without the L2 term), left on the device."""
    model.train()
    loss_sum = torch.zeros((), device=batches[0][0].device)
    accumulate = args.grads_accumulated
    module = getattr(model, "module", model)  # the model inside DDP
    for step, (users, items, labels) in enumerate(batches):
        last_micro_batch = (step + 1) % accumulate == 0 or step + 1 == len(batches)
        sync = contextlib.nullcontext() if last_micro_batch or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                logits = model(users, items).flatten()
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
                objective = loss
                if args.l2_regularization:
                    objective = loss + args.l2_regularization * module.embedding_l2(users, items) / len(labels)
            scaler.scale(objective / accumulate).backward()
        if last_micro_batch:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * len(labels)
        progress.update()
    return loss_sum


def epoch_seed(seed, epoch):
    """The seed of an epoch's negatives and shuffle: the same on every rank, so shards are disjoint."""
    return seed * 1_000_003 + epoch


# The flags a run is made of: --resume refuses to continue a run under other values, which would
# not apply (the optimizer state holds the run's learning rate and betas), make another run, or
# compare its best HR with one of another metric.
RUN_FLAGS = (
    "model", "factors", "layers", "dropout", "batch_size", "negative_samples", "grads_accumulated", "optimizer",
    "learning_rate", "beta1", "beta2", "eps", "l2_regularization", "amp", "topk", "eval_protocol",
)  # fmt: skip


def save_training_state(path, model, optimizer, scaler, epoch, seed, best, data, run_time, args):
    atomic_save(
        {
            "flags": {name: getattr(args, name) for name in RUN_FLAGS},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epochs_done": epoch + 1,
            "seed": seed,
            "best": best,
            "run_time": run_time,  # training + evaluation seconds so far: the clock of time_to_*
            "data_sha256": data.meta["source_sha256"],
            "validation": data.valid is not None,
        },
        path,
    )


def load_training_state(path, model, optimizer, scaler, data, args):
    state = read_checkpoint(path)
    if state.get("data_sha256") != data.meta["source_sha256"]:
        raise CliError(f"{path} was trained on another dataset than --data; start a new run without --resume")
    if state.get("validation", False) != (data.valid is not None):
        split = ("with", "has none") if state.get("validation") else ("without", "has one")
        raise CliError(
            f"{path} was trained on a cache {split[0]} a validation split and --data {split[1]}; "
            "resume on the run's cache or start a new run"
        )
    saved = state.get("flags", {})  # absent from checkpoints written before the flags were saved
    other = [
        f"--{name} {getattr(args, name)} (the run has {saved[name]})"
        for name in RUN_FLAGS
        if name in saved and saved[name] != getattr(args, name)
    ]
    if args.seed is not None and args.seed != state.get("seed"):
        other.append(f"--seed {args.seed} (the run has {state.get('seed')})")
    if other:
        raise CliError(f"{path} is another run: {', '.join(other)}; resume with the run's settings or start a new run")
    load_model_weights(model, path, model_state(state, path))
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError) as error:
        raise CliError(f"{path} does not hold a usable training state ({error})") from None
    return state["epochs_done"], state["seed"], state["best"], state.get("run_time", state["best"]["time"])


def make_autocast(args, device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def make_evaluators(args, data, rank, world_size, device):
    """{split: this rank's evaluator}: the test split, and the validation split when the cache has one."""
    splits = ["valid", "test"] if data.valid is not None else ["test"]
    return {split: make_evaluator(data, split, args.eval_protocol, rank, world_size, device) for split in splits}


def test(model, evaluators, args, autocast, logger, log):
    """--mode test: evaluate a checkpoint once."""
    load_model_weights(model, args.load_checkpoint_path)
    start = time.time()
    metrics, pairs = evaluate_splits(model, evaluators, args, autocast)
    elapsed = time.time() - start
    k = args.topk
    line = f"HR@{k} = {metrics[f'hr@{k}']:.4f}, NDCG@{k} = {metrics[f'ndcg@{k}']:.4f}"
    if f"val_hr@{k}" in metrics:
        valid = f"HR@{k} = {metrics[f'val_hr@{k}']:.4f}, NDCG@{k} = {metrics[f'val_ndcg@{k}']:.4f}"
        line = f"validation {valid}; test {line}"
    log(f"{args.load_checkpoint_path} ({args.eval_protocol} protocol): {line}")
    logger.log((), metrics | {"eval_throughput": pairs / elapsed})


def train(model, evaluators, data, seed, args, device, rank, world_size, logger, log, on_epoch=None):
    """Train for --epochs (or until --threshold / --patience stops it) and return the best epoch's record.

    The best epoch is the one with the highest validation HR@K when the cache has a validation
    split (the test HR@K otherwise); on_epoch(epoch, metrics), when given, is called after each
    epoch's evaluation and may raise to stop the run (tune.py prunes trials this way).
    """
    autocast = make_autocast(args, device)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    checkpoint_dir = Path(args.checkpoint_dir)
    validating = "valid" in evaluators
    selected, best_key = (f"val_hr@{args.topk}", "val_hr") if validating else (f"hr@{args.topk}", "hr")
    first_epoch, best, run_time = 0, {"hr": -1.0, "val_hr": -1.0, "epoch": -1, "time": 0.0}, 0.0
    if args.resume:
        first_epoch, seed, best, run_time = load_training_state(
            checkpoint_dir / LAST_CHECKPOINT, model, optimizer, scaler, data, args
        )
        log(f"resuming after epoch {first_epoch - 1} (best {selected} {best[best_key]:.4f})")
    elif args.load_checkpoint_path:
        load_model_weights(model, args.load_checkpoint_path)
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    train_batches = TrainBatches(
        data.train, data.n_items, args.negative_samples, args.batch_size, rank, world_size, device
    )
    log(
        f"{args.model}: {data.n_users:,} users, {data.n_items:,} items, {len(data.train):,} positives; "
        f"{world_size} process(es) on {device}; seed {seed}; {args.eval_protocol} evaluation protocol"
        + ("; model selection on the validation split" if validating else "")
    )

    throughputs, eval_throughputs, target_time = [], [], None
    for epoch in range(first_epoch, args.epochs):
        torch.manual_seed(epoch_seed(seed, epoch) * world_size + rank)  # dropout: per rank, per epoch
        progress = Progress(len(train_batches), train_batches.samples_per_epoch, f"epoch {epoch}", rank == 0)
        start = time.time()
        batches = train_batches.epoch(epoch_seed(seed, epoch))
        loss_sum = train_epoch(ddp_model, optimizer, scaler, batches, args, autocast, progress)
        train_loss = all_reduce_sum(loss_sum.double()).item() / (train_batches.samples_per_rank * world_size)
        train_time = time.time() - start
        progress.close()
        if not math.isfinite(train_loss):
            raise CliError(
                f"training diverged in epoch {epoch} (loss {train_loss}); the last good checkpoint in "
                f"{checkpoint_dir} is kept. Try a lower --learning_rate or --amp off"
            )
        start = time.time()
        metrics, pairs = evaluate_splits(model, evaluators, args, autocast)
        eval_time = time.time() - start
        run_time += train_time + eval_time
        throughputs.append(train_batches.samples_per_rank * world_size / train_time)
        eval_throughputs.append(pairs / eval_time)
        log(
            f"epoch {epoch}: {metrics_line(metrics, args.topk)}  train loss {train_loss:.4f}  "
            f"valid loss {metrics.get('val_loss', metrics['validation_loss']):.4f}  {throughputs[-1]:,.0f} samples/s  "
            f"train {train_time:.1f}s  eval {eval_time:.1f}s"
        )
        logger.log(
            (epoch,),
            {
                "train_throughput": throughputs[-1],
                **metrics,
                "train_epoch_time": train_time,
                "validation_epoch_time": eval_time,
                "eval_throughput": eval_throughputs[-1],
                "train_loss": train_loss,
            },
        )
        if metrics[selected] > best[best_key]:
            best = {
                "hr": metrics[f"hr@{args.topk}"],
                "ndcg": metrics[f"ndcg@{args.topk}"],
                "val_hr": metrics.get(f"val_hr@{args.topk}", -1.0),
                "val_ndcg": metrics.get(f"val_ndcg@{args.topk}", -1.0),
                "epoch": epoch,
                "time": run_time,
            }
            if rank == 0:
                atomic_save(model.state_dict(), checkpoint_dir / BEST_CHECKPOINT)
        if rank == 0:
            save_training_state(
                checkpoint_dir / LAST_CHECKPOINT, model, optimizer, scaler, epoch, seed, best, data, run_time, args
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if metrics[selected] >= args.threshold:
            target_time = run_time
            log(f"{selected} {metrics[selected]:.4f} reached the threshold {args.threshold}; stopping")
            break
        if args.patience is not None and epoch - best["epoch"] >= args.patience:
            log(f"no better {selected} for {args.patience} epochs; stopping")
            break

    summary = {"best_accuracy": best["hr"], "best_epoch": best["epoch"], "time_to_best_model": best["time"]}
    if validating:
        summary["best_val_accuracy"] = best["val_hr"]
    if throughputs:
        summary |= {
            "best_train_throughput": max(throughputs),
            "mean_train_throughput": sum(throughputs) / len(throughputs),
            "best_eval_throughput": max(eval_throughputs),
            "mean_eval_throughput": sum(eval_throughputs) / len(eval_throughputs),
        }
    if target_time is not None:
        summary["time_to_target"] = target_time
    logger.log((), summary)
    chosen = f", chosen by validation HR@{args.topk} {best['val_hr']:.4f}" if validating else ""
    log(
        f"best HR@{args.topk} {best['hr']:.4f} at epoch {best['epoch']}{chosen}; "
        f"model in {checkpoint_dir / BEST_CHECKPOINT}"
    )
    return best


def main():
    require_torch()
    args = parse_args()
    rank, world_size, device = init_distributed(args.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = load_cache(args.data)
    seed = broadcast_int(args.seed if args.seed is not None else random.randrange(2**31), device)
    torch.manual_seed(seed)  # the same initial model on every rank
    model = make_model(args, data, device)
    evaluators = make_evaluators(args, data, rank, world_size, device)
    logger = make_logger(args.log_path, rank == 0)
    log = print if rank == 0 else (lambda *_, **__: None)
    logger.log("PARAMETER", {**vars(args), "seed": seed, "world_size": world_size, "device": str(device)})
    if args.mode == "test":
        test(model, evaluators, args, make_autocast(args, device), logger, log)
    else:
        train(model, evaluators, data, seed, args, device, rank, world_size, logger, log)
    logger.close()
    if world_size > 1:  # leave together: a rank that tears gloo down while rank 0 still writes can abort
        torch.distributed.barrier()


if __name__ == "__main__":
    run_main(main)
