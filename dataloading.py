"""Cached tensors -> training batches (negatives sampled on the device) and evaluation candidates.

Everything lives on the training device. An epoch never copies between host and device and
never loops in Python over samples: it draws the negatives, shuffles the whole augmented epoch
once, and hands each rank an equal, disjoint share of it as a list of batch views.
"""

from dataclasses import dataclass

import numpy as np
import torch

from convert import (
    NEGATIVES_FILE,
    TEST_FILE,
    TRAIN_FILE,
    VALID_FILE,
    VALID_NEGATIVES_FILE,
    nth_free_items,
    read_metadata,
    split_seed,
    user_starts,
)
from utils import CliError


@dataclass
class CachedData:
    train: torch.Tensor  # [n_train, 2] (user, item)
    test: torch.Tensor  # [n_users, 2], row u is user u's held-out positive
    test_negatives: torch.Tensor  # [n_users, valid_negative]
    meta: dict
    valid: torch.Tensor | None = None  # [n_users, 2], row u is user u's validation positive (convert.py --validation)
    valid_negatives: torch.Tensor | None = None  # [n_users, valid_negative]

    @property
    def n_users(self):
        return self.meta["n_users"]

    @property
    def n_items(self):
        return self.meta["n_items"]


def load_cache(cache_dir):
    """Load and check a cache written by convert.py; any problem is a one-line CliError."""
    meta = read_metadata(cache_dir)
    validation = (VALID_FILE, VALID_NEGATIVES_FILE) if meta.get("validation") else ()
    tensors = {}
    for name in (TRAIN_FILE, TEST_FILE, NEGATIVES_FILE) + validation:
        try:
            tensors[name] = torch.load(f"{cache_dir}/{name}", map_location="cpu", weights_only=True)
        except Exception as error:
            raise CliError(f"{cache_dir}/{name} is corrupt ({type(error).__name__}); run convert.py again") from None
    n_users, n_items = meta["n_users"], meta["n_items"]
    shapes = {
        TRAIN_FILE: (meta["n_train"], 2),
        TEST_FILE: (n_users, 2),
        NEGATIVES_FILE: (n_users, meta["valid_negative"]),
        VALID_FILE: (n_users, 2),
        VALID_NEGATIVES_FILE: (n_users, meta["valid_negative"]),
    }
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tuple(tensor.shape) != shapes[name]:
            raise CliError(f"{cache_dir}/{name} does not match metadata.json (expected int32 {list(shapes[name])})")
    # int32 on disk (half the bytes); int64 in memory, where ids are multiplied into keys and index tensors
    tensors = {name: tensor.long() for name, tensor in tensors.items()}
    train = tensors[TRAIN_FILE]
    pairs = [tensors[name][:, 1] for name in (TRAIN_FILE, TEST_FILE, VALID_FILE) if name in tensors]
    negatives = [tensors[name].flatten() for name in (NEGATIVES_FILE, VALID_NEGATIVES_FILE) if name in tensors]
    items = torch.cat(pairs + negatives)
    if train[:, 0].max() >= n_users or items.max() >= n_items or items.min() < 0 or train.min() < 0:
        raise CliError(f"{cache_dir} holds ids outside its {n_users} users and {n_items} items; run convert.py again")
    for name in (TEST_FILE, VALID_FILE):
        if name in tensors and not torch.equal(tensors[name][:, 0], torch.arange(n_users)):
            raise CliError(f"{cache_dir}/{name} must hold one row per user, in user order")
    valid, valid_negatives = tensors.get(VALID_FILE), tensors.get(VALID_NEGATIVES_FILE)
    return CachedData(train, tensors[TEST_FILE], tensors[NEGATIVES_FILE], meta, valid, valid_negatives)


class TrainBatches:
    """Per-epoch training batches for one rank.

    Each epoch, every positive gets `negatives` items drawn uniformly from all items (no check
    against the user's positives, as the reference), the augmented epoch is shuffled as a whole
    with a generator every rank seeds alike, and rank r takes slice r of `world_size` equal slices.
    The last batch may be short; nothing is dropped but the < world_size samples that do not
    divide evenly between ranks (ncf.train_epoch then drops the batches after an epoch's last whole
    group of --grads_accumulated batches).
    """

    def __init__(self, train_pairs, n_items, negatives, batch_size, rank, world_size, device):
        if batch_size < world_size:
            raise CliError(f"the batch size ({batch_size}) must be at least the number of processes ({world_size})")
        self.users = train_pairs[:, 0].to(device, torch.int32)
        self.items = train_pairs[:, 1].to(device, torch.int32)
        self.n_items = n_items
        self.negatives = negatives
        self.local_batch = batch_size // world_size
        self.rank, self.world_size, self.device = rank, world_size, device
        self.samples_per_epoch = len(self.users) * (1 + negatives)  # across all ranks
        self.samples_per_rank = self.samples_per_epoch // world_size

    def __len__(self):
        return -(-self.samples_per_rank // self.local_batch)

    def epoch(self, seed):
        """This rank's batches of (users, items, labels) for the epoch that `seed` determines."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        n_pos = len(self.users)
        negative_items = torch.randint(
            0, self.n_items, (n_pos * self.negatives,), generator=generator, device=self.device, dtype=torch.int32
        )
        order = torch.randperm(self.samples_per_epoch, generator=generator, device=self.device)
        mine = order[self.rank * self.samples_per_rank : (self.rank + 1) * self.samples_per_rank]
        # sample j < n_pos is positive j; sample j >= n_pos is a negative for positive j % n_pos
        positive_of = mine % n_pos
        users = self.users[positive_of]
        is_positive = mine < n_pos
        if self.negatives:
            items = torch.where(is_positive, self.items[positive_of], negative_items[(mine - n_pos).clamp_(min=0)])
        else:  # -n 0: no negatives to index (indexing the empty tensor would fail)
            items = self.items[mine]
        labels = is_positive.float()
        return list(
            zip(
                users.split(self.local_batch),
                items.split(self.local_batch),
                labels.split(self.local_batch),
                strict=True,
            )
        )


def rank_block(n_users, rank, world_size):
    """This rank's users: whole, contiguous blocks, so per-user metrics summed over ranks are exact."""
    per_rank = -(-n_users // world_size)
    return slice(min(n_users, rank * per_rank), min(n_users, (rank + 1) * per_rank))


class EvalCandidates:
    """Evaluation candidates of this rank's users: each user's sampled negatives, then its positive.

    The mask marks the negatives that count: duplicates within a user's list count once and a
    negative equal to the positive does not count (the reference protocol; with exact negatives
    every one counts).
    """

    def __init__(self, test, test_negatives, rank, world_size, device):
        mine = rank_block(len(test), rank, world_size)
        self.n_users_total = len(test)
        positives = test[mine, 1]
        negatives = test_negatives[mine]
        self.n_users = len(positives)
        self.users = test[mine, 0].to(device, torch.int32)
        self.items = torch.cat([negatives, positives[:, None]], dim=1).to(device, torch.int32)
        self.counted = counted_negatives(negatives, positives).to(device)
        self.pairs = self.items.numel()  # scored per evaluation


def counted_negatives(negatives, positives):
    """[users, n] bool: the first occurrence of each distinct negative that is not the positive."""
    sorted_items, order = negatives.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_items, dtype=torch.bool)
    first[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    counted = torch.empty_like(first).scatter_(1, order, first)
    return counted & (negatives != positives[:, None])


def rank_metrics(scores, counted, k):
    """Sum over users of HR@k and NDCG@k, with the positive's score in the last column.

    The positive's rank is the number of counted negatives scoring at least as high: a tie is
    not a win for the positive.
    """
    return metrics_from_histogram(rank_histogram(scores, counted, k))


def rank_histogram(scores, counted, k):
    """[k + 1] int64: how many users' positives rank 0, 1, ..., k - 1, then how many rank k or worse.

    Counts add up exactly over blocks of users and over processes, so HR and NDCG computed from
    their sum are the same to the bit however the users were split (sums of NDCG terms are not).
    """
    rank = ((scores[:, :-1] >= scores[:, -1:]) & counted).sum(dim=1).clamp_(max=k)
    return torch.zeros(k + 1, dtype=torch.int64, device=scores.device).index_add_(0, rank, torch.ones_like(rank))


def metrics_from_histogram(histogram):
    """(hits, NDCG sum) of a rank histogram of k + 1 bins, the last one the misses."""
    k = len(histogram) - 1
    gains = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=histogram.device) + 2.0)
    return histogram[:k].sum(), (histogram[:k].double() * gains).sum()


class FullRanking:
    """The `full` protocol: each user's held-out item ranked against every item not among its known positives.

    Holds this rank's users and their known items (the pairs not to rank: training items, and the
    other split's held-out item when there are two; contiguous per user), so that a block of users'
    seen-item mask is built with one scatter.
    """

    def __init__(self, known, held_out, n_items, rank, world_size, device):
        mine = rank_block(len(held_out), rank, world_size)
        self.n_users, self.n_users_total, self.n_items = mine.stop - mine.start, len(held_out), n_items
        self.pairs = self.n_users * n_items  # scored per evaluation
        self.users = held_out[mine, 0].to(device)
        self.positives = held_out[mine, 1].to(device)
        self.items = torch.arange(n_items, device=device)
        offsets = torch.searchsorted(known[:, 0].contiguous(), torch.arange(len(held_out) + 1))
        self.offsets = offsets[mine.start : mine.stop + 1] - offsets[mine.start]
        self.known = known[offsets[mine.start] : offsets[mine.stop]].to(device)
        self.first_user = mine.start

    def seen(self, start, stop):
        """[stop - start, n_items] bool: the known items of users start..stop-1 (local indices)."""
        pairs = self.known[self.offsets[start] : self.offsets[stop]]
        mask = torch.zeros(stop - start, self.n_items, dtype=torch.bool, device=self.known.device)
        mask[pairs[:, 0] - self.first_user - start, pairs[:, 1]] = True
        return mask


def make_evaluator(data, split, protocol, rank, world_size, device):
    """This rank's share of the evaluation of a split's held-out items ("test" or "valid") under a
    protocol ("reference", "exact" or "full"; README "Evaluation").

    A user's other known positives (its training items, the other split's held-out item) never count
    as negatives. Without a validation split, "test" gives the evaluators of caches before there were
    splits; with one, the test figures equal those of the same cache made without --validation.
    """
    if split not in ("test", "valid") or protocol not in ("reference", "exact", "full"):
        raise ValueError(f"unknown split {split!r} or protocol {protocol!r}")
    if split == "valid" and data.valid is None:
        raise CliError("the cache has no validation split; make it with convert.py --validation")
    held_out, other = (data.test, data.valid) if split == "test" else (data.valid, data.test)
    if protocol == "full":
        known = data.train
        if other is not None:  # kept contiguous per user, as FullRanking wants
            known = torch.cat([known, other])
            known = known[known[:, 0].argsort(stable=True)]
        return FullRanking(known, held_out, data.n_items, rank, world_size, device)
    if protocol == "exact":
        negatives = exact_test_negatives(data, data.meta["valid_negative"], split_seed(data.meta["seed"], split))
    else:  # the cache's draw: it avoids the training items and, for validation, the test item
        negatives = data.test_negatives if split == "test" else data.valid_negatives
    return EvalCandidates(held_out, negatives, rank, world_size, device)


def exact_test_negatives(data, per_user, seed):
    """per_user distinct items per user, uniformly among the items it never interacted with.

    Unlike the cached negatives, these never repeat and never include the user's held-out items (nor
    any training item); the same cache and seed (an int or numpy entropy) always give the same draw.
    """
    n_users, n_items = data.n_users, data.n_items
    positives = [data.train, data.test] + ([] if data.valid is None else [data.valid])
    keys = np.sort(torch.cat(positives).numpy() @ np.array([n_items, 1]))
    starts = user_starts(keys, n_items, n_users)
    n_free = n_items - np.diff(starts)
    if n_free.min() < per_user:
        user = int(np.argmin(n_free))
        raise CliError(
            f"the exact protocol needs {per_user} items each user never interacted with; "
            f"user {user} has only {n_free[user]}"
        )
    ranks = np.sort(distinct_draws(np.random.default_rng(seed), n_free, per_user), axis=1)
    return torch.from_numpy(nth_free_items(keys, starts, n_items, ranks))


def distinct_draws(rng, highs, k):
    """k distinct integers per row i, uniform without replacement from [0, highs[i]).

    Each round draws a few times k values per unfinished row and keeps the first k distinct ones
    in draw order (a uniform k-subset, by symmetry); rows that drew fewer retry with twice as many.
    """
    result = np.empty((len(highs), k), dtype=np.int64)
    todo, width = np.arange(len(highs)), 2 * k
    while len(todo):
        draws = rng.integers(0, highs[todo, None], size=(len(todo), width))
        order = np.argsort(draws, axis=1, kind="stable")
        ordered = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(draws, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
        keep = ~repeat & (np.cumsum(~repeat, axis=1) <= k)
        done = keep.sum(axis=1) == k
        result[todo[done]] = draws[done][keep[done]].reshape(-1, k)
        todo, width = todo[~done], 2 * width
    return result
