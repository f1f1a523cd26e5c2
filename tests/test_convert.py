"""Tests of convert.py: input formats, each pipeline step, test negatives, the cache on disk, bad input
and the real MovieLens files (skipped when ../shared/data is absent)."""

import fcntl
import gc
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import convert
import dataloading
from utils import CliError, run_main

ROOT = Path(__file__).resolve().parents[1]
TENSOR_FILES = {"train": "train_ratings.pt", "test": "test_ratings.pt", "negatives": "test_negatives.pt"}
VALID_TENSOR_FILES = {"valid": "valid_ratings.pt", "valid_negatives": "valid_negatives.pt"}


# --- helpers ----------------------------------------------------------------------------------


def run_convert(*args):
    """Run the convert.py CLI in a subprocess from the repo root."""
    return subprocess.run(
        [sys.executable, "convert.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def convert_ok(*args):
    result = run_convert(*args)
    assert result.returncode == 0, result.stderr
    return result


def load_cache(path):
    """metadata, tensors (numpy) and raw-id lists of a cache directory."""
    path = Path(path)
    meta = json.loads((path / "metadata.json").read_text())
    files = TENSOR_FILES | (VALID_TENSOR_FILES if meta.get("validation") else {})
    cache = {name: torch.load(path / file).numpy() for name, file in files.items()}
    cache["meta"] = meta
    for name in ("user_ids", "item_ids"):
        frame = pd.read_csv(path / f"{name}.csv", dtype=str, keep_default_na=False)
        assert list(frame.columns) == ["raw_id"]
        cache[name] = frame["raw_id"].tolist()
    return cache


def build(users, items, times, min_ratings=1, valid_negative=1, seed=1, validation=False):
    """convert.build on in-memory columns, each in one chunk."""
    columns = ([np.asarray(column)] for column in (users, items, times))
    return convert.build(*columns, min_ratings, valid_negative, seed, validation)


def read_columns(path, fmt):
    """read_ratings' columns, each joined into one array."""
    return [np.concatenate(chunks) for chunks in convert.read_ratings(path, fmt)]


def raw_test_items(cache):
    """{raw user: raw test item} of a build() result."""
    return {cache["user_ids"][u]: cache["item_ids"][i] for u, i in cache["test"]}


def raw_valid_items(cache):
    """{raw user: raw validation item} of a build() result."""
    return {cache["user_ids"][u]: cache["item_ids"][i] for u, i in cache["valid"]}


def raw_train_pairs(cache):
    return sorted((cache["user_ids"][u], cache["item_ids"][i]) for u, i in cache["train"])


def cache_digest(path):
    """The SHA-256 of a cache's contents, file by file in CACHE_FILES order: each tensor's type, shape and values
    (how a file lays them out is torch.save's business), the other files' bytes."""
    digest = hashlib.sha256()
    for name in convert.CACHE_FILES:
        if name.endswith(".pt"):
            tensor = torch.load(Path(path) / name, weights_only=True)
            digest.update(f"{tensor.dtype} {tuple(tensor.shape)}".encode() + tensor.numpy().tobytes())
        else:
            digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def leftovers(directory, name):
    """Temporary or old-cache directories convert.py may leave beside DIRECTORY/NAME."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(f".{name}."))


def assert_one_line_error(result, prog="convert.py"):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), result.stderr


# The same six ratings in every layout. File order matters: dense ids follow first appearance.
ROWS = [  # user, item, rating, timestamp
    (10, 100, 5, 1000),
    (10, 200, 3, 1001),
    (20, 200, 4, 999),
    (10, 300, 4, 1002),  # user 10's latest
    (20, 100, 2, 1005),  # user 20's latest, although not its last line
    (20, 300, 1, 1003),
]
# users 10 -> 0, 20 -> 1; items 100 -> 0, 200 -> 1, 300 -> 2
EXPECTED_TRAIN = [[0, 0], [0, 1], [1, 1], [1, 2]]
EXPECTED_TEST = [[0, 2], [1, 0]]


def ratings_text(fmt, rows=ROWS):
    if fmt == "ml-20m":
        return "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows)
    if fmt == "ml-1m":
        return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)
    if fmt == "ml-100k":
        return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    raise ValueError(fmt)


CUSTOM_VARIANTS = {
    "header": "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, _, t in ROWS),
    "no header": "".join(f"{u},{i},{t}\n" for u, i, _, t in ROWS),
    "no header, extra columns": "".join(f"{u},{i},{t},{r},note {u}\n" for u, i, r, t in ROWS),
    "header, extra columns, other order": "timestamp,rating,Item_ID,USER_ID,comment\r\n"
    + "".join(f'{t},{r},{i},{u},"a, b"\r\n' for u, i, r, t in ROWS),
    "header, byte-order mark, float times": "\ufeffuser_id,item_id,timestamp\n"
    + "".join(f"{u},{i},{t}.25\n" for u, i, _, t in ROWS),
}


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, name", [("ml-20m", "ratings.csv"), ("ml-1m", "ratings.dat"), ("ml-100k", "u.data")], ids=str
)
def test_movielens_formats_parse_to_the_same_ratings(tmp_path, fmt, name):
    path = tmp_path / name
    path.write_text(ratings_text(fmt))
    assert convert.guess_format(path) == fmt
    users, items, times = read_columns(path, fmt)
    assert users.tolist() == [r[0] for r in ROWS]
    assert items.tolist() == [r[1] for r in ROWS]
    assert times.tolist() == [r[3] for r in ROWS]
    cache = build(users, items, times)
    assert cache["train"].tolist() == EXPECTED_TRAIN
    assert cache["test"].tolist() == EXPECTED_TEST
    assert cache["user_ids"].tolist() == [10, 20]
    assert cache["item_ids"].tolist() == [100, 200, 300]


@pytest.mark.parametrize("variant", CUSTOM_VARIANTS)
def test_custom_csv_variants(tmp_path, variant):
    path = tmp_path / "interactions.csv"
    path.write_bytes(CUSTOM_VARIANTS[variant].encode())
    assert convert.guess_format(path) == "custom"
    users, items, times = read_columns(path, "custom")
    # without a header the first line is data (the reference drops it: a known bug)
    assert len(users) == len(ROWS)
    assert users.tolist() == [r[0] for r in ROWS]
    assert items.tolist() == [r[1] for r in ROWS]
    assert times.tolist() == pytest.approx([r[3] + (0.25 if "float" in variant else 0) for r in ROWS])
    cache = build(users, items, times)
    assert cache["train"].tolist() == EXPECTED_TRAIN
    assert cache["test"].tolist() == EXPECTED_TEST


def rated_file_text(fmt, rows):
    if fmt == "custom":  # string ids; the rating column named in another case, before the others
        return "Rating,timestamp,user_id,item_id\n" + "".join(f"{r},{t},u{u},i{i}\n" for u, i, r, t in rows)
    return ratings_text(fmt, rows)


@pytest.mark.parametrize(
    "fmt, name",
    [("ml-20m", "ratings.csv"), ("ml-1m", "ratings.dat"), ("ml-100k", "u.data"), ("custom", "events.csv")],
    ids=str,
)
def test_rating_threshold_converts_as_a_file_of_the_rows_rated_at_least_it(tmp_path, fmt, name):
    flags = ["--format", fmt, "--min_ratings", "1", "--valid_negative", "1"]
    rated_3_or_more = [row for row in ROWS if row[2] >= 3]
    for directory, rows in (("all", ROWS), ("kept", rated_3_or_more)):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / name).write_text(rated_file_text(fmt, rows))
    result = convert_ok(
        "--path", tmp_path / "all" / name, "--output", tmp_path / "thresholded", "--rating_threshold", 3, *flags
    )
    assert result.stdout.startswith("--rating_threshold 3: 4 of the 6 ratings kept\n")
    convert_ok("--path", tmp_path / "kept" / name, "--output", tmp_path / "expected", *flags)
    thresholded, expected = load_cache(tmp_path / "thresholded"), load_cache(tmp_path / "expected")
    for key in ("train", "test", "negatives"):
        assert np.array_equal(thresholded[key], expected[key]), key
    assert thresholded["user_ids"] == expected["user_ids"] and thresholded["item_ids"] == expected["item_ids"]
    assert thresholded["meta"]["rating_threshold"] == 3 and thresholded["meta"]["n_ratings_read"] == len(ROWS)
    assert "rating_threshold" not in expected["meta"]  # caches made without the flag stay as they were


def test_rating_threshold_applies_before_min_ratings(tmp_path):
    # user 20 has 3 ratings but only one of 3 or more: --min_ratings 2 then drops it
    path = tmp_path / "ratings.csv"
    path.write_text(ratings_text("ml-20m"))
    convert_ok(
        "--path",
        path,
        "--output",
        tmp_path / "cache",
        "--rating_threshold",
        3,
        "--min_ratings",
        2,
        "--valid_negative",
        1,
    )
    cache = load_cache(tmp_path / "cache")
    assert cache["user_ids"] == ["10"]
    assert raw_test_items(cache) == {"10": "300"} and raw_train_pairs(cache) == [("10", "100"), ("10", "200")]


def test_custom_string_ids_round_trip_through_the_cache(tmp_path):
    rows = [  # user, item, timestamp; ids look like numbers, words, numbers with zeros, with commas
        ("alice", "0042", 5),
        ("bob", "the matrix", 1),
        ("alice", "x,y", 7),
        ("007", "0042", 2),
        ("bob", "0042", 3),
        ("007", "the matrix", 9),
        ("alice", "the matrix", 6),
    ]
    lines = ["user_id,item_id,timestamp"] + [f'{u},"{i}",{t}' for u, i, t in rows]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    convert_ok("--path", path, "--format", "custom", "--output", out, "--min_ratings", "2", "--valid_negative", "1")
    cache = load_cache(out)
    assert cache["meta"]["user_id_type"] == "str"
    assert cache["meta"]["item_id_type"] == "str"
    assert cache["meta"]["format"] == "custom"
    # line k of the id files is the raw id of dense id k, in order of first appearance
    assert cache["user_ids"] == ["alice", "bob", "007"]
    assert cache["item_ids"] == ["0042", "the matrix", "x,y"]
    assert raw_test_items(cache) == {"alice": "x,y", "bob": "0042", "007": "the matrix"}
    assert raw_train_pairs(cache) == sorted(
        [("alice", "0042"), ("alice", "the matrix"), ("bob", "the matrix"), ("007", "0042")]
    )


def test_ids_and_timestamps_beyond_32_bits(tmp_path):
    # read as 32-bit columns first; these numbers make the reader start again with 64 bits
    big_user, big_item, ms = 3_000_000_000, 2**40, 1_700_000_000_000
    rows = [(big_user, big_item, 4, ms + 1), (big_user, 7, 4, ms), (5, big_item, 3, ms + 5), (5, 7, 3, ms + 2)]
    path = tmp_path / "ratings.csv"
    path.write_text(ratings_text("ml-20m", rows))
    convert_ok("--path", path, "--output", tmp_path / "cache", "--min_ratings", "1", "--valid_negative", "1")
    cache = load_cache(tmp_path / "cache")
    assert cache["user_ids"] == [str(big_user), "5"]
    assert cache["item_ids"] == [str(big_item), "7"]
    assert cache["test"].tolist() == [[0, 0], [1, 0]]  # each user's latest: big_item for both
    assert cache["train"].tolist() == [[0, 1], [1, 1]]


def test_integer_id_maps_round_trip(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ratings.dat"
    path.write_text(ratings_text("ml-1m"))
    out = tmp_path / "cache"
    args = ["--path", path, "--output", out, "--min_ratings", "3", "--valid_negative", "1"]
    monkeypatch.setattr(sys, "argv", ["convert.py", *map(str, args)])
    run_main(convert.main)  # in process: the CLI's code path
    assert capsys.readouterr().out == f"{out}: 2 users, 3 items, 4 training and 2 test ratings\n"
    cache = load_cache(out)
    meta = cache["meta"]
    assert meta["format"] == "ml-1m"  # guessed from the name
    assert (meta["user_id_type"], meta["item_id_type"]) == ("int", "int")
    assert (meta["n_users"], meta["n_items"], meta["n_train"], meta["n_test"]) == (2, 3, 4, 2)
    assert (meta["min_ratings"], meta["valid_negative"], meta["seed"]) == (3, 1, 1)
    assert meta["format_version"] == convert.FORMAT_VERSION
    assert meta["n_ratings_read"] == len(ROWS)
    assert len(meta["source_sha256"]) == 64
    assert cache["user_ids"] == ["10", "20"]
    assert cache["item_ids"] == ["100", "200", "300"]
    assert cache["train"].tolist() == EXPECTED_TRAIN
    assert cache["test"].tolist() == EXPECTED_TEST
    # three items, two in each user's training set: the one free item is its test item
    assert cache["negatives"].tolist() == [[2], [0]]
    assert all(cache[name].dtype == np.int32 for name in TENSOR_FILES)


# --- the pipeline, step by step ---------------------------------------------------------------


def test_min_ratings_filter_counts_raw_rows_and_ids_skip_dropped_users():
    # user 7 has 2 rows; user 5 has 3 rows of which two repeat the same item; user 9 has 4
    users = [7, 5, 7, 5, 9, 5, 9, 9, 9]
    items = [900, 1, 2, 1, 3, 2, 2, 1, 4]
    times = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    cache = build(users, items, times, min_ratings=3)
    # user 7 is dropped before anything else: its item 900 gets no id; the filter counts rows
    # before dedupe (as the reference does), so user 5 stays with 2 distinct items
    assert cache["user_ids"].tolist() == [5, 9]
    assert cache["item_ids"].tolist() == [1, 3, 2, 4]
    assert raw_test_items(cache) == {5: 2, 9: 4}
    assert raw_train_pairs(cache) == [(5, 1), (9, 1), (9, 2), (9, 3)]
    everyone = build(users, items, times, min_ratings=2)
    assert everyone["user_ids"].tolist() == [7, 5, 9]
    assert everyone["item_ids"].tolist() == [900, 1, 2, 3, 4]
    with pytest.raises(CliError, match="no user has 5 or more ratings"):
        build(users, items, times, min_ratings=5)


def test_dense_ids_follow_first_appearance_not_value():
    users = [30, 10, 30, 20, 10, 20]
    items = [5, 50, 7, 5, 7, 3]
    cache = build(users, items, [1, 1, 2, 2, 3, 3])
    assert cache["user_ids"].tolist() == [30, 10, 20]
    assert cache["item_ids"].tolist() == [5, 50, 7, 3]
    # 30 -> 0, 10 -> 1, 20 -> 2; 5 -> 0, 50 -> 1, 7 -> 2, 3 -> 3
    assert cache["test"].tolist() == [[0, 2], [1, 2], [2, 3]]
    assert cache["train"].tolist() == [[0, 0], [1, 1], [2, 0]]


@pytest.mark.parametrize("float_times", [False, True], ids=["int", "float"])
def test_equal_timestamps_later_line_is_later(float_times):
    dtype = np.float64 if float_times else np.int64
    # user 1: items 10 and 20 tie at its latest time -> 20 (the later line) is the test item
    # user 2: the same tie in the other line order -> 10
    users = [1, 1, 2, 2, 1, 2]
    items = [10, 20, 20, 10, 30, 30]
    times = np.array([5, 5, 5, 5, 1, 1], dtype=dtype)
    cache = build(users, items, times)
    assert raw_test_items(cache) == {1: 20, 2: 10}
    # deterministic: the same input always gives the same split
    for _ in range(3):
        again = build(users, items, times)
        assert again["test"].tolist() == cache["test"].tolist()
        assert again["train"].tolist() == cache["train"].tolist()


def naive_split(users, items, times):
    """The split spelled out: dedupe keeping each pair's earliest row (ties: the earlier line), then
    each user's latest remaining row (ties: the later line) is its test pair, the latest after that its
    validation pair (users with two or more pairs)."""
    earliest = {}
    for row, pair in enumerate(zip(users, items, strict=True)):
        if pair not in earliest or times[row] < times[earliest[pair]]:
            earliest[pair] = row
    by_time = {}  # user: its rows, latest first
    for pair, row in earliest.items():
        by_time.setdefault(pair[0], []).append(row)
    for rows in by_time.values():
        rows.sort(key=lambda row: (times[row], row), reverse=True)
    test = {user: items[rows[0]] for user, rows in by_time.items()}
    valid = {user: items[rows[1]] for user, rows in by_time.items() if len(rows) > 1}
    train = sorted(pair for pair, row in earliest.items() if by_time[pair[0]][0] != row)
    return train, test, valid


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped by user", "shuffled"])
@pytest.mark.parametrize("times_kind", ["int", "wide int", "float"])
def test_split_matches_a_naive_reference(grouped, times_kind):
    # many repeated pairs and tied timestamps; more rows than a sort block, so several blocks
    rng = np.random.default_rng(7)
    n_rows, n_users, n_items = 3 * convert.SORT_BLOCK_ROWS, 300, 40
    users = np.sort(rng.integers(0, n_users, n_rows)) if grouped else rng.integers(0, n_users, n_rows)
    users = users.astype(np.int32)
    items = rng.integers(0, n_items, n_rows).astype(np.int32)
    times = rng.integers(0, 8, n_rows)
    times = {"int": times.astype(np.int32), "wide int": times * 2**40, "float": times / 3}[times_kind]
    present = np.unique(users)  # dense ids, as split_leave_one_out expects
    users = np.searchsorted(present, users)
    item_bits = convert.bits(n_items - 1)
    keys = (users << item_bits) | items
    time_chunks = np.split(times, [5, 1000, 1001, 7000])  # uneven chunks, one of a single row
    expected_train, expected_test, expected_valid = naive_split(users.tolist(), items.tolist(), times.tolist())

    def keys_in_file_order(out):
        out[:] = keys
        return out

    for validation in (False, True):
        train_keys, test_keys, valid_keys = convert.split_leave_one_out(
            keys.copy(), time_chunks, len(present), item_bits, keys_in_file_order, validation
        )
        train = [(int(k) >> item_bits, int(k) & ((1 << item_bits) - 1)) for k in train_keys]
        assert train == expected_train  # the validation pairs still among them
        assert test_keys.tolist() == [(user << item_bits) | item for user, item in sorted(expected_test.items())]
        if validation:
            assert len(expected_valid) == len(present)
            assert {user: valid_keys[user] & ((1 << item_bits) - 1) for user in expected_valid} == expected_valid
            assert all(valid_keys[user] >> item_bits == user for user in expected_valid)
        else:
            assert valid_keys is None


@pytest.mark.parametrize("sort", ["packed", "argsort"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped by user", "shuffled"])
def test_repeat_heavy_file_matches_the_naive_reference(tmp_path, grouped, sort, monkeypatch):
    # an interaction log: most rows repeat a pair, often at a tied or earlier time than its first line
    monkeypatch.setattr(convert, "CHUNK_ROWS", 1000)  # pairs straddle the chunks of earliest_of_each_pair
    if sort == "argsort":  # the path of files whose keys and row numbers do not fit in 64 bits
        monkeypatch.setattr(convert, "PACKED_BITS", 0)
    rng = np.random.default_rng(21)
    n_rows = 20_000
    users = rng.integers(0, 300, n_rows) * 3 + 1
    users = np.sort(users) if grouped else users
    items = rng.integers(0, 25, n_rows) * 7 + 5
    times = rng.integers(0, 6, n_rows)  # many ties
    assert len(set(zip(users.tolist(), items.tolist(), strict=True))) < 0.45 * n_rows  # > 55 % repeated rows
    path = tmp_path / "ratings.csv"
    pd.DataFrame({"userId": users, "movieId": items, "rating": 1.0, "timestamp": times}).to_csv(path, index=False)
    cache = convert.build(*convert.read_ratings(path, "ml-20m"), 1, 5, 1)
    expected_train, expected_test, expected_valid = naive_split(users.tolist(), items.tolist(), times.tolist())
    assert raw_train_pairs(cache) == expected_train
    assert raw_test_items(cache) == expected_test
    split = convert.build(*convert.read_ratings(path, "ml-20m"), 1, 5, 1, validation=True)  # the dup path's split
    assert raw_test_items(split) == expected_test and raw_valid_items(split) == expected_valid
    assert raw_train_pairs(split) == sorted(set(expected_train) - set(expected_valid.items()))


@pytest.mark.parametrize("ids", ["small ints", "strings"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped by user", "shuffled"])
def test_build_does_not_depend_on_how_the_columns_are_chunked(grouped, ids, monkeypatch):
    monkeypatch.setattr(convert, "CHUNK_ROWS", 100)  # grouped_by_user's chunks too
    rng = np.random.default_rng(12)
    n_rows = 5000
    users = rng.integers(0, 400, n_rows) * 7  # sparse raw ids; some users below min_ratings
    users = np.sort(users) if grouped else users
    items = rng.integers(0, 60, n_rows) + 1000  # many repeated pairs
    if ids == "strings":  # indexed through pandas.factorize codes instead of by value
        users, items = (
            np.array([f"u{u}" for u in users], dtype=object),
            np.array([f"i{i}" for i in items], dtype=object),
        )
    times = rng.integers(0, 50, n_rows)
    whole = build(users, items, times, min_ratings=12, valid_negative=5)
    assert 0 < len(whole["user_ids"]) < len(np.unique(users))  # the filter dropped some users
    bounds = np.sort(rng.choice(np.arange(1, n_rows), 60, replace=False))
    chunked = convert.build(*(np.split(column, bounds) for column in (users, items, times)), 12, 5, 1)
    for name in ("train", "test", "negatives", "user_ids", "item_ids"):
        assert np.array_equal(chunked[name], whole[name]), name


def test_delete_in_place_and_pairs_in_place(monkeypatch):
    monkeypatch.setattr(convert, "CHUNK_ROWS", 7)  # many chunks, entries moving across chunk borders
    rng = np.random.default_rng(4)
    keys = np.sort(rng.choice(1 << 20, 100, replace=False)).astype(np.int64)
    for positions in ([], [0], [99], [0, 1, 2, 50, 98, 99], np.sort(rng.choice(100, 40, replace=False))):
        positions = np.array(positions, dtype=np.int64)
        kept = convert.delete_in_place(keys.copy(), positions)
        assert np.array_equal(kept, np.delete(keys, positions))
        pairs = convert.pairs_in_place(kept, 10)
        assert pairs.dtype == np.int32 and pairs.shape == (len(kept), 2)
        assert np.array_equal(pairs, np.stack(np.divmod(np.delete(keys, positions), 1 << 10), axis=1))


def test_sort_pair_keys_in_every_code_path():
    rng = np.random.default_rng(3)
    grouped = np.repeat(np.arange(5000), rng.integers(1, 6, 5000))
    cases = [  # (users in file order, item bits)
        (grouped, 10),  # grouped, each block's keys fit 31 bits: int32 block sorts
        (grouped, 28),  # grouped, too wide for that: int64 block sorts
        (rng.integers(0, 5000, 15_000), 10),  # not grouped: one sort
    ]
    for users, item_bits in cases:
        keys = (users.astype(np.int64) << item_bits) | rng.integers(0, 1 << item_bits, len(users))
        expected = np.sort(keys)
        convert.sort_pair_keys(keys, item_bits)
        assert np.array_equal(keys, expected)
    assert convert.grouped_by_user(np.array([0, 5, 3, 1 << 10]), 10)
    assert not convert.grouped_by_user(np.array([0, 1 << 10, 3]), 10)


def test_save_tensor_writes_what_torch_save_writes(tmp_path):
    """Byte for byte torch.save's file (its records aligned), of the array as a contiguous int32 tensor."""
    (tmp_path / "ours").mkdir()
    (tmp_path / "torch").mkdir()
    wide = np.arange(24, dtype=np.int64).reshape(6, 4)
    arrays = {
        "pairs": np.arange(12, dtype=np.int32).reshape(6, 2),
        "empty": np.zeros((0, 2), np.int32),
        "extremes": np.array([-5, 2**31 - 1], np.int32),
        "int64 (the paper's negatives)": wide,
        "a column slice": wide[:, 1:3],  # only the slice's values are written, not its base array
    }
    for name, array in arrays.items():
        convert.save_tensor(array, tmp_path / "ours" / "tensor.pt")
        torch.save(torch.from_numpy(np.ascontiguousarray(array, np.int32)), tmp_path / "torch" / "tensor.pt")
        ours = (tmp_path / "ours" / "tensor.pt").read_bytes()
        assert ours == (tmp_path / "torch" / "tensor.pt").read_bytes(), name
        tensor = torch.load(tmp_path / "ours" / "tensor.pt", mmap=True, weights_only=True)
        assert tensor.dtype == torch.int32 and tensor.tolist() == array.tolist(), name


def test_dedupe_keeps_the_earliest():
    # item 10 at t=1 and again at t=3; item 20 at t=2. Keeping the earliest 10 makes 20 the latest.
    cache = build([1, 1, 1], [10, 20, 10], [1, 2, 3])
    assert raw_test_items(cache) == {1: 20}
    assert raw_train_pairs(cache) == [(1, 10)]
    # among equal timestamps the earlier line is the earliest: 10 (line 1) stays before 20 (line 2)
    tied = build([1, 1, 1, 1], [30, 10, 20, 10], [0, 9, 9, 9])
    assert raw_test_items(tied) == {1: 20}
    assert raw_train_pairs(tied) == [(1, 10), (1, 30)]


def test_leave_one_out_holds_out_the_latest_wherever_it_is_in_the_file():
    cache = build([4, 4, 4, 4], [1, 2, 3, 4], [50, 10, 20, 30])
    assert raw_test_items(cache) == {4: 1}
    assert raw_train_pairs(cache) == [(4, 2), (4, 3), (4, 4)]


def test_a_user_left_without_training_items():
    # user 2 rates one item twice: after dedupe its only pair is the test pair
    cache = build([1, 1, 1, 2, 2], [1, 2, 3, 1, 1], [1, 2, 3, 4, 5], min_ratings=2, valid_negative=2)
    assert raw_test_items(cache) == {1: 3, 2: 1}
    assert raw_train_pairs(cache) == [(1, 1), (1, 2)]
    assert cache["negatives"].shape == (2, 2)
    assert set(cache["negatives"][0].tolist()) == {2}  # item 3 is user 1's only free item


# --- test negatives ---------------------------------------------------------------------------


def random_train_pairs(rng, n_users, n_items, max_per_user):
    """Sorted user * n_items + item keys with a random training set per user."""
    keys = [
        u * n_items + np.sort(rng.choice(n_items, rng.integers(0, max_per_user + 1), replace=False))
        for u in range(n_users)
    ]
    return np.concatenate(keys).astype(np.int64)


def naive_negatives(train_sets, n_items, per_user, seed):
    """The contract spelled out: draw = the r-th item (in id order) that is not a training positive, the
    ranks r of each block of DRAW_BLOCK_USERS users drawn from its own stream spawned from the seed."""
    allowed = [np.array(sorted(set(range(n_items)) - set(s))) for s in train_sets]
    highs = np.array([len(a) for a in allowed])[:, None]
    block = convert.DRAW_BLOCK_USERS
    streams = np.random.SeedSequence(seed).spawn(math.ceil(len(allowed) / block))
    draws = []
    for i, stream in enumerate(streams):
        block_highs = highs[i * block : (i + 1) * block]
        draws.append(np.random.default_rng(stream).integers(0, block_highs, (len(block_highs), per_user), np.int32))
    draws = np.sort(np.concatenate(draws), axis=1)  # convert.py returns each user's draws in increasing order
    return np.stack([a[d] for a, d in zip(allowed, draws, strict=True)])


def test_sample_test_negatives_matches_a_naive_reference_on_every_small_training_set():
    n_items, per_user = 5, 200
    # every subset of the 5 items but the full one is some user's training set
    subsets = [s for k in range(n_items) for s in itertools.combinations(range(n_items), k)]
    keys = np.array([u * n_items + i for u, s in enumerate(subsets) for i in s], dtype=np.int64)
    negatives = convert.sample_test_negatives(keys, n_items, len(subsets), n_items, per_user, seed=11)
    assert negatives.shape == (len(subsets), per_user)
    assert np.array_equal(negatives, naive_negatives(subsets, n_items, per_user, seed=11))
    for user, subset in enumerate(subsets):  # 200 draws reach every free item
        assert set(negatives[user].tolist()) == set(range(n_items)) - set(subset)


@pytest.mark.parametrize("cores", [1, 3])
def test_sample_test_negatives_matches_the_naive_reference_on_random_sets(cores, monkeypatch):
    # several random streams (blocks of 7 users), drawn on 1 or 3 threads: always the same draw
    monkeypatch.setattr(convert, "DRAW_BLOCK_USERS", 7)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    rng = np.random.default_rng(5)
    n_users, n_items = 60, 40
    keys = random_train_pairs(rng, n_users, n_items, n_items - 1)
    sets = [keys[keys // n_items == u] % n_items for u in range(n_users)]
    negatives = convert.sample_test_negatives(keys, n_items, n_users, n_items, 30, seed=2)
    assert np.array_equal(negatives, naive_negatives(sets, n_items, 30, seed=2))


def test_negatives_never_hit_training_positives_and_have_the_right_shape():
    rng = np.random.default_rng(1)
    n_users, n_items, per_user = 300, 80, 100
    keys = random_train_pairs(rng, n_users, n_items, n_items - 1)
    negatives = convert.sample_test_negatives(keys, n_items, n_users, n_items, per_user, seed=1)
    assert negatives.shape == (n_users, per_user)
    assert negatives.dtype == np.int32
    assert negatives.min() >= 0 and negatives.max() < n_items
    negative_keys = np.arange(n_users)[:, None] * n_items + negatives
    assert not np.isin(negative_keys, keys).any()


def chi_square_bound(df, sigmas=6):
    return df + sigmas * math.sqrt(2 * df)


def test_negatives_are_uniform_over_the_allowed_items():
    rng = np.random.default_rng(2)
    # many users with different training sets, pooled: item i is expected
    # sum over users of per_user * [i allowed for u] / (number of items allowed for u)
    n_users, n_items, per_user = 400, 50, 100
    keys = random_train_pairs(rng, n_users, n_items, 40)
    negatives = convert.sample_test_negatives(keys, n_items, n_users, n_items, per_user, seed=7)
    allowed = np.ones((n_users, n_items), dtype=bool)
    allowed[keys // n_items, keys % n_items] = False
    expected = (per_user * allowed / allowed.sum(axis=1, keepdims=True)).sum(axis=0)
    observed = np.bincount(negatives.ravel(), minlength=n_items)
    assert ((observed - expected) ** 2 / expected).sum() < chi_square_bound(n_items - 1)
    # one user, many draws: uniform over exactly its 20 free items
    train = np.sort(rng.choice(n_items, 30, replace=False))
    one = convert.sample_test_negatives(train, n_items, 1, n_items, 40_000, seed=3)[0]
    counts = np.bincount(one, minlength=n_items)
    assert not counts[train].any()
    free = np.setdiff1d(np.arange(n_items), train)
    mean = len(one) / len(free)
    assert ((counts[free] - mean) ** 2 / mean).sum() < chi_square_bound(len(free) - 1)


def test_a_user_with_all_items_but_one_gets_only_that_one():
    n_items = 6
    # user 1 rates every item, the latest being item 5: its training set is items 0..4
    users = [1] * n_items + [2, 2]
    items = list(range(n_items)) + [0, 1]
    cache = build(users, items, list(range(n_items + 2)), valid_negative=n_items - 1, seed=4)
    assert cache["negatives"].shape == (2, n_items - 1)
    assert cache["negatives"][0].tolist() == [5] * (n_items - 1)
    assert 0 not in cache["negatives"][1].tolist()  # user 2's training item


def test_seed_decides_the_negatives():
    rng = np.random.default_rng(3)
    keys = random_train_pairs(rng, 50, 100, 60)
    first = convert.sample_test_negatives(keys, 100, 50, 100, 100, seed=1)
    assert np.array_equal(first, convert.sample_test_negatives(keys, 100, 50, 100, 100, seed=1))
    other = convert.sample_test_negatives(keys, 100, 50, 100, 100, seed=2)
    assert (first != other).any(axis=1).all()  # every user's draws change


# --- the validation split (--validation) ------------------------------------------------------


def columns_with_repeats_and_ties(rng, n_users, n_items, grouped):
    """Raw columns where each user has 3 to 12 distinct items, some rated again, at few distinct times."""
    rows = []
    for user in range(n_users):
        items = rng.choice(n_items, rng.integers(3, 13), replace=False)
        items = np.r_[items, rng.choice(items, rng.integers(0, 5))]  # repeated pairs
        times = rng.integers(0, 4, len(items))
        rows += [(user * 5 + 2, item + 100, time) for item, time in zip(items, times, strict=True)]
    rows = np.array(rows)
    if not grouped:
        rows = rows[rng.permutation(len(rows))]
    return rows.T


def check_validation_split(plain, split, expected_valid):
    """A build with --validation against the same build without: the test split, the test negatives and the
    ids are the same, the validation item (the expected one) leaves training, its negatives avoid the
    user's training and test items."""
    for name in ("test", "negatives", "user_ids", "item_ids"):
        assert np.array_equal(split[name], plain[name]), name
    n_users = len(split["user_ids"])
    assert split["valid"][:, 0].tolist() == list(range(n_users))
    assert raw_valid_items(split) == expected_valid
    n_items = len(split["item_ids"])
    with_valid = np.sort(np.r_[split["train"] @ [n_items, 1], split["valid"] @ [n_items, 1]])
    assert np.array_equal(with_valid, plain["train"] @ [n_items, 1])  # training + validation: the old training
    assert not (split["valid"][:, 1] == split["test"][:, 1]).any()
    negatives = split["valid_negatives"]
    assert negatives.shape == plain["negatives"].shape and negatives.dtype == np.int32
    users = np.arange(n_users)[:, None]
    assert not np.isin(users * n_items + negatives, split["train"] @ [n_items, 1]).any()
    assert not (negatives == split["test"][:, 1:]).any()


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped by user", "shuffled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_split_matches_a_naive_reference(grouped, seed):
    users, items, times = columns_with_repeats_and_ties(np.random.default_rng(seed), 80, 30, grouped)
    plain = build(users, items, times, valid_negative=20)
    split = build(users, items, times, valid_negative=20, validation=True)
    expected_train, expected_test, expected_valid = naive_split(users.tolist(), items.tolist(), times.tolist())
    assert raw_test_items(split) == expected_test
    assert raw_train_pairs(split) == sorted(set(expected_train) - set(expected_valid.items()))
    check_validation_split(plain, split, expected_valid)


def test_validation_negatives_are_the_test_draw_on_training_and_test_items_from_another_stream(monkeypatch):
    monkeypatch.setattr(convert, "DRAW_BLOCK_USERS", 7)  # several streams
    users, items, times = columns_with_repeats_and_ties(np.random.default_rng(3), 40, 15, grouped=True)
    split = build(users, items, times, valid_negative=14, seed=5, validation=True)
    n_items = len(split["item_ids"])
    avoided = [set(split["train"][split["train"][:, 0] == user, 1]) | {test} for user, test in split["test"]]
    negatives = split["valid_negatives"]
    assert np.array_equal(negatives, naive_negatives(avoided, n_items, 14, seed=[5, 1]))
    assert not np.array_equal(negatives, naive_negatives(avoided, n_items, 14, seed=5))  # not the test stream
    assert (negatives == split["valid"][:, 1:]).any()  # the validation item may be drawn (evaluation masks it)
    # the same draw on any number of cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert np.array_equal(
        build(users, items, times, valid_negative=14, seed=5, validation=True)["valid_negatives"], negatives
    )


def test_validation_needs_three_distinct_interactions_per_user():
    # user 2 rates 3 times but 2 distinct items; user 3 once
    users, items, times = [1, 1, 1, 2, 2, 2, 3], [1, 2, 3, 1, 1, 2, 1], [1, 2, 3, 1, 2, 3, 1]
    message = (
        r"^--validation needs 3 distinct interactions per user \(training, validation, test\): 2 of the 3 users have "
        r"fewer; drop them with --min_ratings 3 or more$"
    )
    with pytest.raises(CliError, match=message):
        build(users, items, times, validation=True)
    assert len(build(users, items, times)["train"]) == 3  # fine without --validation
    with pytest.raises(CliError, match="2 of the 2 users have fewer"):  # nobody has a second interaction at all
        build([1, 2], [1, 2], [1, 1], validation=True)
    assert raw_valid_items(build(users[:3], items[:3], times[:3], validation=True)) == {1: 2}


# Digests (cache_digest) of caches written by convert.py before --validation existed (commit a86730c; taken
# again of commit a7e1964's caches when the tensor files became torch.save's): without the flag, convert.py
# must keep writing these very contents.
PINNED_DIGESTS = {
    "no repeats": "8a26bbd936fe4ffbf99b97e6cd5ad7d711654d59f4e9c62e0f7d05ece4dbb826",
    "repeats": "75dac8bd353edc93ec51c61e932a15b3f1d6b4a2f7577208a69f34c3bcc77e1b",
    "ml-100k/u.data": "fcbaa14d04ed9667505299dc4c3b9a0343c0d59084e0565738c089d696556f00",
    "ml-1m/ratings.dat": "1577aa04554f62dbbbc51bebbbc198aae043ff4b1c2bd0deb55749e541bbd5fe",
}


def write_pinned_csv(path, repeats):
    """A fixed ml-20m file made without a random generator (whose streams could change with numpy): 40 users
    of 30 ratings, tied timestamps, grouped by user or (with repeated pairs) interleaved."""
    rows = [(user, j) for user in range(1, 41) for j in range(30)]
    if repeats:
        rows.sort(key=lambda row: row[1])
    lines = ["userId,movieId,rating,timestamp"]
    for user, j in rows:
        step = (j * j) % 31 if repeats else j
        lines.append(f"{user * 3},{(user * 11 + step * 5) % 97 + 1},4.0,{(user * 3 + j * 7) % 23}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("repeats", [False, True], ids=["no repeats", "repeats"])
def test_without_validation_the_cache_keeps_its_contents_and_with_it_its_test_split(tmp_path, repeats):
    source = write_pinned_csv(tmp_path / "ratings.csv", repeats)
    plain, split = tmp_path / "plain", tmp_path / "split"
    convert_ok("--path", source, "--output", plain, "--valid_negative", 10)
    result = convert_ok("--path", source, "--output", split, "--valid_negative", 10, "--validation")
    assert sorted(p.name for p in plain.iterdir()) == sorted(convert.CACHE_FILES)
    assert cache_digest(plain) == PINNED_DIGESTS["repeats" if repeats else "no repeats"]
    assert sorted(p.name for p in split.iterdir()) == sorted(convert.CACHE_FILES + tuple(VALID_TENSOR_FILES.values()))
    for name in ("test_ratings.pt", "test_negatives.pt", "user_ids.csv", "item_ids.csv"):
        assert (split / name).read_bytes() == (plain / name).read_bytes(), name
    a, b = load_cache(plain), load_cache(split)
    assert b["meta"] == a["meta"] | {"validation": True, "n_train": a["meta"]["n_train"] - 40}
    assert "validation" not in a["meta"]
    assert f"{b['meta']['n_train']:,} training, 40 validation and 40 test ratings" in result.stdout
    frame = pd.read_csv(source, dtype=str)  # raw ids as the id maps hold them
    expected_valid = naive_split(
        frame["userId"].tolist(), frame["movieId"].tolist(), frame["timestamp"].astype(int).tolist()
    )[2]
    check_validation_split(a, b, expected_valid)
    # a validation cache without its validation files is incomplete
    (split / "valid_negatives.pt").unlink()
    with pytest.raises(CliError, match=r"incomplete \(missing valid_negatives\.pt\)"):
        convert.read_metadata(split)


# --- the NCF paper's files (--format ncf-paper) ---------------------------------------------


def write_ncf_paper(directory, name, train, test, negatives, train_times=None):
    """NAME.train.rating, NAME.test.rating and NAME.test.negative in the paper's layout; returns the first."""
    times = range(len(train)) if train_times is None else train_times
    lines = [f"{u}\t{i}\t5\t{t}\n" for (u, i), t in zip(train, times, strict=True)]
    (directory / f"{name}.train.rating").write_text("".join(lines))
    (directory / f"{name}.test.rating").write_text("".join(f"{u}\t{i}\t4\t{10**9 + u}\n" for u, i in test))
    rows = ["\t".join([f"({u},{i})", *map(str, row)]) + "\n" for (u, i), row in zip(test, negatives, strict=True)]
    (directory / f"{name}.test.negative").write_text("".join(rows))
    return directory / f"{name}.train.rating"


def test_ncf_paper_files_round_trip(tiny_cache, tmp_path):
    """A cache written out as the paper's three files (training lines shuffled) converts back to the same
    training pairs, test pairs and negatives, with the ids as they are."""
    original = load_cache(tiny_cache)
    train = original["train"][np.random.default_rng(0).permutation(len(original["train"]))].tolist()
    source = write_ncf_paper(tmp_path, "tiny", train, original["test"].tolist(), original["negatives"].tolist())
    result = convert_ok("--format", "ncf-paper", "--path", source, "--output", tmp_path / "cache")
    back = load_cache(tmp_path / "cache")
    for name in ("train", "test", "negatives"):
        assert np.array_equal(back[name], original[name]), name
    assert back["user_ids"] == [str(user) for user in range(60)]
    assert back["item_ids"] == [str(item) for item in range(200)]
    siblings = [source.with_name(f"tiny{suffix}") for suffix in (".train.rating", ".test.rating", ".test.negative")]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in siblings)).hexdigest()
    assert back["meta"] == original["meta"] | {
        "format": "ncf-paper",
        "source": "tiny.train.rating",
        "source_sha256": digest,  # of the three files, one after the other
        "n_ratings_read": len(train) + 60,
        "min_ratings": None,
    }
    assert "note" not in result.stdout
    # the name is enough to guess the format
    convert_ok("--path", source, "--output", tmp_path / "guessed")
    assert cache_digest(tmp_path / "guessed") == cache_digest(tmp_path / "cache")


def test_ncf_paper_repeated_pairs_and_test_pairs_among_the_training_pairs(tmp_path):
    """A repeated training pair is kept once (and said so); a test pair that is also a training pair stays in
    both (said so too), as the paper's code, which trains on every line of its training file."""
    train = [(0, 1), (0, 2), (0, 1), (1, 3), (1, 4)]
    source = write_ncf_paper(tmp_path, "x", train, [(0, 5), (1, 4)], [[6, 7], [0, 8]])
    result = convert_ok("--path", source, "--output", tmp_path / "cache")
    cache = load_cache(tmp_path / "cache")
    assert cache["train"].tolist() == [[0, 1], [0, 2], [1, 3], [1, 4]]
    assert cache["test"].tolist() == [[0, 5], [1, 4]]
    assert cache["meta"]["n_items"] == 9 and cache["meta"]["n_ratings_read"] == 7
    assert result.stdout.splitlines()[1:] == [
        "note: x.train.rating: 1 repeated pairs dropped (the first line kept)",
        "note: x.test.rating: 1 test pairs are training pairs too: kept in both, as the paper's code trains on "
        "every line of its training file",
    ]


def naive_latest_train_items(lines):
    """{user: item of its latest training line (time, then line; a repeated pair keeps its first line)}."""
    first = {}
    for row, (user, item, time) in enumerate(lines):
        first.setdefault((user, item), (time, row))
    latest = {}
    for (user, item), order in first.items():
        if user not in latest or order > latest[user][0]:
            latest[user] = (order, item)
    return {user: item for user, (_, item) in latest.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_ncf_paper_with_validation_holds_out_the_latest_training_pair(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, per_user = 30, 25, 9
    lines, test, negatives = [], [], []
    for user in range(n_users):
        items = rng.permutation(n_items)
        test.append((user, int(items[0])))
        negatives.append(rng.choice(items[1:], per_user).tolist())  # never training items here: free to choose
        mine = rng.choice(items[per_user + 1 :], rng.integers(2, 8), replace=False)
        mine = np.r_[mine, rng.choice(mine, 2)]  # repeated pairs, later lines
        lines += [(user, int(item), int(time)) for item, time in zip(mine, rng.integers(0, 3, len(mine)), strict=True)]
    order = rng.permutation(len(lines))
    lines = [lines[row] for row in order]
    source = write_ncf_paper(tmp_path, "x", [line[:2] for line in lines], test, negatives, [line[2] for line in lines])
    convert_ok("--path", source, "--output", tmp_path / "plain")
    convert_ok("--path", source, "--output", tmp_path / "split", "--validation", "--seed", seed)
    plain, split = load_cache(tmp_path / "plain"), load_cache(tmp_path / "split")
    assert split["meta"]["validation"] is True and split["meta"]["valid_negative"] == per_user
    assert split["test"].tolist() == [list(pair) for pair in test] and split["negatives"].tolist() == negatives
    check_validation_split(plain, split, {str(u): str(i) for u, i in naive_latest_train_items(lines).items()})


def test_ncf_paper_ml_1m(shared_data, tmp_path):
    """The paper's ML-1m test files with a training file rebuilt for users 0-2998 from the ratings prefix
    (SOURCES.md: NCF user = UserID - 1, NCF item = rank of the MovieID's first appearance; training = the
    user's ratings but its test item): the cache holds the paper's test items and negatives exactly."""
    frame = pd.read_csv(
        shared_data / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat",
        sep=":",
        header=None,
        usecols=[0, 2, 4, 6],
        names=["user", "movie", "rating", "time"],
    )
    frame["user"] -= 1
    frame["item"] = pd.factorize(frame["movie"])[0]
    paper = shared_data / "ncf-paper"
    test = pd.read_csv(paper / "ml-1m.test.rating", sep="\t", header=None, names=["user", "item", "rating", "time"])
    test = test[test["user"] < 2_999]
    is_test = frame["item"].to_numpy() == test["item"].to_numpy()[frame["user"]]
    assert is_test.sum() == 2_999  # each test item is one of the user's ratings
    frame[~is_test][["user", "item", "rating", "time"]].to_csv(
        tmp_path / "ml-1m.train.rating", sep="\t", header=False, index=False
    )
    test.to_csv(tmp_path / "ml-1m.test.rating", sep="\t", header=False, index=False)
    negative_lines = (paper / "ml-1m.test.negative").read_text().splitlines(keepends=True)[:2_999]
    (tmp_path / "ml-1m.test.negative").write_text("".join(negative_lines))
    convert_ok("--path", tmp_path / "ml-1m.train.rating", "--output", tmp_path / "cache")
    cache = load_cache(tmp_path / "cache")
    meta = cache["meta"]
    assert (meta["n_users"], meta["n_items"], meta["n_train"], meta["valid_negative"]) == (2_999, 3_706, 484_651, 99)
    assert cache["test"].tolist() == test[["user", "item"]].to_numpy().tolist()
    paper_negatives = [[int(item) for item in line.split("\t")[1:]] for line in negative_lines]
    assert cache["negatives"].tolist() == paper_negatives
    # the training pairs are the ratings less the test pairs, and no paper negative is one of them
    train_keys = cache["train"] @ [4_096, 1]
    assert np.array_equal(train_keys, np.sort(frame[~is_test][["user", "item"]].to_numpy() @ [4_096, 1]))
    assert not np.isin(np.arange(2_999)[:, None] * 4_096 + cache["negatives"], train_keys).any()
    # our evaluation sees the paper's protocol: 99 negatives, the test item among them for a few users, not counted
    data = dataloading.load_cache(tmp_path / "cache")
    evaluator = dataloading.make_evaluator(data, "test", "reference", 0, 1, torch.device("cpu"))
    own = (data.test_negatives == data.test[:, 1:]).any(dim=1)
    assert 0 < own.sum() < 2_999 // 10
    assert torch.equal(
        evaluator.counted.sum(dim=1)[own], 99 - (data.test_negatives == data.test[:, 1:])[own].sum(dim=1)
    )


# --- the cache on disk ------------------------------------------------------------------------


def write_small_csv(path):
    """A 4-user ml-20m file: 3 users with >= 20 ratings, one with 5; 56 distinct items."""
    rng = np.random.default_rng(0)
    lines = ["userId,movieId,rating,timestamp"]
    for user, count in ((1, 25), (2, 5), (3, 40), (4, 30)):
        for item in rng.choice(60, count, replace=False):
            lines.append(f"{user},{item + 1},4.0,{rng.integers(1_000, 1_100)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory):
    """The small file converted three times by the CLI: seed 1 twice (different directories), seed 2."""
    root = tmp_path_factory.mktemp("small")
    source = write_small_csv(root / "ratings.csv")
    outputs = {"first": root / "a" / "cache", "second": root / "b" / "another_name", "seed 2": root / "c" / "cache"}
    seeds = {"first": 1, "second": 1, "seed 2": 2}
    with ThreadPoolExecutor(3) as pool:
        runs = pool.map(
            lambda name: run_convert(
                "--path", source, "--output", outputs[name], "--valid_negative", 10, "--seed", seeds[name]
            ),
            outputs,
        )
        for result in runs:
            assert result.returncode == 0, result.stderr
    return source, outputs


def test_same_seed_gives_byte_identical_caches(small_caches):
    _, outputs = small_caches
    first, second = outputs["first"], outputs["second"]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(convert.CACHE_FILES)
    assert sorted(p.name for p in second.iterdir()) == names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # another seed: other negatives, the same everything else
    a, c = load_cache(first), load_cache(outputs["seed 2"])
    assert (a["meta"]["n_users"], a["meta"]["n_items"], a["meta"]["n_train"]) == (3, 56, 25 + 40 + 30 - 3)
    assert a["negatives"].shape == (3, 10)
    assert not np.array_equal(a["negatives"], c["negatives"])
    assert np.array_equal(a["train"], c["train"]) and np.array_equal(a["test"], c["test"])
    assert (a["meta"]["seed"], c["meta"]["seed"]) == (1, 2)
    # the cache directory gets the usual permissions (mkdtemp alone would give 0o700)
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask


def test_check(small_caches, tmp_path):
    _, outputs = small_caches
    out = outputs["first"]

    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        damage(copy)
        return copy

    meta = json.loads((out / "metadata.json").read_text())
    old_meta = json.dumps({**meta, "format_version": convert.FORMAT_VERSION - 1})
    cases = {
        "missing": (tmp_path / "nothing_here", "no metadata.json"),
        "partial": (broken("partial", lambda d: (d / "test_negatives.pt").unlink()), "incomplete"),
        "old version": (broken("old", lambda d: (d / "metadata.json").write_text(old_meta)), "another version"),
        "corrupt metadata": (broken("corrupt", lambda d: (d / "metadata.json").write_text("{")), "corrupt"),
        "not a dict": (broken("list", lambda d: (d / "metadata.json").write_text("[1]")), "another version"),
    }
    for directory, message in cases.values():
        with pytest.raises(CliError, match=message):
            convert.read_metadata(directory)
    assert convert.read_metadata(out)["n_users"] == 3
    # the CLI: exit 0 on the valid cache (no --path needed), != 0 with one line on a partial or old one
    cli_cases = {"valid": out} | {name: cases[name][0] for name in ("partial", "old version")}
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda d: run_convert("--check", "--output", d), cli_cases.values())
        results = dict(zip(cli_cases, results, strict=True))
    assert results.pop("valid").returncode == 0
    for name, result in results.items():
        assert_one_line_error(result)
        assert cases[name][1] in result.stderr


def test_an_existing_file_or_empty_directory_as_output(tmp_path):
    cache = build([1, 1], [1, 2], [1, 2])
    meta = {"format_version": convert.FORMAT_VERSION}
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(CliError, match="is not a data cache"):
        convert.write_cache(a_file, cache, meta)
    assert a_file.read_text() == "keep me"
    empty = tmp_path / "empty"  # an empty directory holds nothing to lose
    empty.mkdir()
    convert.write_cache(empty, cache, meta)
    assert convert.read_metadata(empty)["format_version"] == convert.FORMAT_VERSION
    assert leftovers(tmp_path, "empty") == []


def test_reconverting_replaces_the_cache(small_caches, tmp_path):
    source, outputs = small_caches
    out = tmp_path / "cache"
    shutil.copytree(outputs["first"], out)
    first = load_cache(out)
    convert_ok("--path", source, "--output", out, "--valid_negative", "10", "--seed", "2")
    second = load_cache(out)
    assert second["meta"]["seed"] == 2
    assert not np.array_equal(first["negatives"], second["negatives"])
    for name in convert.CACHE_FILES:  # byte for byte the cache a fresh run with seed 2 writes
        assert (out / name).read_bytes() == (outputs["seed 2"] / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_every_tensor_file_of_a_cache_loads_memory_mapped(tmp_path):
    """torch.load(mmap=True) maps the records in place: each file holds the values the conversion computed,
    as torch.save writes them, with the int32 data at an offset aligned for int32 reads."""
    source = write_small_csv(tmp_path / "ratings.csv")
    out = tmp_path / "cache"
    convert_ok("--path", source, "--output", out, "--valid_negative", 10, "--validation")
    expected = convert.build(*convert.read_ratings(source, "ml-20m"), 20, 10, 1, validation=True)
    files = TENSOR_FILES | VALID_TENSOR_FILES
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(files.values())
    (tmp_path / "again").mkdir()
    for name, file in files.items():
        tensor = torch.load(out / file, mmap=True, weights_only=True)
        assert tensor.dtype == torch.int32 and np.array_equal(tensor.numpy(), expected[name]), name
        torch.save(tensor.clone(), tmp_path / "again" / file)
        assert (out / file).read_bytes() == (tmp_path / "again" / file).read_bytes(), name
        with zipfile.ZipFile(out / file) as archive:
            (record,) = (info for info in archive.infolist() if info.filename.endswith("/data/0"))
        header = (out / file).read_bytes()[record.header_offset :][:30]  # the record's local header
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        assert (record.header_offset + 30 + name_length + extra_length) % 4 == 0, name


def test_numeric_files_convert_without_pandas_and_import_torch_off_the_main_thread(tmp_path):
    """pandas is needed only by string ids; torch, which writes the tensors, is imported by a background
    thread while the main thread reads and processes the file, with the cyclic garbage collector off (its
    collections would walk the import's objects hundreds of times, holding the GIL the processing needs);
    those objects are frozen out of later collections, and the collector is back on afterwards."""
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n" + "".join(f"1,{i},4.0,{i}\n" for i in range(30)))
    code = """
import gc, sys, threading
torch_importers = []
class SpyOnTorch:  # asked for a module's spec before it is imported, in the importing thread
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            torch_importers.append((threading.current_thread() is threading.main_thread(), gc.isenabled()))
sys.meta_path.insert(0, SpyOnTorch())
sys.argv = ["convert.py", "--path", sys.argv[1], "--output", sys.argv[2], "--valid_negative", "5"]
import convert
convert.main()
print(torch_importers, "pandas" in sys.modules, gc.isenabled(), gc.get_freeze_count() > 0)
"""
    result = subprocess.run([sys.executable, "-c", code, ratings, tmp_path / "cache"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr
    # torch by another thread, once, the collector off; no pandas; the collector on again, torch's objects frozen
    assert result.stdout.decode().splitlines()[-1] == "[(False, False)] False True True"
    assert convert.read_metadata(tmp_path / "cache")["n_train"] == 29


@pytest.mark.parametrize("setting, advised", [(None, "False"), ("1", "True")])
def test_numpy_gives_no_huge_page_advice_unless_the_user_asks_for_it(setting, advised):
    """Where the kernel honours numpy's huge-page advice, every large temporary of the pipeline faults in
    whole huge pages; convert.py turns the advice off before numpy is imported, and a user's own
    NUMPY_MADVISE_HUGEPAGE still wins."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    env |= {} if setting is None else {"NUMPY_MADVISE_HUGEPAGE": setting}
    code = "import convert, numpy._core.multiarray as m; print(m._get_madvise_hugepage())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == advised


def test_torch_imported_already_leaves_the_garbage_collector_alone():
    """Runs in one process after the first (tests, a notebook) freeze nothing: only the first import does."""
    frozen = gc.get_freeze_count()
    assert convert.import_torch() is torch
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_torch_that_cannot_be_imported_is_a_one_line_error(small_caches, tmp_path):
    """The background import's error reaches the main thread; the cache already at --output stays."""
    source, outputs = small_caches
    out = tmp_path / "cache"
    shutil.copytree(outputs["first"], out)
    code = (
        "import sys; sys.modules['torch'] = None; import convert, utils; sys.argv = ['convert.py', *sys.argv[1:]];"
        "utils.run_main(convert.main)"
    )
    command = [sys.executable, "-c", code, "--path", source, "--output", out, "--valid_negative", "10", "--seed", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(result)
    assert "cannot import torch" in result.stderr
    assert cache_digest(out) == cache_digest(outputs["first"])
    assert leftovers(tmp_path, "cache") == []


def test_a_file_that_cannot_be_hashed_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """The hashing thread's error reaches the main thread (here: the file is gone once read)."""
    source = write_small_csv(tmp_path / "ratings.csv")
    real_read = convert.read_ratings

    def read_then_delete(*args, **kwargs):
        columns = real_read(*args, **kwargs)
        source.unlink()
        return columns

    monkeypatch.setattr(convert, "read_ratings", read_then_delete)
    argv = ["convert.py", "--path", str(source), "--output", str(tmp_path / "cache"), "--valid_negative", "10"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_main(convert.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"convert.py: error: cannot read {source} to hash it: No such file or directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt, OSError])
def test_a_crash_while_writing_leaves_the_old_cache_untouched(tmp_path, monkeypatch, crash):
    source = write_small_csv(tmp_path / "ratings.csv")
    out = tmp_path / "cache"
    cache = convert.build(*convert.read_ratings(source, "ml-20m"), 20, 10, 1)
    meta = {"format_version": convert.FORMAT_VERSION, "seed": 1}
    convert.write_cache(out, cache, meta)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    saved = []
    real_save = convert.save_tensor

    def save_then_crash(array, path):
        saved.append(path)
        if len(saved) == 2:
            raise crash(28, "No space left on device")
        real_save(array, path)

    monkeypatch.setattr(convert, "save_tensor", save_then_crash)
    with pytest.raises(CliError if crash is OSError else crash):
        convert.write_cache(out, cache, {**meta, "seed": 2})
    assert len(saved) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert convert.read_metadata(out)["seed"] == 1
    assert leftovers(tmp_path, "cache") == []
    # without the crash the new cache replaces the old one, and nothing else is left behind
    monkeypatch.setattr(convert, "save_tensor", real_save)
    convert.write_cache(out, cache, {**meta, "seed": 2})
    assert convert.read_metadata(out)["seed"] == 2
    assert leftovers(tmp_path, "cache") == []


def move_aside_as_a_killed_replacement_does(out, new_cache):
    """What a run killed between write_cache's two renames leaves: the old cache moved into .NAME.old-*, the
    new one complete in .NAME.tmp-*, nothing at out; and an incomplete and an empty leftover of other kills."""
    parent, name = out.parent, out.name
    (parent / f".{name}.old-k1ll3d01").mkdir()
    os.replace(out, parent / f".{name}.old-k1ll3d01" / name)
    shutil.copytree(new_cache, parent / f".{name}.tmp-k1ll3d02")
    (parent / f".{name}.tmp-k1ll3d03").mkdir()
    (parent / f".{name}.tmp-k1ll3d03" / "train_ratings.pt").write_bytes(b"PK")
    (parent / f".{name}.old-k1ll3d04").mkdir()


@pytest.mark.parametrize("next_run", ["check", "convert"])
def test_the_next_run_restores_a_cache_that_a_kill_left_moved_aside(small_caches, tmp_path, next_run):
    source, outputs = small_caches
    out = tmp_path / "cache"
    shutil.copytree(outputs["first"], out)
    move_aside_as_a_killed_replacement_does(out, outputs["seed 2"])
    others = [tmp_path / ".other.tmp-k1ll3d05", tmp_path / ".cache.tmp-k1ll3d06.old-k1ll3d07"]  # not out's
    for path in others:
        path.mkdir()
    if next_run == "check":
        result = convert_ok("--check", "--output", out)
        assert f"note: {out}: restored the cache that an interrupted run had moved aside" in result.stdout
        assert cache_digest(out) == cache_digest(outputs["first"])
    else:
        convert_ok("--path", source, "--output", out, "--valid_negative", 10, "--seed", 2)
        assert cache_digest(out) == cache_digest(outputs["seed 2"])
    assert leftovers(tmp_path, "cache") == [others[1].name]
    assert all(path.is_dir() for path in others)


def test_recovery_leaves_the_directories_of_a_running_conversion_alone(small_caches, tmp_path):
    """A conversion holds a lock on its temporary directories for as long as they exist: another run that
    starts meanwhile (here: between that conversion's two renames) leaves them alone."""
    _, outputs = small_caches
    out = tmp_path / "cache"
    shutil.copytree(outputs["first"], out)
    move_aside_as_a_killed_replacement_does(out, outputs["seed 2"])
    live = [tmp_path / ".cache.old-k1ll3d01", tmp_path / ".cache.tmp-k1ll3d02"]
    locks = [os.open(path, os.O_RDONLY) for path in live]
    try:
        for lock in locks:
            fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_convert("--check", "--output", out)
        assert_one_line_error(result)
        assert "no metadata.json" in result.stderr
        assert leftovers(tmp_path, "cache") == sorted(path.name for path in live)  # the stale ones are gone
    finally:
        for lock in locks:
            os.close(lock)
    convert_ok("--check", "--output", out)  # once the conversion is gone (killed), its old cache comes back
    assert cache_digest(out) == cache_digest(outputs["first"])
    assert leftovers(tmp_path, "cache") == []


@pytest.mark.parametrize("crash", [OSError, KeyboardInterrupt])
def test_a_failure_between_the_renames_puts_the_old_cache_back(tmp_path, monkeypatch, crash):
    source = write_small_csv(tmp_path / "ratings.csv")
    out = tmp_path / "cache"
    cache = convert.build(*convert.read_ratings(source, "ml-20m"), 20, 10, 1)
    meta = {"format_version": convert.FORMAT_VERSION, "seed": 1}
    convert.write_cache(out, cache, meta)
    before = cache_digest(out)
    real_replace, renames = os.replace, []

    def rename_then_fail(source, destination):
        renames.append(destination)
        if len(renames) == 2:  # the new cache into place, the old one just moved aside
            raise crash(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", rename_then_fail)
    with pytest.raises(CliError if crash is OSError else crash):
        convert.write_cache(out, cache, {**meta, "seed": 2})
    assert renames[1] == out
    assert cache_digest(out) == before
    assert leftovers(tmp_path, "cache") == []


def keep_everything_into(output):
    """Flags that convert {dir}/ratings.csv, keeping every user, into output."""
    return ["--path", "{dir}/ratings.csv", "--min_ratings", "1", "--valid_negative", "1", "--output", output]


# --- bad input --------------------------------------------------------------------------------

GOOD = "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,4.0,101\n1,30,3.0,102\n2,10,1.0,100\n2,20,2.0,105\n"
# the NCF paper's three files for 3 users, 10 items, 3 negatives per user
GOOD_NCF = {
    "x.train.rating": "0\t1\t5\t10\n0\t2\t5\t11\n1\t3\t5\t12\n1\t4\t5\t13\n2\t5\t5\t14\n2\t6\t5\t15\n",
    "x.test.rating": "0\t7\t4\t20\n1\t8\t4\t21\n2\t9\t4\t22\n",
    "x.test.negative": "(0,7)\t3\t4\t5\n(1,8)\t0\t1\t2\n(2,9)\t0\t1\t2\n",
}
NCF_ARGS = ["--path", "{dir}/x.train.rating", "--format", "ncf-paper"]


def ncf_files(name, old, new):
    """GOOD_NCF with `old` replaced by `new` in file NAME (new None: without that file)."""
    files = dict(GOOD_NCF)
    if new is None:
        del files[name]
    else:
        assert old in files[name]
        files[name] = files[name].replace(old, new)
    return files


# name: (files to create, arguments ({dir} is the case's directory), what the message must contain).
# --output is {dir}/cache unless given.
BAD_INPUTS = {
    "missing file": ({}, ["--path", "{dir}/ratings.csv"], "does not exist"),
    "empty file": ({"ratings.csv": ""}, ["--path", "{dir}/ratings.csv"], "is empty"),
    "header only": (
        {"ratings.csv": "userId,movieId,rating,timestamp\n"},
        ["--path", "{dir}/ratings.csv"],
        "no ratings",
    ),
    "malformed row, ml-20m": (
        {"ratings.csv": GOOD + "3,10,4.0,100,7\n"},
        ["--path", "{dir}/ratings.csv"],
        "line 7: expected 4 fields, got 5",
    ),
    "malformed row, ml-1m": (
        {"ratings.dat": "1::10::4::100\n1::20::4\n"},
        ["--path", "{dir}/ratings.dat", "--format", "ml-1m"],
        "line 2: expected 4 fields, got 3",
    ),
    "malformed row, ml-100k": (
        {"u.data": "1\t10\t4\t100\n1\tabc\t4\t101\n"},
        ["--path", "{dir}/u.data"],
        "line 2: item id 'abc' is not an integer",
    ),
    "missing column, ml-20m": (
        {"ratings.csv": "userId,movieId,rating\n1,10,4.0\n"},
        ["--path", "{dir}/ratings.csv"],
        "no column timestamp",
    ),
    "missing column, custom header": (
        {"events.csv": "user_id,item_id,rating\n1,10,4.0\n"},
        ["--path", "{dir}/events.csv"],
        "no column timestamp",
    ),
    "missing column, custom without header": (
        {"events.csv": "1,10\n2,20\n"},
        ["--path", "{dir}/events.csv", "--format", "custom"],
        "line 1: expected at least 3 fields, got 2",
    ),
    "missing column, ml-100k": (
        {"u.data": "1\t10\t4\n"},
        ["--path", "{dir}/u.data", "--format", "ml-100k"],
        "line 1: expected 4 fields, got 3",
    ),
    "non-numeric timestamp, ml-20m": (
        {"ratings.csv": GOOD.replace("1,20,4.0,101", "1,20,4.0,yesterday")},
        ["--path", "{dir}/ratings.csv"],
        "line 3: timestamp 'yesterday' is not a number",
    ),
    "non-numeric timestamp, custom": (
        {"events.csv": "user_id,item_id,timestamp\na,b,1\na,c,noon\n"},
        ["--path", "{dir}/events.csv"],
        "line 3: timestamp 'noon' is not a number",
    ),
    "empty user id, ml-20m": (
        {"ratings.csv": GOOD.replace("1,20,4.0,101", ",20,4.0,101")},
        ["--path", "{dir}/ratings.csv"],
        "line 3: user id '' is not an integer",
    ),
    "empty timestamp, custom": (
        {"events.csv": "user_id,item_id,timestamp\na,b,1\na,c,\n"},
        ["--path", "{dir}/events.csv"],
        "line 3: timestamp '' is not a number",
    ),
    "blank item id, custom": (
        {"events.csv": "a,b,1\na,c,2\na, ,3\n"},
        ["--path", "{dir}/events.csv", "--format", "custom"],
        "line 3: empty item id",
    ),
    "nan timestamp, custom": (
        {"events.csv": "a,b,1\na,c,2\na,d,nan\n"},
        ["--path", "{dir}/events.csv", "--format", "custom"],
        "line 3: timestamp is not a finite number",
    ),
    "negative user id": (
        {"u.data": "1\t10\t4\t100\n1\t11\t4\t101\n-2\t10\t4\t100\n"},
        ["--path", "{dir}/u.data"],
        "line 3: negative user id -2",
    ),
    "negative item id after a blank line": (
        {"ratings.csv": GOOD + "\n2,-30,4.0,100\n"},
        ["--path", "{dir}/ratings.csv"],
        "line 8: negative item id -30",
    ),
    "every user filtered out": ({"ratings.csv": GOOD}, ["--path", "{dir}/ratings.csv"], "no user has 20 or more"),
    "rating threshold leaves no user with enough ratings": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--rating_threshold", "4", "--min_ratings", "3"],
        "no user has 3 or more ratings (--min_ratings) among the 2 ratings kept, of 1 user;",
    ),
    "rating threshold above every rating": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--rating_threshold", "4.5"],
        "no rating is at least 4.5 (--rating_threshold); the highest is 4",
    ),
    "rating threshold not a number": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--rating_threshold", "nan"],
        "--rating_threshold must be a finite number",
    ),
    "non-numeric rating, ml-20m": (
        {"ratings.csv": GOOD.replace("1,20,4.0,101", "1,20,good,101")},
        ["--path", "{dir}/ratings.csv", "--rating_threshold", "4"],
        "line 3: rating 'good' is not a number",
    ),
    "non-numeric rating, ml-1m": (
        {"ratings.dat": "1::10::4::100\n1::20::x::101\n"},
        ["--path", "{dir}/ratings.dat", "--rating_threshold", "4"],
        "line 2: rating 'x' is not a number",
    ),
    "non-numeric rating, ml-100k": (
        {"u.data": "1\t10\t4\t100\n1\t11\tfive\t101\n"},
        ["--path", "{dir}/u.data", "--rating_threshold", "4"],
        "line 2: rating 'five' is not a number",
    ),
    "empty rating, custom": (
        {"events.csv": "user_id,item_id,timestamp,rating\na,b,1,4\na,c,2,\n"},
        ["--path", "{dir}/events.csv", "--rating_threshold", "4"],
        "line 3: rating '' is not a number",
    ),
    "nan rating, custom": (
        {"events.csv": "user_id,item_id,timestamp,rating\na,b,1,4\na,c,2,nan\n"},
        ["--path", "{dir}/events.csv", "--rating_threshold", "4"],
        "line 3: rating is not a finite number",
    ),
    "no rating column, custom header": (
        {"events.csv": "user_id,item_id,timestamp\na,b,1\n"},
        ["--path", "{dir}/events.csv", "--rating_threshold", "4"],
        "has no column rating",
    ),
    "no rating column, custom without header": (
        {"events.csv": "a,b,1,5\n"},
        ["--path", "{dir}/events.csv", "--rating_threshold", "4"],
        "--rating_threshold needs a rating column",
    ),
    "abbreviated flag": (  # --min_rating is not --min_ratings (nor --rating_threshold)
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--min_rating", "1"],
        "unrecognized arguments: --min_rating 1",
    ),
    "unknown format": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--format", "ml-30m"],
        "invalid choice: 'ml-30m'",
    ),
    "no --path": ({}, [], "the following arguments are required: --path"),
    "unwritable output": (  # under a regular file: fails for root too, unlike a chmod-ed directory
        {"ratings.csv": GOOD, "a_file": "x"},
        keep_everything_into("{dir}/a_file/cache"),
        "cannot write",
    ),
    "output is a directory that is not a cache": (
        {"ratings.csv": GOOD, "my_documents/thesis.txt": "precious"},
        keep_everything_into("{dir}/my_documents"),
        "is not a data cache",
    ),
    "valid_negative equal to the number of items": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--min_ratings", "1", "--valid_negative", "3"],
        "--valid_negative 3 must be smaller than the number of items (3)",
    ),
    "valid_negative zero": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--valid_negative", "0"],
        "--valid_negative must be at least 1",
    ),
    "min_ratings zero": ({"ratings.csv": GOOD}, ["--path", "{dir}/ratings.csv", "--min_ratings", "0"], "at least 1"),
    "negative seed": (
        {"ratings.csv": GOOD},
        ["--path", "{dir}/ratings.csv", "--seed", "-1"],
        "--seed must be non-negative",
    ),
    "validation with a user of two interactions": (
        {"ratings.csv": GOOD},
        keep_everything_into("{dir}/cache") + ["--validation"],
        "--validation needs 3 distinct interactions per user (training, validation, test): 1 of the 2 users have "
        "fewer; drop them with --min_ratings 3 or more",
    ),
    "format cannot be guessed": ({"ratings.txt": GOOD}, ["--path", "{dir}/ratings.txt"], "cannot guess the format"),
    "ncf-paper: not a .train.rating": (
        {"x.rating": GOOD_NCF["x.train.rating"]},
        ["--path", "{dir}/x.rating", "--format", "ncf-paper"],
        "--format ncf-paper reads NAME.train.rating (its NAME.test.* files beside it), not ",
    ),
    "ncf-paper: missing test.negative": (
        ncf_files("x.test.negative", "", None),
        NCF_ARGS,
        "x.test.negative does not exist (the NCF paper's split is three files side by side: x.train.rating, "
        "x.test.rating, x.test.negative)",
    ),
    "ncf-paper: missing test.rating": (ncf_files("x.test.rating", "", None), NCF_ARGS, "x.test.rating does not exist"),
    "ncf-paper: malformed training line": (
        ncf_files("x.train.rating", "0\t2\t5\t11\n", "0\t2\t11\n"),
        NCF_ARGS,
        "x.train.rating: line 2: expected 4 fields, got 3",
    ),
    "ncf-paper: training user without a test line": (
        ncf_files("x.train.rating", "2\t6\t5\t15\n", "2\t6\t5\t15\n3\t6\t5\t16\n"),
        NCF_ARGS,
        "x.train.rating: line 7: user 3 has no line in x.test.rating (users 0 to 2)",
    ),
    "ncf-paper: test users out of order": (
        ncf_files("x.test.rating", "1\t8\t4\t21\n2\t9", "2\t9\t4\t22\n1\t8"),
        NCF_ARGS,
        "x.test.rating: line 2: user 2 where user 1 was expected (one line per user 0, 1, 2, ... in order)",
    ),
    "ncf-paper: a negative line disagrees with the test rating": (
        ncf_files("x.test.negative", "(1,8)", "(1,9)"),
        NCF_ARGS,
        "x.test.negative: line 2: (1,9) disagrees with x.test.rating, where user 1's test item is 8",
    ),
    "ncf-paper: no (user,item)": (
        ncf_files("x.test.negative", "(2,9)\t", "2\t9\t"),
        NCF_ARGS,
        "x.test.negative: line 3: expected '(user,item)' first, got '2'",
    ),
    "ncf-paper: fewer negatives on a line": (
        ncf_files("x.test.negative", "(2,9)\t0\t1\t2", "(2,9)\t0\t1"),
        NCF_ARGS,
        "x.test.negative: line 3: 2 negatives, expected as many as line 1 (3)",
    ),
    "ncf-paper: a non-integer negative": (
        ncf_files("x.test.negative", "(1,8)\t0\t1", "(1,8)\t0\tone"),
        NCF_ARGS,
        "x.test.negative: line 2: negative item 'one' is not an integer",
    ),
    "ncf-paper: a negative item id": (
        ncf_files("x.test.negative", "(1,8)\t0", "(1,8)\t-4"),
        NCF_ARGS,
        "x.test.negative: line 2: negative item id -4",
    ),
    "ncf-paper: a user without negatives": (
        ncf_files("x.test.negative", "(2,9)\t0\t1\t2\n", ""),
        NCF_ARGS,
        "x.test.negative has 2 lines for the 3 users of x.test.rating",
    ),
    "ncf-paper: more negative lines than users": (
        ncf_files("x.test.negative", "(2,9)\t0\t1\t2\n", "(2,9)\t0\t1\t2\n(3,9)\t0\t1\t2\n"),
        NCF_ARGS,
        "x.test.negative: line 4: more lines than x.test.rating has users (3)",
    ),
    "ncf-paper: --min_ratings": (
        GOOD_NCF,
        NCF_ARGS + ["--min_ratings", "20"],
        "--min_ratings does not apply to --format ncf-paper (its users and negatives are given)",
    ),
    "ncf-paper: --valid_negative": (
        GOOD_NCF,
        NCF_ARGS + ["--valid_negative", "3"],
        "--valid_negative does not apply to --format ncf-paper",
    ),
    "ncf-paper: validation with a single training pair": (
        ncf_files("x.train.rating", "2\t6\t5\t15\n", ""),
        NCF_ARGS + ["--validation"],
        "--validation needs 2 training pairs per user in x.train.rating (one becomes its validation pair): 1 of the "
        "3 users have fewer",
    ),
    "ncf-paper: validation with a test pair among the training pairs": (
        ncf_files("x.test.rating", "1\t8", "1\t4")
        | {"x.test.negative": GOOD_NCF["x.test.negative"].replace("(1,8)", "(1,4)")},
        NCF_ARGS + ["--validation"],
        "x.test.rating: line 2: user 1's test item is also one of its training items in x.train.rating; "
        "--validation needs them apart",
    ),
}
ARGPARSE_ERRORS = {
    "unknown format",
    "no --path",
    "abbreviated flag",
}  # argparse prints its usage before the one error line
# Each CLI run pays ~1.5 s to import torch, so every case runs in process (the same run_main(main)
# the script runs, with its real stderr and exit code) and a sample of them through the CLI too.
CLI_CASES = [
    "missing file",
    "malformed row, ml-20m",
    "missing column, custom without header",
    "negative item id after a blank line",
    "non-numeric rating, ml-1m",
    "abbreviated flag",
    "unknown format",
    "unwritable output",
    "output is a directory that is not a cache",
    "validation with a user of two interactions",
    "ncf-paper: missing test.negative",
    "ncf-paper: a negative line disagrees with the test rating",
]


def make_case(directory, name):
    files, args, _ = BAD_INPUTS[name]
    for file, text in files.items():
        (directory / file).parent.mkdir(parents=True, exist_ok=True)
        (directory / file).write_text(text)
    args = [a.format(dir=directory) for a in args]
    return args if "--output" in args else args + ["--output", str(directory / "cache")]


def check_bad_input_result(name, directory, returncode, stderr):
    files, _, message = BAD_INPUTS[name]
    assert returncode == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    if name in ARGPARSE_ERRORS:
        assert stderr.startswith("usage: convert.py")
        lines = lines[-1:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("convert.py: error: "), stderr
    assert message in lines[0]
    # nothing written: no cache, no temporary directory, every input file as it was
    expected = {file for file in files} | {str(Path(file).parent) for file in files if "/" in file}
    assert {str(p.relative_to(directory)) for p in directory.rglob("*")} == expected
    for file, text in files.items():
        assert (directory / file).read_text() == text


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_in_process(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convert.py", *make_case(tmp_path, name)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(convert.main)
    check_bad_input_result(name, tmp_path, exit_info.value.code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def bad_input_cli_runs(tmp_path_factory):
    """Run the CLI cases once, two at a time."""
    cases = {}
    for name in CLI_CASES:
        directory = tmp_path_factory.mktemp("bad")
        cases[name] = (directory, make_case(directory, name))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda case: run_convert(*case[1]), cases.values())
        return {name: (cases[name][0], result) for name, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_cli(bad_input_cli_runs, name):
    directory, result = bad_input_cli_runs[name]
    check_bad_input_result(name, directory, result.returncode, result.stderr)


# --- real MovieLens files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert a real file once per module with the CLI; returns (raw file, loaded cache)."""
    done = {}

    def convert_file(source, raw_name):
        if raw_name not in done:
            directory = tmp_path_factory.mktemp(raw_name.replace("/", "_"))
            raw = directory / raw_name
            raw.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, raw)
            convert_ok("--path", raw, "--output", directory / "cache")
            done[raw_name] = (raw, load_cache(directory / "cache"))
        return done[raw_name]

    return convert_file


def check_against_raw(cache, raw_users, raw_items, raw_times):
    """Recompute the split with pandas and compare; check the negatives against the training set."""
    frame = pd.DataFrame({"user": raw_users, "item": raw_items, "time": raw_times})
    frame["line"] = np.arange(len(frame))
    meta = cache["meta"]
    assert cache["user_ids"] == [str(u) for u in pd.unique(frame["user"])]
    assert cache["item_ids"] == [str(i) for i in pd.unique(frame["item"])]
    latest = frame.sort_values(["time", "line"]).groupby("user").tail(1)
    user_ids, item_ids = np.array(cache["user_ids"], dtype=np.int64), np.array(cache["item_ids"], dtype=np.int64)
    ours = dict(zip(user_ids[cache["test"][:, 0]], item_ids[cache["test"][:, 1]], strict=True))
    assert ours == dict(zip(latest["user"], latest["item"], strict=True))
    assert cache["train"].shape == (meta["n_train"], 2)
    assert cache["test"].shape == (meta["n_users"], 2)
    assert cache["test"][:, 0].tolist() == list(range(meta["n_users"]))
    assert cache["negatives"].shape == (meta["n_users"], 100)
    train_keys = cache["train"][:, 0] * meta["n_items"] + cache["train"][:, 1]
    negative_keys = np.arange(meta["n_users"])[:, None] * meta["n_items"] + cache["negatives"]
    assert not np.isin(negative_keys, train_keys).any()


def test_ml_100k(shared_data, converted):
    raw, cache = converted(shared_data / "ml-100k" / "u.data", "ml-100k/u.data")
    meta = cache["meta"]
    assert meta["format"] == "ml-100k"
    assert (meta["n_users"], meta["n_items"], meta["n_train"], meta["n_test"]) == (943, 1_682, 99_057, 943)
    frame = pd.read_csv(raw, sep="\t", header=None, names=["user", "item", "rating", "time"])
    check_against_raw(cache, frame["user"], frame["item"], frame["time"])
    assert cache_digest(raw.parent.parent / "cache") == PINNED_DIGESTS["ml-100k/u.data"]


def test_ml_100k_validation(shared_data, converted, tmp_path):
    """--validation on the real file: each user's second-latest rating (pandas, by time then line) is held out;
    the test split and negatives are those of the cache without it."""
    raw, plain = converted(shared_data / "ml-100k" / "u.data", "ml-100k/u.data")
    convert_ok("--path", raw, "--output", tmp_path / "cache", "--validation")
    split = load_cache(tmp_path / "cache")
    assert split["meta"] == plain["meta"] | {"validation": True, "n_train": 99_057 - 943}
    frame = pd.read_csv(raw, sep="\t", header=None, names=["user", "item", "rating", "time"])
    frame["line"] = np.arange(len(frame))
    second_latest = frame.sort_values(["time", "line"]).groupby("user").nth(-2)
    check_validation_split(
        plain, split, dict(zip(second_latest["user"].astype(str), second_latest["item"].astype(str), strict=True))
    )


def read_ml_1m(path):
    return pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 6], names=["user", "item", "time"])


def test_ml_1m_partial(shared_data, converted):
    raw, cache = converted(shared_data / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat", "ml-1m/ratings.dat")
    meta = cache["meta"]
    assert meta["format"] == "ml-1m"
    assert (meta["n_users"], meta["n_items"], meta["n_train"], meta["n_test"]) == (2_999, 3_615, 484_651, 2_999)
    frame = read_ml_1m(raw)
    check_against_raw(cache, frame["user"], frame["item"], frame["time"])
    assert cache_digest(raw.parent.parent / "cache") == PINNED_DIGESTS["ml-1m/ratings.dat"]


def test_ml_1m_partial_with_ratings_of_4_or_more(shared_data, tmp_path):
    raw = tmp_path / "ratings.dat"
    shutil.copyfile(shared_data / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat", raw)
    convert_ok("--path", raw, "--output", tmp_path / "cache", "--rating_threshold", 4)
    cache = load_cache(tmp_path / "cache")
    assert cache["meta"]["rating_threshold"] == 4
    frame = pd.read_csv(raw, sep=":", header=None, usecols=[0, 2, 4, 6], names=["user", "item", "rating", "time"])
    frame = frame[frame["rating"] >= 4]
    frame = frame[frame.groupby("user")["user"].transform("size") >= 20]
    check_against_raw(cache, frame["user"], frame["item"], frame["time"])


def test_ml_1m_agrees_with_the_ncf_paper_test_file(shared_data, converted):
    """Where the latest rating is not tied, our test item is the NCF paper's (its ids equal ours)."""
    _, cache = converted(shared_data / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat", "ml-1m/ratings.dat")
    frame = read_ml_1m(shared_data / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat")
    n_users = cache["meta"]["n_users"]
    ncf = pd.read_csv(
        shared_data / "ncf-paper" / "ml-1m.test.rating", sep="\t", header=None, names=["user", "item", "r", "t"]
    )
    ncf = ncf[ncf["user"] < n_users]
    assert ncf["user"].tolist() == list(range(n_users))
    at_latest = frame["time"] == frame.groupby("user")["time"].transform("max")
    tied = (frame[at_latest].groupby("user").size() > 1).to_numpy()  # raw users 1.. -> dense 0.. in order
    assert (~tied).sum() == 2_999 - 1_268
    ours, theirs = cache["test"][:, 1], ncf["item"].to_numpy()
    assert np.array_equal(ours[~tied], theirs[~tied])
    # for tied users both picks are among the tied latest items (ours is the last line of them)
    latest_items = frame[at_latest].groupby("user")["item"].agg(list)
    item_index = {int(raw): dense for dense, raw in enumerate(cache["item_ids"])}
    for user in np.flatnonzero(tied):
        candidates = {item_index[i] for i in latest_items.iloc[user]}
        assert ours[user] == item_index[latest_items.iloc[user][-1]]
        assert theirs[user] in candidates
    # NCF's negatives of the untied users are never our training positives (same training sets)
    negatives = pd.read_csv(shared_data / "ncf-paper" / "ml-1m.test.negative", sep="\t", header=None).iloc[:n_users]
    ncf_negatives = negatives.iloc[:, 1:].to_numpy(dtype=np.int64)[~tied]
    # (ids >= 3,615 are items the full file has beyond our prefix: never in our training set)
    train_keys = cache["train"][:, 0] * 10_000 + cache["train"][:, 1]
    users = np.flatnonzero(~tied)[:, None]
    assert not np.isin(users * 10_000 + ncf_negatives, train_keys).any()


def test_ml_latest_small_crlf(shared_data):
    path = shared_data / "ml-latest-small" / "ratings.csv"
    assert convert.guess_format(path) == "ml-20m"
    users, items, times = read_columns(path, "ml-20m")
    assert len(users) == 100_836
    cache = build(users, items, times, 20, 100, 1)
    assert (len(cache["user_ids"]), len(cache["item_ids"]), len(cache["train"]), len(cache["test"])) == (
        610,
        9_724,
        100_226,
        610,
    )
    assert cache["user_ids"].tolist() == list(range(1, 611))  # the file is sorted by user
    assert cache["negatives"].shape == (610, 100)
