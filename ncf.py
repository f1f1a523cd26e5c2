"""Train and evaluate an NCF model (NeuMF, GMF or MLP) on a data cache: one process, DDP on many GPUs or nodes, or CPU.

    python ncf.py --data data/cache/ml-20m
    torchrun --nproc_per_node=8 ncf.py --data data/cache/ml-20m --amp
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth

After every epoch each user's held-out item is ranked among its 100 test negatives and HR@K and
NDCG@K are reported (and likewise its validation item, when the cache has a validation split);
the best model so far — on validation when there is a split — is written to --checkpoint_dir/model.pth.
The training loss is the reference's binary cross-entropy, or a full or sampled softmax (--loss; the
Loss classes below): evaluation is the same for every loss, the model's scores being logits either way.
"""

import argparse
import contextlib
import functools
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import sharding
from dataloading import FullRanking, TrainBatches, load_cache, make_evaluator, metrics_from_histogram, rank_histogram
from neumf import MODELS, NeuMF
from utils import (
    CliError,
    Progress,
    all_reduce_sum,
    atomic_save,
    broadcast_int,
    enable_tf32,
    init_distributed,
    load_model_weights,
    load_state_dict_file,
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
    parser.add_argument(
        "-b",
        "--batch_size",
        type=int,
        default=2**20,
        help="global batch size, split across ranks; an optimizer step takes --grads_accumulated batches",
    )
    parser.add_argument("--valid_batch_size", type=int, default=2**20, help="samples scored at once in evaluation")
    parser.add_argument("-f", "--factors", type=int, default=64, help="size of the MF embeddings")
    parser.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64], help="MLP layer sizes")
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="bce",
        help="bce: binary cross-entropy on positives and -n sampled negatives (the reference); softmax: "
        "cross-entropy of each positive against the whole catalogue; sampled_softmax: against "
        "--softmax_negatives items drawn per batch",
    )
    parser.add_argument(
        "-n",
        "--negative_samples",
        type=int,
        default=None,
        help="--loss bce's negatives per positive in training (default 4); a softmax loss trains on positives only",
    )
    parser.add_argument(
        "--softmax_negatives",
        type=int,
        default=None,
        help=f"--loss sampled_softmax's negatives, drawn uniformly per batch and shared by its positives "
        f"(default {SAMPLED_NEGATIVES})",
    )
    parser.add_argument("-l", "--learning_rate", type=float, default=0.0045)
    parser.add_argument("-k", "--topk", type=int, default=10, help="K of HR@K and NDCG@K")
    parser.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: drawn and logged)")
    parser.add_argument(
        "-t", "--threshold", type=float, default=1.0, help="stop once HR@K (validation HR@K with a split) reaches it"
    )
    parser.add_argument("-b1", "--beta1", type=float, default=0.25, help="Adam beta1")
    parser.add_argument("-b2", "--beta2", type=float, default=0.5, help="Adam beta2")
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout after each MLP layer (0 disables it)")
    parser.add_argument(
        "--optimizer",
        choices=["adam", "sgd", "adagrad", "rowwise_adagrad"],
        default="adam",
        help="sgd: plain SGD, no momentum; adagrad, rowwise_adagrad: fbgemm's for sharded tables "
        "(--embedding_sharding), torch's Adagrad for the dense layers",
    )
    parser.add_argument(
        "--embedding_sharding",
        choices=sharding.KINDS,
        default="none",
        help="none: every rank holds every table (DDP); else the tables are sharded across the ranks with TorchRec: "
        "auto as its planner chooses, or table_wise, column_wise, row_wise (training only)",
    )
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
    parser.add_argument(
        "--grads_accumulated",
        type=int,
        default=1,
        help="whole batches of -b samples per optimizer step, as the reference: the gradients of their mean "
        "losses are summed (not averaged), and the batches after an epoch's last whole group are dropped",
    )
    parser.add_argument("--amp", action="store_true", help="mixed precision: fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--log_path", default="log.json", help="DLLogger JSON-lines log, appended to")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint_dir/last.pth")
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        default=1,
        help="epochs between writes of last.pth (the training state --resume continues from); the last epoch's "
        "is always written. --resume repeats the epochs after the last write",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by torch.distributed.launch; else LOCAL_RANK"
    )
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    positive = ("epochs", "batch_size", "valid_batch_size", "factors", "topk", "grads_accumulated", "checkpoint_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1")
    if args.patience is not None and args.patience < 1:
        raise CliError("--patience must be at least 1")
    check_loss_args(args)
    sharding.check_args(args)
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


def check_loss_args(args):
    """Refuse a loss's flag with another loss and fill in its default: -n is BCE's negatives per
    positive (0 under a softmax loss, whose batches hold positives only), --softmax_negatives the
    sampled softmax's."""
    if args.loss == "bce":
        args.negative_samples = 4 if args.negative_samples is None else args.negative_samples
    elif args.negative_samples not in (None, 0):
        raise CliError(f"-n/--negative_samples is --loss bce's: --loss {args.loss} trains on positives only")
    else:
        args.negative_samples = 0
    if args.negative_samples < 0:
        raise CliError("--negative_samples must not be negative")
    if args.loss == "sampled_softmax":
        args.softmax_negatives = SAMPLED_NEGATIVES if args.softmax_negatives is None else args.softmax_negatives
        if args.softmax_negatives < 1:
            raise CliError("--softmax_negatives must be at least 1")
    elif args.softmax_negatives is not None:
        raise CliError(f"--softmax_negatives is --loss sampled_softmax's, not --loss {args.loss}'s")


# --- losses -------------------------------------------------------------------------------------

LOSSES = ("bce", "softmax", "sampled_softmax")
SAMPLED_NEGATIVES = 1024  # --softmax_negatives' default
# The full softmax scores a batch a block of users at a time, at most this many (user, item) scores
# per block (an MLP also holds that many activations per hidden unit of its widest layer)
SOFTMAX_BLOCK_SCORES = 2**22


class Loss(nn.Module):
    """A training loss around the model: forward(users, items, labels) is the batch's mean loss.
    DDP wraps it, so that whatever scoring it does runs in DDP's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def start_epoch(self, seed):
        """Seed what the loss draws in an epoch (alike on every rank)."""


class BCE(Loss):
    """The reference's loss: binary cross-entropy of each (user, item, label) sample's logit."""

    def forward(self, users, items, labels):
        return F.binary_cross_entropy_with_logits(self.model(users, items).flatten().float(), labels)


class Softmax(Loss):
    """Cross-entropy of each positive (user, item) against every item of the catalogue.

    The batch is scored a block of users at a time, at most `block_scores` scores a block; with more
    than one block each block is checkpointed (its scores recomputed in the backward pass), so only
    one block's scores and activations are held at any time.
    """

    def __init__(self, model, n_items, block_scores=SOFTMAX_BLOCK_SCORES):
        super().__init__(model)
        if n_items > block_scores:
            raise CliError(
                f"--loss softmax scores at most {block_scores:,} (user, item) pairs at once, fewer than the "
                f"{n_items:,} items of one user's row: use --loss sampled_softmax"
            )
        self.n_items, self.users_per_block = n_items, block_scores // n_items

    def forward(self, users, items, labels):
        catalogue = torch.arange(self.n_items, device=users.device)
        blocks = list(zip(users.split(self.users_per_block), items.split(self.users_per_block), strict=True))
        if len(blocks) == 1:
            return self.block_loss(*blocks[0], catalogue) / len(users)
        total = sum(checkpoint(self.block_loss, *block, catalogue, use_reentrant=False) for block in blocks)
        return total / len(users)

    def block_loss(self, users, positives, catalogue):
        logits = self.model.catalogue_logits(users, catalogue).float()
        return F.cross_entropy(logits, positives.long(), reduction="sum")  # int32 ids: a long target


class SampledSoftmax(Loss):
    """Cross-entropy of each positive against `negatives` items drawn uniformly, with replacement,
    once per batch and shared by all its positives.

    The negatives' logits are corrected by -log(negatives * q) with q = 1 / n_items the probability
    of drawing an item (the logQ correction: their exp-sum then estimates the catalogue's), and a
    negative equal to a row's positive (an accidental hit) is left out of that row. With the whole
    catalogue as the negatives this is the full softmax. The draws follow a generator seeded per
    epoch alike on every rank: one process with the global batch draws what DDP's ranks draw.
    """

    def __init__(self, model, n_items, negatives):
        super().__init__(model)
        self.n_items, self.negatives, self.generator = n_items, negatives, None

    def start_epoch(self, seed):
        self.generator = torch.Generator(self.model.final.weight.device).manual_seed(seed)

    def forward(self, users, items, labels):
        negatives = torch.randint(0, self.n_items, (self.negatives,), generator=self.generator, device=users.device)
        return self.candidates_loss(users, items, negatives)

    def candidates_loss(self, users, positives, negatives):
        """The mean loss of positives against these shared negatives [S]."""
        positive_logits = self.model(users, positives).float()  # [B, 1]
        negative_logits = self.model.catalogue_logits(users, negatives).float()
        negative_logits = negative_logits - math.log(len(negatives) / self.n_items)
        negative_logits = negative_logits.masked_fill(negatives == positives[:, None], -math.inf)
        logits = torch.cat([positive_logits, negative_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(users), dtype=torch.long, device=users.device))


def make_loss(args, model, n_items):
    if args.loss == "softmax":
        return Softmax(model, n_items)
    if args.loss == "sampled_softmax":
        return SampledSoftmax(model, n_items, args.softmax_negatives)
    return BCE(model)


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
    blocks = scored_blocks(model, evaluator, args.valid_batch_size)
    if isinstance(model, sharding.ShardedNeuMF):  # its lookups are collectives: the ranks score in step
        blocks = model.in_step(blocks)
    with torch.inference_mode(), autocast:
        for logits, counted in blocks:
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


@functools.cache
def note(message):
    """Print a remark on stderr once per process, from rank 0 only."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"{Path(sys.argv[0]).name}: note: {message}", file=sys.stderr)


def make_optimizer(model, args, device):
    """Adam as the reference, fused: apex's FusedAdam when installed on CUDA, else torch's; or plain SGD.

    Not apex's with --amp on CUDA: GradScaler reads its inf check with .item(), a host sync every
    step, unless the optimizer takes the check on the device, as torch's fused ones do. An apex that
    does not work (built without its CUDA extensions, or for another torch) is said once and left out.
    """
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, fused=True)
    if args.optimizer in ("adagrad", "rowwise_adagrad"):  # the dense layers of a run whose tables use fbgemm's
        return torch.optim.Adagrad(model.parameters(), lr=args.learning_rate, eps=args.eps)
    settings = dict(lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.eps)
    if device.type == "cuda" and not args.amp:
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(model.parameters(), **settings)
        except ModuleNotFoundError as error:
            if error.name != "apex":
                note(f"apex is installed but does not load ({error}); using torch's fused Adam")
        except (ImportError, RuntimeError) as error:
            note(f"apex is installed but its FusedAdam does not work ({error}); using torch's fused Adam")
    return torch.optim.Adam(model.parameters(), fused=True, **settings)


def whole_groups(batches, accumulate):
    """The batches an epoch trains on: its whole groups of `accumulate` consecutive batches, one
    optimizer step each. The batches after the last whole group are dropped, as the reference does."""
    return batches[: len(batches) - len(batches) % accumulate]


def train_epoch(loss_module, optimizer, scaler, batches, args, autocast, progress):
    """One pass over this rank's batches, --grads_accumulated (G) whole batches per optimizer step;
    loss_module is a Loss around the model (BCE, Softmax, SampledSoftmax), or DDP of one.

    A step's gradient is the sum of its G batches' mean-loss gradients, as the reference's: G
    batches of B samples give G times the mean-loss gradient of the batch of G * B samples they
    make up (with DDP, whose all-reduce averages over ranks, B is the global batch). The batches
    after the last whole group are dropped. Returns the summed loss (without the L2 term), left
    on the device, and the number of samples trained on.
    """
    loss_module.train()
    batches = whole_groups(batches, args.grads_accumulated)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    module = getattr(loss_module, "module", loss_module).model  # the model inside DDP and the loss
    for step, (users, items, labels) in enumerate(batches):
        steps_now = (step + 1) % args.grads_accumulated == 0
        no_sync = getattr(loss_module, "no_sync", None)
        sync = contextlib.nullcontext() if steps_now or no_sync is None else no_sync()
        with sync:
            with autocast:
                loss = loss_module(users, items, labels)
                objective = loss
                if args.l2_regularization:
                    objective = loss + args.l2_regularization * module.embedding_l2(users, items) / len(labels)
            scaler.scale(objective).backward()
        if steps_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()  # apex's FusedAdam takes no set_to_none; both set the gradients to None
        loss_sum += loss.detach() * len(labels)
        progress.update()
    return loss_sum, sum(len(labels) for *_, labels in batches)


def epoch_seed(seed, epoch):
    """The seed of an epoch's negatives and shuffle: the same on every rank, so shards are disjoint."""
    return seed * 1_000_003 + epoch


# The flags a run is made of: --resume refuses to continue a run under other values, which would
# not apply (the optimizer state holds the run's learning rate and betas), make another run, or
# compare its best HR with one of another metric.
RUN_FLAGS = (
    "model", "factors", "layers", "dropout", "batch_size", "loss", "negative_samples", "softmax_negatives",
    "grads_accumulated", "optimizer",
    "learning_rate", "beta1", "beta2", "eps", "l2_regularization", "amp", "topk", "eval_protocol",
)  # fmt: skip


def save_checkpoint(state, path):
    """Every rank calls this; rank 0 writes `state` (a sharded run's tables are first gathered there)."""
    state = sharding.gathered(state)
    if state is not None:
        atomic_save(state, path)


def save_training_state(path, model, optimizer, scaler, epoch, seed, best, data, run_time, args):
    save_checkpoint(
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
    state = read_checkpoint(path, mmap=args.embedding_sharding != "none")  # each rank reads its shards' rows
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
    if args.embedding_sharding == "none":
        sharding.check_replicated_resume(state.get("optimizer", {}), path)
    try:
        optimizer.load_state_dict(optimizer_state_for(optimizer, state["optimizer"], path))
        if state["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        # else a run without fp16 loss scaling (fp32, or bf16 --amp on CPU) goes on in fp16: a new scale starts
    except (KeyError, ValueError) as error:
        raise CliError(f"{path} does not hold a usable training state ({error})") from None
    return state["epochs_done"], state["seed"], state["best"], state.get("run_time", state["best"]["time"])


def optimizer_state_for(optimizer, saved, path):
    """The saved Adam state in the layout of `optimizer`, so that a run goes on across devices with
    or without apex: apex's FusedAdam keeps the step count (its bias correction) per parameter group,
    torch's Adam per parameter. Other states, and states of the same layout, are returned as saved.
    """
    per_group = "bias_correction" in optimizer.defaults  # apex's FusedAdam
    groups = saved["param_groups"]
    if isinstance(optimizer, torch.optim.SGD) or per_group == ("bias_correction" in groups[0]):
        return saved
    own_groups = optimizer.state_dict()["param_groups"]  # this optimizer's settings: --resume checked them
    if len(own_groups) != len(groups):
        raise ValueError(f"{len(groups)} parameter groups, not {len(own_groups)}")
    if per_group:  # torch's per-parameter counts -> one per group
        for own, group in zip(own_groups, groups, strict=True):
            steps = {int(saved["state"][i]["step"]) for i in group["params"] if i in saved["state"]}
            if len(steps) > 1:
                raise CliError(
                    f"{path} holds an Adam state whose parameters took different numbers of steps, which apex's "
                    "FusedAdam (one count per group) cannot continue; resume without apex"
                )
            own |= {"step": steps.pop()} if steps else {}
        states = {i: {k: v for k, v in s.items() if k != "step"} for i, s in saved["state"].items()}
        return {"state": states, "param_groups": own_groups}
    states = {}  # apex's per-group count -> one per parameter
    for group in groups:
        for i in group["params"]:
            if i in saved["state"]:
                states[i] = saved["state"][i] | {"step": torch.tensor(float(group["step"]))}
    return {"state": states, "param_groups": own_groups}


def make_autocast(args, device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def check_writable(directory):
    """Make the checkpoint directory and try a file in it: a run learns at start-up, not after its
    first epoch, that it could not keep its checkpoints. Temporary files of a run killed while it
    wrote a checkpoint (utils.atomic_save's) are deleted: nothing else would ever remove them."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
    except OSError as error:
        raise CliError(f"cannot write checkpoints in {directory}: {error.strerror}") from None


def make_scaler(args, device):
    """fp16's dynamic loss scaling: --amp on CUDA only (bf16 on CPU needs none)."""
    return torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")


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
    epoch's evaluation and checkpoints and may raise to stop the run (tune.py prunes trials this way).
    """
    checkpoint_dir = Path(args.checkpoint_dir)
    if rank == 0:
        check_writable(checkpoint_dir)
    train_batches = TrainBatches(
        data.train, data.n_items, args.negative_samples, args.batch_size, rank, world_size, device
    )
    if len(train_batches) < args.grads_accumulated:
        raise CliError(
            f"--grads_accumulated {args.grads_accumulated} needs as many batches per epoch, and -b {args.batch_size} "
            f"makes {len(train_batches)} batches of this data: lower one of them"
        )
    autocast = make_autocast(args, device)
    loss_module = make_loss(args, model, data.n_items)
    if args.embedding_sharding == "none":
        optimizer = make_optimizer(model, args, device)
        ddp_loss = DistributedDataParallel(loss_module) if world_size > 1 else loss_module
    else:  # the tables train sharded; `model` is then the ShardedNeuMF that evaluation and checkpoints see
        model, ddp_loss, optimizer = sharding.shard(loss_module, args, device, world_size, make_optimizer)
    scaler = make_scaler(args, device)
    validating = "valid" in evaluators
    selected, best_key = (f"val_hr@{args.topk}", "val_hr") if validating else (f"hr@{args.topk}", "hr")
    first_epoch, best, run_time = 0, {"hr": -1.0, "val_hr": -1.0, "epoch": -1, "time": 0.0}, 0.0
    if args.resume:
        first_epoch, seed, best, run_time = load_training_state(
            checkpoint_dir / LAST_CHECKPOINT, model, optimizer, scaler, data, args
        )
        log(f"resuming after epoch {first_epoch - 1} (best {selected} {best[best_key]:.4f})")
    elif args.load_checkpoint_path:  # a sharded run's ranks each read their shards' rows of it
        state = load_state_dict_file(args.load_checkpoint_path, mmap=args.embedding_sharding != "none")
        load_model_weights(model, args.load_checkpoint_path, state)
    log(
        f"{args.model}: {data.n_users:,} users, {data.n_items:,} items, {len(data.train):,} positives; "
        f"{args.loss} loss; "
        f"{world_size} process(es) on {device}; seed {seed}; {args.eval_protocol} evaluation protocol"
        + (f"; tables sharded {args.embedding_sharding}" if args.embedding_sharding != "none" else "")
        + ("; model selection on the validation split" if validating else "")
    )

    throughputs, eval_throughputs, target_time = [], [], None
    for epoch in range(first_epoch, args.epochs):
        torch.manual_seed(epoch_seed(seed, epoch) * world_size + rank)  # dropout: per rank, per epoch
        loss_module.start_epoch(epoch_seed(seed, epoch))
        start = time.time()
        batches = whole_groups(train_batches.epoch(epoch_seed(seed, epoch)), args.grads_accumulated)
        samples = sum(len(labels) for *_, labels in batches) * world_size  # every rank has batches of these sizes
        progress = Progress(len(batches), samples, f"epoch {epoch}", rank == 0)
        loss_sum, _ = train_epoch(ddp_loss, optimizer, scaler, batches, args, autocast, progress)
        train_loss = all_reduce_sum(loss_sum.double()).item() / samples
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
        throughputs.append(samples / train_time)
        eval_throughputs.append(pairs / eval_time)
        improved = metrics[selected] > best[best_key]
        if improved:
            best = {
                "hr": metrics[f"hr@{args.topk}"],
                "ndcg": metrics[f"ndcg@{args.topk}"],
                "val_hr": metrics.get(f"val_hr@{args.topk}", -1.0),
                "val_ndcg": metrics.get(f"val_ndcg@{args.topk}", -1.0),
                "epoch": epoch,
                "time": run_time,
            }
        stop = None
        if metrics[selected] >= args.threshold:
            target_time = run_time
            stop = f"{selected} {metrics[selected]:.4f} reached the threshold {args.threshold}; stopping"
        elif args.patience is not None and epoch - best["epoch"] >= args.patience:
            stop = f"no better {selected} for {args.patience} epochs; stopping"

        # every rank takes part (a sharded run gathers its tables onto rank 0), rank 0 writes while the others
        # wait at the next collective: the time is logged, and --checkpoint_every spaces out last.pth, the
        # larger file (it holds Adam's moments too)
        start = time.time()
        if improved:
            save_checkpoint(model.state_dict(), checkpoint_dir / BEST_CHECKPOINT)
        last_epoch = stop is not None or epoch + 1 == args.epochs
        if last_epoch or (epoch + 1) % args.checkpoint_every == 0:
            save_training_state(
                checkpoint_dir / LAST_CHECKPOINT, model, optimizer, scaler, epoch, seed, best, data, run_time, args
            )
        checkpoint_time = time.time() - start
        log(
            f"epoch {epoch}: {metrics_line(metrics, args.topk)}  train loss {train_loss:.4f}  "
            f"valid loss {metrics.get('val_loss', metrics['validation_loss']):.4f}  {throughputs[-1]:,.0f} samples/s  "
            f"train {train_time:.1f}s  eval {eval_time:.1f}s  checkpoints {checkpoint_time:.1f}s"
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
                "checkpoint_time": checkpoint_time,
            },
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stop is not None:
            log(stop)
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
    enable_tf32(device)
    data = load_cache(args.data)
    seed = broadcast_int(args.seed if args.seed is not None else random.randrange(2**31), device)
    torch.manual_seed(seed)  # the same initial model on every rank
    sharded = args.mode == "train" and args.embedding_sharding != "none"
    # a sharded run's model is built on the CPU: sharding.shard copies each rank's shards of it to the device
    model = make_model(args, data, torch.device("cpu") if sharded else device)
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
