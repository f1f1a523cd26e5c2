"""Training batches (negatives, labels, shards, shuffle), evaluation candidates, HR/NDCG and cache loading."""

import json
import math
import shutil
from collections import Counter

import pytest
import torch

from convert import FORMAT_VERSION
from dataloading import EvalCandidates, TrainBatches, counted_negatives, load_cache, rank_metrics
from utils import CliError

CPU = torch.device("cpu")


def distinct_pairs(n_users=7, n_items=11, n=41, seed=0):
    keys = torch.randperm(n_users * n_items, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([keys // n_items, keys % n_items], dim=1)


def flat(batches):
    """(users, items, labels) of a whole epoch share."""
    if not batches:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0)
    users, items, labels = (torch.cat(column) for column in zip(*batches, strict=True))
    return users.long(), items.long(), labels


def samples(batches, n_items):
    """The epoch share as a multiset of (user, item, label)."""
    users, items, labels = flat(batches)
    return Counter(((users * n_items + items) * 2 + labels.long()).tolist())


@pytest.mark.parametrize("negatives", [0, 1, 4])
def test_each_positive_once_and_n_negatives_per_positive(negatives):
    pairs = distinct_pairs()
    n_items = 11
    batches_of = TrainBatches(pairs, n_items, negatives, 16, 0, 1, CPU)
    batches = batches_of.epoch(seed=5)
    assert len(batches) == len(batches_of) == math.ceil(41 * (1 + negatives) / 16)
    assert [len(labels) for _, _, labels in batches[:-1]] == [16] * (len(batches) - 1)
    assert 1 <= len(batches[-1][2]) <= 16
    users, items, labels = flat(batches)
    assert len(labels) == 41 * (1 + negatives) == batches_of.samples_per_epoch
    assert labels.dtype == torch.float32
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    positive = labels == 1
    # label 1 exactly for the training pairs, each one exactly once
    assert sorted((users[positive] * n_items + items[positive]).tolist()) == sorted(
        (pairs[:, 0] * n_items + pairs[:, 1]).tolist()
    )
    # `negatives` negatives per positive: a user with p positives gets negatives * p of them
    assert int((~positive).sum()) == 41 * negatives
    assert torch.equal(
        torch.bincount(users[~positive], minlength=7), negatives * torch.bincount(pairs[:, 0], minlength=7)
    )
    assert items.min() >= 0 and items.max() < n_items


def test_negative_items_are_uniform_and_unchecked(tiny_cache):
    data = load_cache(tiny_cache)
    users, items, labels = flat(TrainBatches(data.train, data.n_items, 4, 1024, 0, 1, CPU).epoch(seed=3))
    negative = labels == 0
    counts = torch.bincount(items[negative], minlength=data.n_items)
    expected = 4 * len(data.train) / data.n_items  # about 59 per item
    assert counts.min() > expected - 6 * math.sqrt(expected) and counts.max() < expected + 6 * math.sqrt(expected)
    # approximate sampling, as the reference: a negative may be one of the user's positives
    positives = set((data.train[:, 0] * data.n_items + data.train[:, 1]).tolist())
    keys = (users[negative] * data.n_items + items[negative]).tolist()
    collisions = sum(key in positives for key in keys) / len(keys)
    # each positive's negatives hit one of its user's p positives with probability p / n_items
    per_user = torch.bincount(data.train[:, 0], minlength=data.n_users).double()
    expected_rate = (per_user**2).sum().item() / (len(data.train) * data.n_items)  # about 0.32
    assert collisions == pytest.approx(expected_rate, abs=0.03)


def test_same_seed_same_epoch_other_seed_other_epoch():
    pairs = distinct_pairs()
    batches_of = TrainBatches(pairs, 11, 4, 16, 0, 1, CPU)
    first, again, other = (flat(batches_of.epoch(seed)) for seed in (7, 7, 8))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0]) or not torch.equal(first[1], other[1])
    # a fresh instance (another process) draws the same epoch from the same seed
    for a, b in zip(first, flat(TrainBatches(pairs, 11, 4, 16, 0, 1, CPU).epoch(7)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world_size):
    pairs, n_items = distinct_pairs(), 11  # 41 positives * 5 = 205 samples: a remainder for 2 and 3 ranks
    whole = samples(TrainBatches(pairs, n_items, 4, 16, 0, 1, CPU).epoch(seed=9), n_items)
    shards = [TrainBatches(pairs, n_items, 4, 16, rank, world_size, CPU) for rank in range(world_size)]
    epochs = [shard.epoch(seed=9) for shard in shards]
    assert len({len(batches) for batches in epochs}) == 1  # every rank runs the same number of steps
    assert len({len(shard) for shard in shards}) == 1
    assert all(len(labels) <= 16 // world_size for batches in epochs for _, _, labels in batches)
    sizes = [sum(len(labels) for _, _, labels in batches) for batches in epochs]
    assert sizes == [205 // world_size] * world_size
    union = Counter()
    for batches in epochs:
        union += samples(batches, n_items)
    assert union <= whole  # no sample twice: disjoint shares of one epoch
    assert 0 <= whole.total() - union.total() < world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_shuffle_every_rank_sees_both_labels(tiny_cache, world_size):
    data = load_cache(tiny_cache)
    for rank in range(world_size):
        batches = TrainBatches(data.train, data.n_items, 4, 1024, rank, world_size, CPU).epoch(seed=1)
        for _, _, labels in batches:
            assert 0 < labels.sum() < len(labels)  # every batch mixes positives and negatives
        users, _, labels = flat(batches)
        assert labels.mean().item() == pytest.approx(0.2, abs=0.04)
        assert not torch.equal(users, users.sort().values)  # shuffled, not in user order


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dataset_smaller_than_one_batch_still_trains(world_size):
    pairs = distinct_pairs(n=5)
    shards = [TrainBatches(pairs, 11, 1, 1024, rank, world_size, CPU) for rank in range(world_size)]
    for shard in shards:
        batches = shard.epoch(seed=0)
        assert len(batches) == len(shard) == 1
        assert len(batches[0][2]) == 10 // world_size


def test_batch_as_small_as_the_world_size():
    pairs = distinct_pairs(n=5)
    batches = TrainBatches(pairs, 11, 1, 2, 1, 2, CPU).epoch(seed=0)
    assert [len(labels) for _, _, labels in batches] == [1] * 5


def test_batch_smaller_than_world_size_is_an_error():
    with pytest.raises(CliError, match=r"batch size \(1\) must be at least the number of processes \(2\)"):
        TrainBatches(distinct_pairs(), 11, 4, 1, 0, 2, CPU)


# --- HR / NDCG ------------------------------------------------------------------------------------


def test_counted_negatives_masks_duplicates_and_the_positive():
    negatives = torch.tensor([[3, 1, 3, 2, 1], [5, 5, 5, 5, 5], [7, 8, 9, 7, 6], [1, 2, 3, 4, 5]])
    positives = torch.tensor([2, 4, 7, 9])
    assert counted_negatives(negatives, positives).tolist() == [
        [True, True, False, False, False],  # the second 3 and 1 are duplicates, 2 is the positive
        [True, False, False, False, False],
        [False, True, True, False, True],  # 7 is the positive, twice
        [True, True, True, True, True],
    ]


def test_rank_metrics_on_hand_made_scores():
    scores = torch.tensor(
        [  # three negatives, then the positive
            [1.0, 2.0, 3.0, 9.0],  # rank 0
            [9.0, 2.0, 3.0, 5.0],  # rank 1
            [5.0, 2.0, 6.0, 5.0],  # a tie and a better one: rank 2 (the positive does not win ties)
            [9.0, 9.0, 1.0, 5.0],  # the same negative twice, counted once: rank 1
            [7.0, 8.0, 9.0, 5.0],  # nothing counted (all equal the positive): rank 0
        ]
    )
    counted = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    one, rank1, rank2 = 1.0, 1 / math.log2(3), 1 / math.log2(4)
    for k, hits, ndcg in [
        (1, 2, 2 * one),
        (2, 4, 2 * one + 2 * rank1),
        (3, 5, 2 * one + 2 * rank1 + rank2),
        (10, 5, 2 * one + 2 * rank1 + rank2),
    ]:
        got_hits, got_ndcg = rank_metrics(scores, counted, k)
        assert got_hits.item() == hits, k
        assert got_ndcg.item() == pytest.approx(ndcg, rel=1e-12), k


def brute_force_metrics(negatives, positives, item_scores, k):
    hits = ndcg = 0.0
    for row, positive in zip(negatives.tolist(), positives.tolist(), strict=True):
        distinct = set(row) - {positive}
        rank = sum(item_scores[item] >= item_scores[positive] for item in distinct)
        if rank < k:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    return hits, ndcg


@pytest.mark.parametrize("k", [1, 3, 5])
def test_metrics_match_a_brute_force_count_with_duplicates_and_ties(k):
    generator = torch.Generator().manual_seed(k)
    n_users, n_items = 300, 9
    negatives = torch.randint(0, n_items, (n_users, 12), generator=generator)  # many duplicates
    positives = torch.randint(0, n_items, (n_users,), generator=generator)  # often among the negatives
    item_scores = torch.randint(0, 4, (n_items,), generator=generator).float()  # many ties
    candidates = torch.cat([negatives, positives[:, None]], dim=1)
    hits, ndcg = rank_metrics(item_scores[candidates], counted_negatives(negatives, positives), k)
    expected_hits, expected_ndcg = brute_force_metrics(negatives, positives, item_scores.tolist(), k)
    assert 0 < expected_hits < n_users
    assert hits.item() == expected_hits
    assert ndcg.item() == pytest.approx(expected_ndcg, rel=1e-12)


# --- evaluation candidates ------------------------------------------------------------------------


@pytest.mark.parametrize("n_users", [1, 3, 7, 60])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_eval_candidates_split_users_in_whole_disjoint_blocks(n_users, world_size):
    generator = torch.Generator().manual_seed(n_users)
    test = torch.stack([torch.arange(n_users), torch.randint(0, 50, (n_users,), generator=generator)], dim=1)
    negatives = torch.randint(0, 50, (n_users, 100), generator=generator)
    blocks = [EvalCandidates(test, negatives, rank, world_size, CPU) for rank in range(world_size)]
    users = torch.cat([block.users for block in blocks]).long()
    assert torch.equal(users, torch.arange(n_users))  # contiguous, disjoint, in order, covering all
    assert sum(block.n_users for block in blocks) == n_users
    assert max(block.n_users for block in blocks) <= -(-n_users // world_size)
    scores = torch.rand(n_users, 101, generator=generator)
    scores[:, -1] = scores[:, :-1].median(dim=1).values  # some hits, some misses
    sums = [0, 0.0]
    for block in blocks:
        mine = block.users.long()
        assert block.items.shape == (block.n_users, 101)
        assert torch.equal(block.items[:, :100].long(), negatives[mine])
        assert torch.equal(block.items[:, 100].long(), test[mine, 1])
        assert torch.equal(block.counted, counted_negatives(negatives[mine], test[mine, 1]))
        hits, ndcg = rank_metrics(scores[mine], block.counted, 10)
        sums[0] += hits.item()
        sums[1] += ndcg.item()
    whole_hits, whole_ndcg = rank_metrics(scores, counted_negatives(negatives, test[:, 1]), 10)
    assert sums[0] == whole_hits.item()
    assert sums[1] == pytest.approx(whole_ndcg.item(), rel=1e-12)


# --- the cache ------------------------------------------------------------------------------------


def test_load_cache_reads_a_converted_cache(tiny_cache):
    data = load_cache(tiny_cache)
    meta = json.loads((tiny_cache / "metadata.json").read_text())
    assert (data.n_users, data.n_items) == (meta["n_users"], meta["n_items"]) == (60, 200)
    assert data.train.shape == (meta["n_train"], 2)
    assert data.test.shape == (60, 2) and data.test_negatives.shape == (60, 100)
    assert torch.equal(data.test[:, 0], torch.arange(60))


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    return copy


def edit_metadata(cache, **changes):
    path = cache / "metadata.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_cache(tmp_path):
    with pytest.raises(CliError, match=rf"{tmp_path / 'nowhere'} is not a data cache .*convert\.py"):
        load_cache(tmp_path / "nowhere")


def test_corrupt_tensor_file(cache_copy):
    (cache_copy / "train_ratings.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CliError, match=r"train_ratings\.pt is corrupt.*convert\.py again"):
        load_cache(cache_copy)


def test_truncated_tensor_file(cache_copy):
    path = cache_copy / "test_negatives.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CliError, match=r"test_negatives\.pt is corrupt"):
        load_cache(cache_copy)


def test_corrupt_metadata(cache_copy):
    (cache_copy / "metadata.json").write_text("{not json")
    with pytest.raises(CliError, match=r"metadata\.json is corrupt"):
        load_cache(cache_copy)


def test_old_format_version(cache_copy):
    edit_metadata(cache_copy, format_version=0)
    with pytest.raises(
        CliError, match=rf"another version of convert\.py \(cache format 0, expected {FORMAT_VERSION}\)"
    ):
        load_cache(cache_copy)


def test_missing_tensor_file(cache_copy):
    (cache_copy / "test_ratings.pt").unlink()
    with pytest.raises(CliError, match=r"incomplete \(missing test_ratings\.pt\)"):
        load_cache(cache_copy)


def test_tensor_shape_does_not_match_metadata(cache_copy):
    torch.save(torch.zeros(59, 2, dtype=torch.int32), cache_copy / "test_ratings.pt")
    with pytest.raises(CliError, match=r"test_ratings\.pt does not match metadata\.json \(expected int32 \[60, 2\]\)"):
        load_cache(cache_copy)
    edit_metadata(cache_copy, n_train=5)  # metadata that disagrees with the training file
    with pytest.raises(CliError, match=r"train_ratings\.pt does not match metadata\.json"):
        load_cache(cache_copy)


def test_wrong_dtype_and_ids_out_of_range(cache_copy):
    data = load_cache(cache_copy)
    torch.save(data.test_negatives.float(), cache_copy / "test_negatives.pt")
    with pytest.raises(CliError, match="does not match metadata.json"):
        load_cache(cache_copy)
    negatives = data.test_negatives.int()
    negatives[3, 7] = 200
    torch.save(negatives, cache_copy / "test_negatives.pt")
    with pytest.raises(CliError, match="ids outside its 60 users and 200 items"):
        load_cache(cache_copy)


def test_a_validation_split_loads_beside_the_test_split(tiny_cache, tiny_validation_cache):
    plain, split = load_cache(tiny_cache), load_cache(tiny_validation_cache)
    assert plain.valid is None and plain.valid_negatives is None
    assert split.valid.dtype == split.valid_negatives.dtype == torch.int64
    assert split.valid.shape == (60, 2) and split.valid_negatives.shape == (60, 100)
    assert torch.equal(split.valid[:, 0], torch.arange(60))
    assert torch.equal(split.test, plain.test) and torch.equal(split.test_negatives, plain.test_negatives)
    n_items = split.n_items
    keys = torch.cat([split.train, split.valid]) @ torch.tensor([n_items, 1])
    assert torch.equal(keys.sort().values, plain.train @ torch.tensor([n_items, 1]))  # training + validation


@pytest.fixture
def validation_copy(tiny_validation_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_validation_cache, copy)
    return copy


def test_validation_files_are_checked_like_the_others(validation_copy):
    data = load_cache(validation_copy)
    negatives = data.valid_negatives.int()
    negatives[5, 9] = -1
    cases = [  # (file, what is written in it, the error)
        (
            "valid_ratings.pt",
            data.valid[:59].int(),
            r"valid_ratings\.pt does not match metadata\.json \(expected int32 \[60, 2\]\)",
        ),
        ("valid_negatives.pt", data.valid_negatives, r"valid_negatives\.pt does not match metadata\.json"),  # int64
        ("valid_ratings.pt", data.valid.flip(0).int(), r"valid_ratings\.pt must hold one row per user"),
        ("valid_ratings.pt", data.valid.int().index_fill(1, torch.tensor([1]), 200), "ids outside"),
        ("valid_negatives.pt", negatives, "ids outside"),
    ]
    for file, tensor, message in cases:
        original = (validation_copy / file).read_bytes()
        torch.save(tensor, validation_copy / file)
        with pytest.raises(CliError, match=message):
            load_cache(validation_copy)
        (validation_copy / file).write_bytes(original)
        load_cache(validation_copy)  # restored: loads again, so the case above failed for its own reason
    (validation_copy / "valid_negatives.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CliError, match=r"valid_negatives\.pt is corrupt"):
        load_cache(validation_copy)
    (validation_copy / "valid_ratings.pt").unlink()
    with pytest.raises(CliError, match=r"incomplete \(missing valid_ratings\.pt\)"):
        load_cache(validation_copy)
