"""Convert a ratings file into the cached tensors that training, evaluation and inference read.

Pipeline (docs: README "Data preparation"):
  1. drop users with fewer than --min_ratings interactions;
  2. map raw user and item ids to dense 0-based ids in order of first appearance in the file;
  3. order each user's interactions by time, a later line winning a tie;
  4. drop repeated (user, item) pairs, keeping the earliest;
  5. hold out each user's latest interaction as the test positive, the rest is training;
  6. draw --valid_negative test negatives per user, uniformly (with replacement, as the reference)
     among the items that are not the user's training positives.

The cache directory holds train_ratings.pt [N_train, 2], test_ratings.pt [N_users, 2],
test_negatives.pt [N_users, valid_negative] (int64, user and item columns), user_ids.csv and
item_ids.csv (line k is the raw id of dense id k) and metadata.json. It is written to a temporary
directory and renamed into place, so an interrupted run never leaves a cache that loads.
"""

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from utils import CliError, run_main

FORMAT_VERSION = 1
FORMATS = ("ml-20m", "ml-1m", "ml-100k", "custom")
TRAIN_FILE = "train_ratings.pt"
TEST_FILE = "test_ratings.pt"
NEGATIVES_FILE = "test_negatives.pt"
USER_IDS_FILE = "user_ids.csv"
ITEM_IDS_FILE = "item_ids.csv"
METADATA_FILE = "metadata.json"
CACHE_FILES = (TRAIN_FILE, TEST_FILE, NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE, METADATA_FILE)

# How each format lays out its columns: delimiter, whether a header names them, and the
# (user, item, timestamp) column names or positions.
ML20M_COLUMNS = ("userId", "movieId", "timestamp")
CUSTOM_COLUMNS = ("user_id", "item_id", "timestamp")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", help="ratings file (ratings.csv, ratings.dat, u.data, a CSV); unused by --check")
    parser.add_argument("--output", required=True, help="cache directory to write")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto",) + FORMATS,
        help="input format; 'auto' guesses from the file name (ratings.csv, ratings.dat, u.data)",
    )
    parser.add_argument("--min_ratings", type=int, default=20, help="drop users with fewer interactions")
    parser.add_argument("--valid_negative", type=int, default=100, help="test negatives per user")
    parser.add_argument("--seed", type=int, default=1, help="seed of the test-negative draw")
    parser.add_argument(
        "--check", action="store_true", help="only check that --output holds a valid cache (exit 0) or not (exit 2)"
    )
    args = parser.parse_args()
    if args.path is None and not args.check:
        parser.error("the following arguments are required: --path")
    return args


# --- reading ----------------------------------------------------------------------------------


def guess_format(path):
    name = Path(path).name
    guesses = {"ratings.csv": "ml-20m", "ratings.dat": "ml-1m", "u.data": "ml-100k"}
    if name in guesses:
        return guesses[name]
    if name.endswith(".csv"):
        return "custom"
    raise CliError(f"cannot guess the format of {path}; pass --format ({', '.join(FORMATS)})")


def first_line(path):
    with open(path, "rb") as file:
        line = file.readline()
    return line.decode("utf-8-sig", errors="replace").rstrip("\r\n")


def layout(path, fmt):
    """(delimiter, has_header, column names or positions of user, item, timestamp, field count)."""
    if fmt == "ml-20m":
        return ",", True, ML20M_COLUMNS, None
    if fmt == "ml-1m":  # `::` read as ':' with empty fields between
        return ":", False, (0, 2, 6), 7
    if fmt == "ml-100k":
        return "\t", False, (0, 1, 3), 4
    header = [field.strip().lower() for field in first_line(path).split(",")]
    if "user_id" in header or "item_id" in header:
        return ",", True, CUSTOM_COLUMNS, None
    return ",", False, (0, 1, 2), None


def read_ratings(path, fmt):
    """Read (users, items, timestamps) as numpy arrays; ids stay as in the file (int or str)."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"ratings file {path} does not exist")
    if path.stat().st_size == 0 or not first_line(path).strip():
        raise CliError(f"ratings file {path} is empty")
    delimiter, has_header, columns, _ = layout(path, fmt)
    if has_header:
        header = [field.strip() for field in first_line(path).split(delimiter)]
        if fmt == "custom":
            header = [field.lower() for field in header]
        missing = [name for name in columns if name not in header]
        if missing:
            raise CliError(f"{path} has no column {', '.join(missing)} (its header is: {first_line(path)})")
        names = header
        include = list(columns)
    else:
        names = None
        include = [f"f{i}" for i in columns]
    id_type = pa.string() if fmt == "custom" else pa.int64()
    time_type = pa.float64() if fmt == "custom" else pa.int64()
    read_options = pacsv.ReadOptions(
        column_names=names, skip_rows=1 if has_header else 0, autogenerate_column_names=not has_header
    )
    convert_options = pacsv.ConvertOptions(
        include_columns=include,
        column_types={include[0]: id_type, include[1]: id_type, include[2]: time_type},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        table = pacsv.read_csv(
            path,
            read_options=read_options,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=convert_options,
        )
    except (pa.ArrowException, UnicodeDecodeError) as error:
        raise CliError(f"{path}: {diagnose(path, fmt) or error}") from None
    if table.num_rows == 0:
        raise CliError(f"{path} holds no ratings")
    users, items, times = (table.column(name) for name in include)
    if fmt == "custom":
        users, items = numeric_ids_if_possible(users), numeric_ids_if_possible(items)
    users, items, times = (column.to_numpy() for column in (users, items, times))
    if np.issubdtype(times.dtype, np.floating) and not np.isfinite(times).all():
        line = line_number(path, int(np.flatnonzero(~np.isfinite(times))[0]), has_header)
        raise CliError(f"{path}: line {line}: timestamp is not a finite number")
    for name, ids in (("user", users), ("item", items)):
        if ids.dtype.kind == "i" and ids.min() < 0:
            row = int(np.argmax(ids < 0))
            raise CliError(f"{path}: line {line_number(path, row, has_header)}: negative {name} id {ids[row]}")
    return users, items, times


def line_number(path, row, has_header):
    """The 1-based line of data row `row`, skipping the header and the empty lines the reader skips."""
    with open(path, "rb") as file:
        if has_header:
            file.readline()
        for number, line in enumerate(file, start=1 + has_header):
            if line.rstrip(b"\r\n"):
                if row == 0:
                    return number
                row -= 1
    return None


def numeric_ids_if_possible(column):
    """Custom ids stay strings unless every one of them is an integer."""
    try:
        return pc.cast(column, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column


def diagnose(path, fmt):
    """Find the first bad line of a file the fast reader rejected. Only runs on the error path."""
    delimiter, has_header, columns, n_fields = layout(path, fmt)
    integer = re.compile(r"\s*-?\d+\s*$")
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as file:
        header = file.readline() if has_header else None
        if header is not None:
            fields = [f.strip().lower() if fmt == "custom" else f.strip() for f in header.rstrip("\r\n").split(",")]
            n_fields = len(fields)
            columns = [fields.index(name) for name in columns]
        for number, line in enumerate(file, start=2 if has_header else 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(delimiter)
            if n_fields is None:
                n_fields = len(fields)
            if len(fields) != n_fields:
                shown = "::".join(fields[::2]) if fmt == "ml-1m" else line
                expected = (n_fields + 1) // 2 if fmt == "ml-1m" else n_fields
                got = (len(fields) + 1) // 2 if fmt == "ml-1m" else len(fields)
                return f"line {number}: expected {expected} fields, got {got}: {shown!r}"
            if len(fields) <= max(columns):
                return f"line {number}: expected at least {max(columns) + 1} fields, got {len(fields)}: {line!r}"
            user, item, timestamp = (fields[i] for i in columns)
            if fmt != "custom":
                for name, value in (("user id", user), ("item id", item)):
                    if not integer.match(value):
                        return f"line {number}: {name} {value!r} is not an integer"
            try:
                float(timestamp)
            except ValueError:
                return f"line {number}: timestamp {timestamp!r} is not a number"
            if fmt != "custom" and not integer.match(timestamp):
                return f"line {number}: timestamp {timestamp!r} is not an integer"
    return None


def sha256_of(path, result):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 23):
            digest.update(chunk)
    result.append(digest.hexdigest())


# --- processing -------------------------------------------------------------------------------


def bits(value):
    """Bits needed to hold 0..value."""
    return max(1, int(value).bit_length())


def factorize(ids):
    """Dense ids in order of first appearance, and the raw id of each dense id (as pandas.factorize)."""
    if ids.dtype.kind == "i" and ids.min() >= 0 and ids.max() < 2 * len(ids) + 2**20:
        # small non-negative integers (MovieLens ids): index by value, several times faster than hashing
        first_row = np.full(ids.max() + 1, len(ids))
        np.minimum.at(first_row, ids, np.arange(len(ids)))
        uniques = np.flatnonzero(first_row < len(ids))
        uniques = uniques[np.argsort(first_row[uniques])]
        dense = np.empty(len(first_row), np.int64)
        dense[uniques] = np.arange(len(uniques))
        return dense[ids], uniques
    codes, uniques = pd.factorize(ids)
    return codes.astype(np.int64), uniques


def filter_and_index(raw_users, raw_items, min_ratings):
    """Drop light users, then give users and items dense ids in order of first appearance."""
    user_codes, user_uniques = factorize(raw_users)
    kept_user = np.bincount(user_codes) >= min_ratings
    if not kept_user.any():
        raise CliError(f"no user has {min_ratings} or more ratings (--min_ratings); nothing to train on")
    keep = kept_user[user_codes]
    users = (np.cumsum(kept_user) - 1)[user_codes[keep]]
    items, item_uniques = factorize(raw_items[keep])
    return users, items, user_uniques[kept_user], item_uniques, keep


def time_order(timestamps):
    """A distinct int64 per row that increases with (timestamp, line number)."""
    n = len(timestamps)
    if timestamps.dtype.kind == "i":
        low = int(timestamps.min())
        if (int(timestamps.max()) - low + 1) * n < 2**62:
            return (timestamps - low) * n + np.arange(n)
    order = np.argsort(timestamps, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def sort_with_rows(keys, key_bits):
    """The keys sorted, and the row each came from (equal keys in row order)."""
    row_bits = bits(len(keys) - 1)
    if key_bits + row_bits <= 63:  # key and row in one int64: a plain sort is ~3x faster than argsort
        packed = np.sort((keys << row_bits) | np.arange(len(keys)))
        return packed >> row_bits, packed & ((1 << row_bits) - 1)
    order = np.argsort(keys, kind="stable")
    return keys[order], order


def split_leave_one_out(users, items, times, n_users, n_items):
    """Dedupe (keep the earliest) and hold out each user's latest interaction.

    Returns the training and the test (users, items), each sorted by user then item.
    """
    item_bits = bits(n_items - 1)
    pairs, rows = sort_with_rows((users << item_bits) | items, bits(n_users - 1) + item_bits)
    group_start = np.flatnonzero(np.r_[True, pairs[1:] != pairs[:-1]])
    pairs = pairs[group_start]
    first_time = np.minimum.reduceat(times[rows], group_start)
    pair_users = pairs >> item_bits
    user_start = np.r_[0, np.cumsum(np.bincount(pair_users, minlength=n_users))[:-1]]
    is_test = first_time == np.maximum.reduceat(first_time, user_start)[pair_users]
    item_mask = (1 << item_bits) - 1
    train, test = pairs[~is_test], pairs[is_test]
    return (train >> item_bits, train & item_mask), (test >> item_bits, test & item_mask)


def nth_free_items(pos_users, pos_items, n_users, n_items, ranks):
    """For every user u and rank r in ranks[u], the r-th item (0-based) that is not one of u's positives.

    The positive pairs must be sorted by user then item. With a user's positives sorted as
    p_0 < p_1 < ..., its r-th free item is r + #{j : p_j - j <= r}, found for every rank at once
    by one searchsorted on the keys user * n_items + (p_j - j), which are non-decreasing.
    """
    starts = np.r_[0, np.cumsum(np.bincount(pos_users, minlength=n_users))[:-1]]
    rank_in_user = np.arange(len(pos_items)) - starts[pos_users]
    shifted = pos_users * n_items + (pos_items - rank_in_user)
    queries = np.arange(n_users)[:, None] * n_items + ranks
    return ranks + np.searchsorted(shifted, queries, side="right") - starts[:, None]


def sample_test_negatives(train_users, train_items, n_users, n_items, per_user, seed):
    """Draw per_user items per user, uniformly with replacement among items not in its training set.

    No rejection loop: draw ranks among each user's free items, then map them to items. The
    training pairs must be sorted by user then item. Each user's negatives come sorted.
    """
    n_free = n_items - np.bincount(train_users, minlength=n_users)  # >= 1: the test item is free
    rng = np.random.default_rng(seed)
    # sorted ranks make the searchsorted queries increasing, which it answers about twice as fast
    ranks = np.sort(rng.integers(0, n_free[:, None], size=(n_users, per_user)), axis=1)
    return nth_free_items(train_users, train_items, n_users, n_items, ranks)


def build(users_raw, items_raw, times_raw, min_ratings, valid_negative, seed):
    users, items, user_ids, item_ids, keep = filter_and_index(users_raw, items_raw, min_ratings)
    n_users, n_items = len(user_ids), len(item_ids)
    if valid_negative >= n_items:
        raise CliError(f"--valid_negative {valid_negative} must be smaller than the number of items ({n_items})")
    train, test = split_leave_one_out(users, items, time_order(times_raw[keep]), n_users, n_items)
    negatives = sample_test_negatives(*train, n_users, n_items, valid_negative, seed)
    return {
        "train": np.stack(train, axis=1),
        "test": np.stack(test, axis=1),
        "negatives": negatives,
        "user_ids": user_ids,
        "item_ids": item_ids,
    }


# --- the cache on disk ------------------------------------------------------------------------


def read_metadata(cache_dir):
    """The metadata of a complete cache of this version, or a CliError that says what is wrong."""
    cache_dir = Path(cache_dir)
    hint = "run prepare_dataset.sh or convert.py to make it"
    if not (cache_dir / METADATA_FILE).is_file():
        raise CliError(f"{cache_dir} is not a data cache (no {METADATA_FILE}); {hint}")
    try:
        meta = json.loads((cache_dir / METADATA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CliError(f"{cache_dir / METADATA_FILE} is corrupt; {hint}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CliError(
            f"{cache_dir} was written by another version of convert.py (cache format {found}, "
            f"expected {FORMAT_VERSION}); {hint} again"
        )
    missing = [name for name in CACHE_FILES if not (cache_dir / name).is_file()]
    if missing:
        raise CliError(f"{cache_dir} is incomplete (missing {', '.join(missing)}); {hint} again")
    return meta


def write_cache(output, cache, meta):
    """Write into a temporary sibling directory, then swap it in: never a half-written cache."""
    import torch  # loaded in the background by main(); this waits for it

    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / METADATA_FILE).exists())):
        raise CliError(f"{output} exists and is not a data cache; choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    except OSError as error:
        raise CliError(f"cannot write to {output.parent}: {error.strerror}") from None
    try:
        umask = os.umask(0)  # the cache gets the usual permissions, not mkdtemp's 0o700
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        torch.save(torch.from_numpy(cache["train"]), tmp / TRAIN_FILE)
        torch.save(torch.from_numpy(cache["test"]), tmp / TEST_FILE)
        torch.save(torch.from_numpy(cache["negatives"]), tmp / NEGATIVES_FILE)
        pd.Series(cache["user_ids"], name="raw_id").to_csv(tmp / USER_IDS_FILE, index=False)
        pd.Series(cache["item_ids"], name="raw_id").to_csv(tmp / ITEM_IDS_FILE, index=False)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
            os.replace(output, old / output.name)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CliError(f"cannot write the cache to {output}: {error.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main():
    args = parse_args()
    if args.check:
        read_metadata(args.output)
        print(f"{args.output} holds a valid cache")
        return
    if args.min_ratings < 1:
        raise CliError("--min_ratings must be at least 1")
    if args.valid_negative < 1:
        raise CliError("--valid_negative must be at least 1")
    fmt = guess_format(args.path) if args.format == "auto" else args.format
    digest = []
    hasher = threading.Thread(target=sha256_of, args=(args.path, digest))
    if Path(args.path).is_file():
        hasher.start()
    # importing torch takes about a second; only the final write needs it, so overlap it with parsing
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    users, items, times = read_ratings(args.path, fmt)
    cache = build(users, items, times, args.min_ratings, args.valid_negative, args.seed)
    hasher.join()
    meta = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "source": Path(args.path).name,
        "source_sha256": digest[0],
        "n_ratings_read": len(users),
        "n_users": len(cache["user_ids"]),
        "n_items": len(cache["item_ids"]),
        "n_train": len(cache["train"]),
        "n_test": len(cache["test"]),
        "min_ratings": args.min_ratings,
        "valid_negative": args.valid_negative,
        "seed": args.seed,
        "user_id_type": "int" if cache["user_ids"].dtype.kind == "i" else "str",
        "item_id_type": "int" if cache["item_ids"].dtype.kind == "i" else "str",
    }
    write_cache(args.output, cache, meta)
    print(
        f"{args.output}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{meta['n_train']:,} training and {meta['n_test']:,} test ratings"
    )


if __name__ == "__main__":
    run_main(main)
