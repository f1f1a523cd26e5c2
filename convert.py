"""Convert a ratings file into the cached tensors that training, evaluation and inference read.

Pipeline (docs: README "Data preparation"):
  0. with --rating_threshold, drop the rows rated below it;
  1. drop users with fewer than --min_ratings interactions;
  2. map raw user and item ids to dense 0-based ids in order of first appearance in the file;
  3. order each user's interactions by time, a later line winning a tie;
  4. drop repeated (user, item) pairs, keeping the earliest;
  5. hold out each user's latest interaction as the test positive, the rest is training;
  6. draw --valid_negative test negatives per user, uniformly (with replacement, as the reference)
     among the items that are not the user's training positives;
  7. with --validation, also hold out each user's second-latest interaction as its validation
     positive, with negatives drawn as in 6 among the items that are neither the user's training
     positives nor its test item (steps 5 and 6 are what they are without --validation).

The cache directory holds train_ratings.pt [N_train, 2], test_ratings.pt [N_users, 2],
test_negatives.pt [N_users, valid_negative] (int32, user and item columns), user_ids.csv and
item_ids.csv (line k is the raw id of dense id k) and metadata.json; with --validation also
valid_ratings.pt [N_users, 2] and valid_negatives.pt [N_users, valid_negative]; the tensors are files of
torch.save. The cache is written to a temporary directory beside --output, then swapped in by two renames:
an interrupted run never leaves a half-written cache at --output. One killed between the two renames leaves
none there; the next run of convert.py (--check included) moves the old cache back, and every run removes
the temporary directories that killed runs left.

--format ncf-paper reads the split the NCF paper published instead (NAME.train.rating, NAME.test.rating,
NAME.test.negative side by side) and keeps its ids, test items and negatives as they are.
"""

import argparse
import contextlib
import csv
import fcntl
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# numpy advises the kernel to back large arrays with huge pages; on a VM whose kernel honours that advice
# (transparent_hugepage "madvise"), each of the pipeline's large temporaries faults in and zeroes whole huge
# pages: measured as system time that varied threefold from run to run (benchmarks/convert_bench.py).
# Read by numpy at import; a user's own setting wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402

from utils import CliError, run_main  # noqa: E402

FORMAT_VERSION = 2  # 2: int32 tensors (1: int64)
SORT_BLOCK_ROWS = 4096  # rows per block when sorting a file grouped by user
CHUNK_ROWS = 1 << 20  # rows per chunk of the steps that work chunk by chunk
SEARCH_BLOCK_USERS = 1024  # users per block when mapping ranks to free items
PACKED_BITS = 63  # key << row_bits | row must fit in the value bits of an int64
DRAW_BLOCK_USERS = 4096  # users per random stream of the test negatives (part of what a seed means)
FORMATS = ("ml-20m", "ml-1m", "ml-100k", "custom", "ncf-paper")
TRAIN_FILE = "train_ratings.pt"
TEST_FILE = "test_ratings.pt"
NEGATIVES_FILE = "test_negatives.pt"
USER_IDS_FILE = "user_ids.csv"
ITEM_IDS_FILE = "item_ids.csv"
METADATA_FILE = "metadata.json"
CACHE_FILES = (TRAIN_FILE, TEST_FILE, NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE, METADATA_FILE)
VALID_FILE = "valid_ratings.pt"
VALID_NEGATIVES_FILE = "valid_negatives.pt"
NCF_PAPER_SUFFIXES = (".train.rating", ".test.rating", ".test.negative")  # the NCF paper's split of a dataset

# How each format lays out its columns: delimiter, whether a header names them, and the
# (user, item, timestamp) column names or positions.
ML20M_COLUMNS = ("userId", "movieId", "timestamp")
CUSTOM_COLUMNS = ("user_id", "item_id", "timestamp")
NUMPY_TYPES = {pa.int32(): np.dtype(np.int32), pa.int64(): np.dtype(np.int64), pa.float64(): np.dtype(np.float64)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--path", help="ratings file (ratings.csv, ratings.dat, u.data, a CSV, NAME.train.rating); unused by --check"
    )
    parser.add_argument("--output", required=True, help="cache directory to write")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto",) + FORMATS,
        help="input format; 'auto' guesses from the file name (ratings.csv, ratings.dat, u.data, *.train.rating)",
    )
    parser.add_argument(
        "--rating_threshold",
        type=float,
        help="keep only the rows whose rating is at least this (before --min_ratings); default: every row",
    )
    # no defaults in the parser: --format ncf-paper refuses both (its users and negatives are the paper's)
    parser.add_argument("--min_ratings", type=int, help="drop users with fewer interactions (default 20)")
    parser.add_argument("--valid_negative", type=int, help="test negatives per user (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the test-negative draw")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="also hold out each user's second-latest interaction (valid_ratings.pt, valid_negatives.pt)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that --output holds a valid cache (exit 0) or not (exit 2), after restoring one that an "
        "interrupted run had moved aside",
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
    if name.endswith(NCF_PAPER_SUFFIXES[0]):
        return "ncf-paper"
    raise CliError(f"cannot guess the format of {path}; pass --format ({', '.join(FORMATS)})")


def first_line(path):
    with open(path, "rb") as file:
        line = file.readline()
    return line.decode("utf-8-sig", errors="replace").rstrip("\r\n")


def layout(path, fmt, with_rating=False):
    """(delimiter, has_header, column names or positions of user, item, timestamp (and rating when
    with_rating), field count)."""
    if fmt == "ml-20m":
        return ",", True, ML20M_COLUMNS + ("rating",) * with_rating, None
    if fmt == "ml-1m":  # `::` read as ':' with empty fields between
        return ":", False, (0, 2, 6) + (4,) * with_rating, 7
    if fmt in ("ml-100k", "ncf-paper"):  # the NCF paper's NAME.train.rating and NAME.test.rating too
        return "\t", False, (0, 1, 3) + (2,) * with_rating, 4
    header = [field.strip().lower() for field in first_line(path).split(",")]
    if "user_id" in header or "item_id" in header:
        return ",", True, CUSTOM_COLUMNS + ("rating",) * with_rating, None
    if with_rating:
        raise CliError(f"--rating_threshold needs a rating column: {path} has no header line naming one")
    return ",", False, (0, 1, 2), None


def read_ratings(path, fmt, with_rating=False):
    """Read the user, item and timestamp columns (and with_rating, the ratings as floats), each as a list
    of numpy arrays (the reader's blocks, not copied into one array); ids stay as in the file (int or str)."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"ratings file {path} does not exist")
    if path.stat().st_size == 0 or not first_line(path).strip():
        raise CliError(f"ratings file {path} is empty")
    delimiter, has_header, columns, _ = layout(path, fmt, with_rating)
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
    read_options = pacsv.ReadOptions(
        column_names=names, skip_rows=1 if has_header else 0, autogenerate_column_names=not has_header
    )
    # 32-bit columns halve the memory to fill (MovieLens ids and timestamps fit in them);
    # a file with larger numbers is read again with 64 bits
    number_types = [pa.float64()] if fmt == "custom" else [pa.int32(), pa.int64()]
    for number_type in number_types:
        id_type = pa.string() if fmt == "custom" else number_type
        types = {include[0]: id_type, include[1]: id_type, include[2]: number_type}
        convert_options = pacsv.ConvertOptions(
            include_columns=include,
            column_types=types | ({include[3]: pa.float64()} if with_rating else {}),
            null_values=[],  # an empty field is an error (and no column has a validity bitmap to read)
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
            break
        except (pa.ArrowException, UnicodeDecodeError) as error:
            if number_type == number_types[-1]:
                raise CliError(f"{path}: {diagnose(path, fmt, with_rating) or error}") from None
    if table.num_rows == 0:
        raise CliError(f"{path} holds no ratings")
    users, items, times, *ratings = (table.column(name) for name in include)
    if fmt == "custom":
        users, items = numeric_ids_if_possible(users), numeric_ids_if_possible(items)
        for name, ids in (("user", users), ("item", items)):
            blank = first_blank(ids) if pa.types.is_string(ids.type) else None
            if blank is not None:
                raise CliError(f"{path}: line {line_number(path, blank, has_header)}: empty {name} id")
    users, items, times, *ratings = (
        [to_numpy(chunk) for chunk in column.chunks if len(chunk)] for column in (users, items, times, *ratings)
    )
    if times[0].dtype.kind == "f":
        bad = rows_where(times, lambda chunk: ~np.isfinite(chunk))
        if bad is not None:
            raise CliError(f"{path}: line {line_number(path, bad, has_header)}: timestamp is not a finite number")
    for name, ids in (("user", users), ("item", items)):
        bad = rows_where(ids, lambda chunk: chunk < 0) if ids[0].dtype.kind == "i" else None
        if bad is not None:
            value = np.concatenate(ids)[bad]
            raise CliError(f"{path}: line {line_number(path, bad, has_header)}: negative {name} id {value}")
    if with_rating:
        bad = rows_where(ratings[0], lambda chunk: ~np.isfinite(chunk))
        if bad is not None:
            raise CliError(f"{path}: line {line_number(path, bad, has_header)}: rating is not a finite number")
    # the reader's buffers are free now; hand them back (arrow's allocator keeps freed memory) so that
    # the next allocations reuse warm pages: fresh memory is slow to get on some machines
    pa.default_memory_pool().release_unused()
    return users, items, times, *ratings


def rated_at_least(threshold, users, items, times, ratings):
    """The users, items and times of the rows rated threshold or more (lists of chunks, as read)."""
    keeps = [chunk >= threshold for chunk in ratings]
    users, items, times = (
        [chunk[keep] for chunk, keep in zip(column, keeps, strict=True) if keep.any()]
        for column in (users, items, times)
    )
    if not users:
        raise CliError(
            f"no rating is at least {threshold:g} (--rating_threshold); the highest is {max(map(np.max, ratings)):g}"
        )
    return users, items, times


def to_numpy(chunk):
    """An arrow array as a numpy array; numbers are viewed in place, as arrow's own to_numpy would but
    without the import of pandas that it does first (a fifth of a second)."""
    dtype = NUMPY_TYPES.get(chunk.type)
    if dtype is None:
        return chunk.to_numpy(zero_copy_only=False)
    return np.frombuffer(chunk.buffers()[1], dtype, len(chunk), chunk.offset * dtype.itemsize)


def chunk_starts(chunks):
    """The row number of each chunk's first row."""
    return np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]])


def rows_where(chunks, condition):
    """The first row whose chunk element meets condition(chunk), or None."""
    for start, chunk in zip(chunk_starts(chunks), chunks, strict=True):
        hits = np.flatnonzero(condition(chunk))
        if len(hits):
            return int(start + hits[0])
    return None


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


def first_blank(strings):
    """The first row of a string column that is empty or only spaces, or None."""
    row = pc.index(pc.equal(pc.utf8_trim_whitespace(strings), ""), True).as_py()
    return None if row < 0 else row


def diagnose(path, fmt, with_rating=False):
    """Find the first bad line of a file the fast reader rejected. Only runs on the error path."""
    delimiter, has_header, columns, n_fields = layout(path, fmt, with_rating)
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
            user, item, timestamp, *rating = (fields[i] for i in columns)
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
            for value in rating:  # with --rating_threshold
                try:
                    float(value)
                except ValueError:
                    return f"line {number}: rating {value!r} is not a number"
    return None


def sha256_of(paths):
    """The SHA-256 of the files' bytes one after the other (what `cat PATHS | sha256sum` prints)."""
    digest, buffer = hashlib.sha256(), memoryview(bytearray(1 << 20))  # one buffer: no allocation per read
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as file:
                while size := file.readinto(buffer):
                    digest.update(buffer[:size])
        except OSError as error:
            raise CliError(f"cannot read {path} to hash it: {error.strerror}") from None
    return digest.hexdigest()


def ncf_paper_paths(path):
    """NAME.train.rating and, beside it, NAME.test.rating and NAME.test.negative."""
    path = Path(path)
    train_suffix = NCF_PAPER_SUFFIXES[0]
    if not path.name.endswith(train_suffix) or path.name == train_suffix:
        raise CliError(f"--format ncf-paper reads NAME{train_suffix} (its NAME.test.* files beside it), not {path}")
    paths = [path.with_name(path.name[: -len(train_suffix)] + suffix) for suffix in NCF_PAPER_SUFFIXES]
    for sibling in paths:
        if not sibling.is_file():
            names = ", ".join(p.name for p in paths)
            raise CliError(f"{sibling} does not exist (the NCF paper's split is three files side by side: {names})")
    return paths


def read_ncf_paper(train_path, test_path, negatives_path):
    """The paper's training columns (user, item, timestamp), each user's test item (user u on line u + 1)
    and its negatives [n_users, per_user], checked against each other."""
    users, items, times = (np.concatenate(column) for column in read_ratings(train_path, "ncf-paper"))
    test_users, test_items, _ = (np.concatenate(column) for column in read_ratings(test_path, "ncf-paper"))
    misplaced = np.flatnonzero(test_users != np.arange(len(test_users)))
    if len(misplaced):
        row = misplaced[0]
        raise CliError(
            f"{test_path}: line {line_number(test_path, row, False)}: user {test_users[row]} where user {row} was "
            "expected (one line per user 0, 1, 2, ... in order)"
        )
    strangers = np.flatnonzero(users >= len(test_users))
    if len(strangers):
        row = strangers[0]
        raise CliError(
            f"{train_path}: line {line_number(train_path, row, False)}: user {users[row]} has no line in "
            f"{test_path.name} (users 0 to {len(test_users) - 1})"
        )
    return users, items, times, test_items, read_ncf_negatives(negatives_path, test_items, test_path.name)


def read_ncf_negatives(path, test_items, test_name):
    """[n_users, per_user] int64 from NAME.test.negative: line u + 1 is `(u,test item)`, then its negatives,
    tab-separated, as many on every line."""
    pair = re.compile(r"\((\d+),(\d+)\)")
    rows, line_numbers = [], []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, *negatives = line.split("\t")
            user = len(rows)
            match = pair.fullmatch(first)
            if not match:
                raise CliError(f"{path}: line {number}: expected '(user,item)' first, got {first!r}")
            if user == len(test_items):
                raise CliError(f"{path}: line {number}: more lines than {test_name} has users ({len(test_items)})")
            if (int(match[1]), int(match[2])) != (user, test_items[user]):
                raise CliError(
                    f"{path}: line {number}: {first} disagrees with {test_name}, where user {user}'s test item is "
                    f"{test_items[user]}"
                )
            if not negatives or (rows and len(negatives) != len(rows[0])):
                expected = f"as many as line {line_numbers[0]} ({len(rows[0])})" if rows else "at least one"
                raise CliError(f"{path}: line {number}: {len(negatives)} negatives, expected {expected}")
            try:
                rows.append([int(item) for item in negatives])
            except ValueError:
                bad = next((item for item in negatives if not re.fullmatch(r"\s*-?\d+\s*", item)), "")
                raise CliError(f"{path}: line {number}: negative item {bad!r} is not an integer") from None
            line_numbers.append(number)
    if len(rows) < len(test_items):
        raise CliError(f"{path} has {len(rows)} lines for the {len(test_items)} users of {test_name}")
    negatives = np.array(rows, dtype=np.int64)
    below_zero = np.flatnonzero((negatives < 0).any(axis=1))
    if len(below_zero):
        raise CliError(f"{path}: line {line_numbers[below_zero[0]]}: negative item id {negatives[below_zero[0]].min()}")
    return negatives


# --- processing -------------------------------------------------------------------------------


def in_parallel(function, n):
    """Call function(first, last) on equal slices of range(n), one thread per core: numpy's sorts and
    searches release the GIL, so the slices run at the same time."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bounds = np.linspace(0, n, workers + 1).astype(np.int64)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(function, bounds[:-1], bounds[1:]))  # list(): re-raise what a slice raised


def bits(value):
    """Bits needed to hold 0..value."""
    return max(1, int(value).bit_length())


def small_ids(chunks):
    """The column as ids that can index a table, the table's size, and the raw id of each id (None: the
    ids are the raw ids). MovieLens ids are small non-negative integers and index tables as they are;
    other ids (strings, large numbers) are replaced by their pandas.factorize codes."""
    n_rows = sum(len(chunk) for chunk in chunks)
    if all(chunk.dtype.kind == "i" for chunk in chunks):
        low, high = min(chunk.min() for chunk in chunks), max(chunk.max() for chunk in chunks)
        if low >= 0 and high < 2 * n_rows + 2**20:
            return chunks, int(high) + 1, None
    import pandas as pd  # only for ids that need hashing: importing it costs a fifth of a second

    codes, raw_ids = pd.factorize(np.concatenate(chunks))
    return np.split(codes.astype(np.int32), chunk_starts(chunks)[1:]), len(raw_ids), raw_ids


def first_appearances(chunks, size):
    """The ids of a column (a list of chunks of ids below size) in order of first appearance."""
    n_rows = sum(len(chunk) for chunk in chunks)
    first_row = np.full(size, n_rows)
    for start, chunk in zip(chunk_starts(chunks), chunks, strict=True):
        np.minimum.at(first_row, chunk, np.arange(start, start + len(chunk)))
    present = np.flatnonzero(first_row < n_rows)
    return present[np.argsort(first_row[present])]


def row_counts(chunks, size):
    """How many rows hold each id of a column (a list of chunks of ids below size)."""
    counts = np.zeros(size, np.int64)
    for chunk in chunks:
        np.add.at(counts, chunk, 1)
    return counts


def dense_table(ids, size):
    """table[id] = its position in ids, -1 for the ids not in it."""
    table = np.full(size, -1, np.int64)
    table[ids] = np.arange(len(ids))
    return table


def row_keys(users, items, user_table, item_table, item_bits, out=None):
    """user << item_bits | item (dense ids) of every row, in file order (in out, when given)."""
    starts = np.r_[chunk_starts(users), sum(len(chunk) for chunk in users)]
    keys = np.empty(starts[-1], np.int64) if out is None else out

    def fill(first, last):  # chunk by chunk, each in the cache
        for index in range(first, last):
            chunk_keys = keys[starts[index] : starts[index + 1]]
            np.take(user_table, users[index], out=chunk_keys)
            chunk_keys <<= item_bits
            chunk_keys |= item_table[items[index]]

    in_parallel(fill, len(users))
    return keys


def grouped_by_user(keys, item_bits):
    """Whether each user's rows come together: with ids in order of first appearance, users never decrease."""
    for start in range(0, len(keys), CHUNK_ROWS):  # in chunks: no temporary as long as the file
        users = keys[start : start + CHUNK_ROWS + 1] >> item_bits
        if (users[1:] < users[:-1]).any():
            return False
    return True


def sort_pair_keys(keys, item_bits):
    """Sort keys (user << item_bits | item) in place."""
    if not grouped_by_user(keys, item_bits):
        keys.sort()
        return
    # sorting blocks of whole users, each small enough for the cache, is several times faster than one
    # sort of everything; a user's first row is found by searchsorted because all keys of the users
    # before it are smaller and all keys from it on are not
    user_bases = (keys[::SORT_BLOCK_ROWS] >> item_bits) << item_bits
    bounds = np.r_[np.unique(np.searchsorted(keys, user_bases)), len(keys)]

    def sort_blocks(first, last):
        for start, end in zip(bounds[first:last], bounds[first + 1 : last + 1], strict=True):
            block = keys[start:end]
            first_user, last_user = int(keys[start]) >> item_bits, int(keys[end - 1]) >> item_bits
            low = first_user << item_bits
            if (last_user + 1 - first_user) << item_bits <= 2**31:
                # a block's keys less its first user's fit in 31 bits: int32 sorts ~1.7x faster
                relative = (block - low).astype(np.int32)
                relative.sort()
                block[:] = relative
                block += low
            else:
                block.sort()

    in_parallel(sort_blocks, len(bounds) - 1)


def latest_rows(keys, times, n_users, item_bits, passed_over=None):
    """Each user's row with the largest timestamp, the later line winning a tie (-1: the user has no row).

    keys: user << item_bits | item of every row in file order; times: their timestamps, a list of chunks;
    passed_over: a row per user to leave out (its latest, to find its second-latest), or None.
    """
    low = min(chunk.min() for chunk in times if len(chunk))
    latest = np.full(n_users, low)
    for start, chunk in zip(chunk_starts(times), times, strict=True):
        users = keys[start : start + len(chunk)] >> item_bits
        if passed_over is not None:  # at the earliest time here; the candidates below leave them out
            chunk = np.where(passed_over[users] == np.arange(start, start + len(chunk)), low, chunk)
        np.maximum.at(latest, users, chunk)
    last = np.full(n_users, -1)
    for start, chunk in zip(chunk_starts(times), times, strict=True):
        users = keys[start : start + len(chunk)] >> item_bits
        at_latest = chunk == latest[users]
        if passed_over is not None:
            at_latest &= passed_over[users] != np.arange(start, start + len(chunk))
        candidates = np.flatnonzero(at_latest)
        np.maximum.at(last, users[candidates], start + candidates)
    return last


def rows_in_key_order(file_keys, item_bits):
    """Every row ordered by its key, the rows of a key in file order: a stable argsort of file_keys.

    When the row numbers fit beside the keys in 64 bits, file_keys (a sort's own input, overwritten)
    is sorted as key << row_bits | row, blocks of whole users at a time when the file is grouped by user
    (sort_pair_keys): several times faster than an argsort, and done in file_keys' memory.
    """
    row_bits = bits(len(file_keys) - 1)
    if int(file_keys.max()).bit_length() + row_bits > PACKED_BITS:
        return np.argsort(file_keys, kind="stable")

    def pack(first, last):
        for start in range(first, last, CHUNK_ROWS):
            chunk = file_keys[start : min(start + CHUNK_ROWS, last)]
            chunk <<= row_bits
            chunk |= np.arange(start, start + len(chunk))

    in_parallel(pack, len(file_keys))
    sort_pair_keys(file_keys, item_bits + row_bits)
    file_keys &= (1 << row_bits) - 1
    return file_keys


def earliest_of_each_pair(rows, times, pair_bounds):
    """Each pair's earliest row and its timestamp: the smallest timestamp, ties to the earlier line.

    rows: every row in key order, a key's rows in file order (rows_in_key_order); times: the rows'
    timestamps, a list of chunks; pair_bounds: where each pair's rows start in rows, then len(rows).
    """
    times = np.concatenate(times)
    row_bits = bits(len(rows) - 1)
    if times.dtype.kind == "i" and bits(int(times.max()) - int(times.min())) + row_bits <= PACKED_BITS:
        order, low = times, int(times.min())
    else:  # float timestamps, or too far apart to fit beside the row numbers: their ranks
        order, low = np.unique(times, return_inverse=True)[1].reshape(-1), 0
    n_pairs = len(pair_bounds) - 1
    earliest_row = np.empty(n_pairs, np.int64)
    # chunks of whole pairs, so that the temporaries stay small
    bounds = np.unique(np.r_[np.searchsorted(pair_bounds[:-1], np.arange(0, len(rows), CHUNK_ROWS)), n_pairs])

    def find(first, last):
        for low_pair, high_pair in zip(bounds[first:last], bounds[first + 1 : last + 1], strict=True):
            start, end = pair_bounds[low_pair], pair_bounds[high_pair]
            # time << row_bits | row: one minimum per pair finds the earliest time and, of its rows, the first
            packed = order[rows[start:end]].astype(np.int64)
            packed -= low
            packed <<= row_bits
            packed |= rows[start:end]
            earliest = np.minimum.reduceat(packed, pair_bounds[low_pair:high_pair] - start)
            earliest_row[low_pair:high_pair] = earliest & ((1 << row_bits) - 1)

    in_parallel(find, len(bounds) - 1)
    return earliest_row, times[earliest_row]


def latest_pairs(pairs, rows, times, item_bits):
    """Each user's pair with the largest timestamp, the later line winning a tie.

    pairs: the distinct keys, sorted (every user has one); rows, times: each pair's row and timestamp.
    Returns the pairs' indices, in user order.
    """
    users = pairs >> item_bits
    user_starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    candidates = np.flatnonzero(times == np.maximum.reduceat(times, user_starts)[users])
    last_row = np.full(len(user_starts), -1)
    np.maximum.at(last_row, users[candidates], rows[candidates])
    return candidates[rows[candidates] == last_row[users[candidates]]]


def split_leave_one_out(keys, times, n_users, item_bits, keys_in_file_order, validation=False):
    """Dedupe (keep the earliest) and hold out each user's latest interaction.

    keys: user << item_bits | item of every row in file order, sorted here in place; times: the rows'
    timestamps, a list of chunks; keys_in_file_order(out): the keys made again into out, asked only when
    pairs repeat. Returns the training keys (sorted, in keys' memory), each user's test key and, with
    validation, each user's second-latest key (still among the training keys; else None). A user with a
    single pair gets no or a meaningless validation key: the caller refuses such users.
    """
    latest = latest_rows(keys, times, n_users, item_bits)
    test_keys = keys[latest]
    valid_keys = keys[latest_rows(keys, times, n_users, item_bits, latest)] if validation else None
    sort_pair_keys(keys, item_bits)
    repeated = keys[1:] == keys[:-1]
    if repeated.any():
        pair_bounds = np.flatnonzero(np.r_[True, ~repeated, True])
        pairs = keys[pair_bounds[:-1]]
        # keys' memory, warm and as large as the file, takes the rows in key order
        rows = rows_in_key_order(keys_in_file_order(out=keys), item_bits)
        rows, earliest_times = earliest_of_each_pair(rows, times, pair_bounds)
        keys = pairs
        latest = latest_pairs(keys, rows, earliest_times, item_bits)
        test_keys = keys[latest]
        if validation:  # the latest of each user's other pairs
            rest = np.delete(np.arange(len(keys)), latest)
            valid_keys = keys[rest[latest_pairs(keys[rest], rows[rest], earliest_times[rest], item_bits)]]
    return delete_in_place(keys, np.searchsorted(keys, test_keys)), test_keys, valid_keys


def delete_in_place(array, positions):
    """array without the entries at the sorted positions, moved to the front of its own memory
    (a copy would cost as much again: fresh memory is slow to fill on some machines)."""
    kept = 0
    for start in range(0, len(array), CHUNK_ROWS):
        chunk = array[start : start + CHUNK_ROWS]
        survives = np.ones(len(chunk), dtype=bool)
        first, last = np.searchsorted(positions, [start, start + len(chunk)])
        survives[positions[first:last] - start] = False
        survivors = chunk[survives]  # a copy, made before the write, which never passes this chunk's start
        array[kept : kept + len(survivors)] = survivors
        kept += len(survivors)
    return array[:kept]


def pairs_in_place(keys, item_bits):
    """keys (user << item_bits | item, int64) as an int32 [N, 2] array of (user, item) in their own memory."""
    pairs = keys.view(np.int32).reshape(-1, 2)

    def split(first, last):  # each key turns into the pair in its own 8 bytes: slices are independent
        for start in range(first, last, CHUNK_ROWS):
            chunk = keys[start : min(start + CHUNK_ROWS, last)]
            users, items = chunk >> item_bits, chunk & ((1 << item_bits) - 1)  # both before the chunk is overwritten
            pairs[start : start + len(chunk), 0] = users
            pairs[start : start + len(chunk), 1] = items

    in_parallel(split, len(keys))
    return pairs


def user_starts(keys, stride, n_users):
    """[n_users + 1]: where each user's keys (user * stride + item, sorted) start, then their end."""
    return np.searchsorted(keys, np.arange(n_users + 1) * stride)


def nth_free_items(keys, starts, stride, ranks):
    """Replace every rank r in ranks[u] by the r-th item (0-based) that is not one of user u's positives.

    keys are the positives as user * stride + item (stride >= the number of items), sorted, and starts
    where each user's keys start (user_starts). With a user's positives sorted as p_0 < p_1 < ..., its
    r-th free item is r + #{j : p_j - j <= r}, found for many ranks at once by searchsorted on the keys
    u * stride + (p_j - j), which are non-decreasing. Returns ranks, overwritten: no second array
    as large to fill.
    """

    def search(first, last):
        # a block of users at a time, so that the block's keys stay in the cache
        for low in range(first, last, SEARCH_BLOCK_USERS):
            high = min(low + SEARCH_BLOCK_USERS, last)
            block_starts = starts[low : high + 1] - starts[low]
            rank_in_user = np.arange(block_starts[-1]) - np.repeat(block_starts[:-1], np.diff(block_starts))
            shifted = keys[starts[low] : starts[high]] - rank_in_user
            queries = ranks[low:high] + (np.arange(low, high) * stride)[:, None]
            # the count of shifted keys <= a query takes in the block's earlier users: subtract them
            ranks[low:high] += np.searchsorted(shifted, queries, side="right") - block_starts[:-1, None]

    in_parallel(search, len(ranks))
    return ranks


def sample_test_negatives(keys, stride, n_users, n_items, per_user, seed):
    """Draw per_user items per user, uniformly with replacement among items not in its training set.

    keys: the training pairs as user * stride + item, sorted. No rejection loop: draw ranks among
    each user's free items, then map them to items. Each user's negatives come sorted.
    """
    starts = user_starts(keys, stride, n_users)
    highs = n_items - np.diff(starts)
    ranks = np.empty((n_users, per_user), np.int32)
    streams = np.random.SeedSequence(seed).spawn(-(-n_users // DRAW_BLOCK_USERS))

    def draw(first, last):
        # each block of users from its own stream of the seed: the same draw on any number of cores
        for block in range(first, last):
            low, high = block * DRAW_BLOCK_USERS, min((block + 1) * DRAW_BLOCK_USERS, n_users)
            rng = np.random.default_rng(streams[block])
            ranks[low:high] = rng.integers(0, highs[low:high, None], size=(high - low, per_user), dtype=np.int32)
            ranks[low:high].sort(axis=1)  # sorted ranks make the searches increasing: about twice as fast

    in_parallel(draw, len(streams))
    return nth_free_items(keys, starts, stride, ranks)


def split_seed(seed, split):
    """The entropy of a split's random draws: the test split's is the seed itself (as before there were
    validation splits), the validation split's another stream of the same seed."""
    return seed if split == "test" else [seed, 1]


def too_few_for_validation(train_keys, item_bits, n_users):
    """How many users have fewer than 2 training keys (the validation key among them): holding one out
    would leave them nothing to train on."""
    return np.count_nonzero(np.diff(user_starts(train_keys, 1 << item_bits, n_users)) < 2)


def hold_out_validation(train_keys, test_keys, valid_keys, n_users, n_items, item_bits, valid_negative, seed):
    """The training keys without each user's validation key and the validation negatives, drawn as the
    test negatives among the items that are neither the user's training positives nor its test item
    (the validation item may be drawn: evaluation masks it). Works in train_keys' memory."""
    stride = 1 << item_bits
    # each user's validation key becomes its test key: the user's keys stay together, only their order
    # within the user changes, which the block sort of whole users restores
    keys = train_keys
    keys[np.searchsorted(keys, valid_keys)] = test_keys
    sort_pair_keys(keys, item_bits)
    negatives = sample_test_negatives(keys, stride, n_users, n_items, valid_negative, split_seed(seed, "valid"))
    return delete_in_place(keys, np.searchsorted(keys, test_keys)), negatives


def build(raw_users, raw_items, raw_times, min_ratings, valid_negative, seed, validation=False):
    """The cache's arrays from the raw columns (lists of chunks of equal lengths, one chunk per block of rows)."""
    users, user_size, raw_user_ids = small_ids(raw_users)
    items, item_size, raw_item_ids = small_ids(raw_items)
    user_order = first_appearances(users, user_size)
    kept_users = user_order[row_counts(users, user_size)[user_order] >= min_ratings]
    if not len(kept_users):
        n_rows, n_users = sum(len(chunk) for chunk in users), len(user_order)
        raise CliError(
            f"no user has {min_ratings} or more ratings (--min_ratings) among the {n_rows:,} ratings kept, of "
            f"{n_users:,} user{'s' * (n_users != 1)}; nothing to train on"
        )
    user_table = dense_table(kept_users, user_size)
    if len(kept_users) < len(user_order):  # drop the light users' rows, once for every later step
        kept_rows = [user_table[chunk] >= 0 for chunk in users]
        users, items, raw_times = (
            [chunk[kept] for chunk, kept in zip(column, kept_rows, strict=True)] for column in (users, items, raw_times)
        )
    item_order = first_appearances(items, item_size)
    n_users, n_items = len(kept_users), len(item_order)
    if valid_negative >= n_items:
        raise CliError(f"--valid_negative {valid_negative} must be smaller than the number of items ({n_items})")
    item_table, item_bits = dense_table(item_order, item_size), bits(n_items - 1)

    def keys_in_file_order(out=None):
        return row_keys(users, items, user_table, item_table, item_bits, out)

    train_keys, test_keys, valid_keys = split_leave_one_out(
        keys_in_file_order(), raw_times, n_users, item_bits, keys_in_file_order, validation
    )
    # the test negatives avoid the training positives of the cache without a validation split (training
    # and validation here): the same draw with or without one, so their test figures compare
    negatives = sample_test_negatives(train_keys, 1 << item_bits, n_users, n_items, valid_negative, seed)
    cache = {}
    if validation:
        light = too_few_for_validation(train_keys, item_bits, n_users)
        if light:
            raise CliError(
                f"--validation needs 3 distinct interactions per user (training, validation, test): {light:,} of "
                f"the {n_users:,} users have fewer; drop them with --min_ratings 3 or more"
            )
        train_keys, cache["valid_negatives"] = hold_out_validation(
            train_keys, test_keys, valid_keys, n_users, n_items, item_bits, valid_negative, seed
        )
        cache["valid"] = pairs_in_place(valid_keys, item_bits)
    return cache | {
        "train": pairs_in_place(train_keys, item_bits),  # int32: ids fit, half the bytes to write and load
        "test": pairs_in_place(test_keys, item_bits),
        "negatives": negatives,
        "user_ids": kept_users if raw_user_ids is None else raw_user_ids[kept_users],
        "item_ids": item_order if raw_item_ids is None else raw_item_ids[item_order],
    }


def build_ncf_paper(train_path, test_path, negatives_path, seed, validation):
    """The cache of the NCF paper's split, with its ids, test items and negatives as they are; the number
    of ratings read (training and test lines); notes on what was dropped or kept although unusual."""
    users, items, times, test_items, negatives = read_ncf_paper(train_path, test_path, negatives_path)
    n_users, per_user = negatives.shape
    n_items = int(max(items.max(), test_items.max(), negatives.max())) + 1
    item_bits = bits(n_items - 1)
    keys = (users.astype(np.int64) << item_bits) | items
    train_keys, first_rows = np.unique(keys, return_index=True)  # sorted; the first line of each pair
    test_keys = (np.arange(n_users, dtype=np.int64) << item_bits) | test_items
    notes = []
    if len(train_keys) < len(keys):
        notes.append(f"{train_path.name}: {len(keys) - len(train_keys):,} repeated pairs dropped (the first line kept)")
    trained = np.flatnonzero(np.isin(test_keys, train_keys))
    if len(trained):
        notes.append(
            f"{test_path.name}: {len(trained):,} test pairs are training pairs too: kept in both, as the paper's code "
            "trains on every line of its training file"
        )
    cache = {}
    if validation:
        if len(trained):
            user = trained[0]
            raise CliError(
                f"{test_path}: line {line_number(test_path, user, False)}: user {user}'s test item is also one of its "
                f"training items in {train_path.name}; --validation needs them apart"
            )
        light = too_few_for_validation(train_keys, item_bits, n_users)
        if light:
            raise CliError(
                f"--validation needs 2 training pairs per user in {train_path.name} (one becomes its validation pair): "
                f"{light:,} of the {n_users:,} users have fewer"
            )
        kept = np.sort(first_rows)
        kept_keys = keys[kept]
        valid_keys = kept_keys[latest_rows(kept_keys, [times[kept]], n_users, item_bits)]
        train_keys, cache["valid_negatives"] = hold_out_validation(
            train_keys, test_keys, valid_keys, n_users, n_items, item_bits, per_user, seed
        )
        cache["valid"] = pairs_in_place(valid_keys, item_bits)
    cache |= {
        "train": pairs_in_place(train_keys, item_bits),
        "test": pairs_in_place(test_keys, item_bits),
        "negatives": negatives,
        "user_ids": np.arange(n_users),
        "item_ids": np.arange(n_items),
    }
    return cache, len(keys) + n_users, notes


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
    expected = CACHE_FILES + ((VALID_FILE, VALID_NEGATIVES_FILE) if meta.get("validation") else ())
    missing = [name for name in expected if not (cache_dir / name).is_file()]
    if missing:
        raise CliError(f"{cache_dir} is incomplete (missing {', '.join(missing)}); {hint} again")
    return meta


def import_torch():
    """torch, which writes the tensors; main() imports it in a thread while the file is read, as the import
    takes about as long as converting a file of millions of ratings."""
    try:
        if "torch" in sys.modules:  # imported already (tests, runs of main() in one process): nothing to freeze
            import torch
        else:
            with garbage_collector_paused():
                import torch
    except ImportError as error:
        raise CliError(f"cannot import torch, which writes the cache's tensors ({error})") from None
    return torch


@contextlib.contextmanager
def garbage_collector_paused():
    """The cyclic garbage collector off meanwhile, and what was made meanwhile kept out of its later collections:
    the import of torch makes some 150,000 lasting objects (none garbage), which its ~380 collections would
    walk again and again, holding the GIL that the processing in the main thread needs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def save_tensor(array, path):
    """torch.save of an array as a contiguous int32 tensor (no copy when it is one already)."""
    torch = import_torch()
    torch.save(torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32)), path)


def write_id_map(path, raw_ids):
    """A one-column CSV: the header `raw_id`, then line k + 2 holds the raw id of dense id k."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["raw_id"])
        writer.writerows([raw_id] for raw_id in raw_ids.tolist())


@contextlib.contextmanager
def locked_temp_dir(parent, prefix):
    """A new directory in parent, locked while the context lasts (recover_output leaves it alone; the kernel
    drops the lock when the process dies, however it dies), then removed if it is still there."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(descriptor)


@contextlib.contextmanager
def claimed(path):
    """Whether path was left by a run that is gone (its lock is free), holding the lock meanwhile."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # gone already
        yield False
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a running conversion's
        os.close(descriptor)
        yield False
        return
    try:
        yield True
    finally:
        os.close(descriptor)


def leftover_dirs(output):
    """The temporary directories write_cache makes beside output: .NAME.tmp-* (a new cache, complete or not)
    and .NAME.old-* (the cache it replaces, in .NAME.old-*/NAME while the new one is moved in)."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    try:
        return sorted(path for path in output.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir())
    except OSError:  # no such directory, or not readable: nothing to recover there
        return []


def is_complete(cache_dir):
    try:
        read_metadata(cache_dir)
    except CliError:
        return False
    return True


def recover_output(output):
    """Clean up after runs killed while writing to output: when output is missing because a run was killed
    between its two renames, move the old cache it had moved aside back; remove every directory those runs
    left. Directories of a conversion still running are left alone."""
    output = Path(output)
    for path in leftover_dirs(output):
        with claimed(path) as stale:
            if not stale:
                continue
            moved_aside = path / output.name
            if path.name.startswith(f".{output.name}.old-") and not output.exists() and is_complete(moved_aside):
                try:
                    os.replace(moved_aside, output)
                except OSError as error:
                    raise CliError(
                        f"cannot move the cache in {moved_aside} back to {output}: {error.strerror}"
                    ) from None
                print(f"note: {output}: restored the cache that an interrupted run had moved aside")
            shutil.rmtree(path, ignore_errors=True)


def write_cache(output, cache, meta):
    """Write into a temporary sibling directory, then swap it in: never a half-written cache at output.

    The swap is two renames (the old cache aside, the new one in); a run killed between them leaves no
    cache at output, and the next run puts the old one back (recover_output)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / METADATA_FILE).exists())):
        raise CliError(f"{output} exists and is not a data cache; choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with locked_temp_dir(output.parent, f".{output.name}.tmp-") as tmp:
            write_cache_files(tmp, cache, meta)
            if output.exists():
                with locked_temp_dir(output.parent, f".{output.name}.old-") as old:
                    swap_in(tmp, output, old)
            else:
                os.replace(tmp, output)
    except OSError as error:
        raise CliError(f"cannot write the cache to {output}: {error.strerror}") from None


def write_cache_files(directory, cache, meta):
    umask = os.umask(0)  # the cache gets the usual permissions, not mkdtemp's 0o700
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    save_tensor(cache["train"], directory / TRAIN_FILE)
    save_tensor(cache["test"], directory / TEST_FILE)
    save_tensor(cache["negatives"], directory / NEGATIVES_FILE)
    if "valid" in cache:
        save_tensor(cache["valid"], directory / VALID_FILE)
        save_tensor(cache["valid_negatives"], directory / VALID_NEGATIVES_FILE)
    write_id_map(directory / USER_IDS_FILE, cache["user_ids"])
    write_id_map(directory / ITEM_IDS_FILE, cache["item_ids"])
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: it marks a complete cache


def swap_in(new, output, old):
    """Replace the cache at output by the one in new, moving the old one into old on the way."""
    os.replace(output, old / output.name)
    try:
        os.replace(new, output)
    except BaseException:
        os.replace(old / output.name, output)
        raise


def main():
    args = parse_args()
    recover_output(args.output)
    if args.check:
        read_metadata(args.output)
        print(f"{args.output} holds a valid cache")
        return
    fmt = guess_format(args.path) if args.format == "auto" else args.format
    if fmt == "ncf-paper":
        for flag in ("min_ratings", "valid_negative", "rating_threshold"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag} does not apply to --format ncf-paper (its users and negatives are given)")
    min_ratings = 20 if args.min_ratings is None else args.min_ratings
    valid_negative = 100 if args.valid_negative is None else args.valid_negative
    if min_ratings < 1:
        raise CliError("--min_ratings must be at least 1")
    if valid_negative < 1:
        raise CliError("--valid_negative must be at least 1")
    if args.seed < 0:
        raise CliError("--seed must be non-negative")
    if args.rating_threshold is not None and not math.isfinite(args.rating_threshold):
        raise CliError("--rating_threshold must be a finite number")
    with ThreadPoolExecutor(2) as background:
        torch_imported = background.submit(import_torch)  # meanwhile the file is read and processed
        if fmt == "ncf-paper":
            paths = ncf_paper_paths(args.path)
            cache, n_ratings_read, notes = build_ncf_paper(*paths, args.seed, args.validation)
            digest = sha256_of(paths)  # the three files, one after the other
            min_ratings, valid_negative = None, cache["negatives"].shape[1]
        else:
            columns = read_ratings(args.path, fmt, with_rating=args.rating_threshold is not None)
            n_ratings_read = sum(len(chunk) for chunk in columns[0])
            if args.rating_threshold is not None:
                columns = rated_at_least(args.rating_threshold, *columns)
                n_kept = sum(len(chunk) for chunk in columns[0])
                print(
                    f"--rating_threshold {args.rating_threshold:g}: {n_kept:,} of the {n_ratings_read:,} ratings kept"
                )
            # hash the file beside the processing, whose single-threaded steps leave a core free
            hashed = background.submit(sha256_of, [args.path])
            cache = build(*columns, min_ratings, valid_negative, args.seed, args.validation)
            # free the file's columns before writing: the cache files' pages reuse their memory while it is warm
            del columns
            pa.default_memory_pool().release_unused()
            digest, notes = hashed.result(), []  # result() raises what the thread raised
        torch_imported.result()
    meta = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "source": Path(args.path).name,
        "source_sha256": digest,
        "n_ratings_read": n_ratings_read,
        "n_users": len(cache["user_ids"]),
        "n_items": len(cache["item_ids"]),
        "n_train": len(cache["train"]),
        "n_test": len(cache["test"]),
        "min_ratings": min_ratings,
        "valid_negative": valid_negative,
        "seed": args.seed,
        "user_id_type": "int" if cache["user_ids"].dtype.kind == "i" else "str",
        "item_id_type": "int" if cache["item_ids"].dtype.kind == "i" else "str",
    }
    if args.validation:  # no key without a split: those caches keep the contents of earlier ones
        meta["validation"] = True
    if args.rating_threshold is not None:  # no key without it: those caches keep their contents
        meta["rating_threshold"] = args.rating_threshold
    write_cache(args.output, cache, meta)
    counts = f"{meta['n_train']:,} training" + (f", {meta['n_users']:,} validation" if args.validation else "")
    print(
        f"{args.output}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{counts} and {meta['n_test']:,} test ratings"
    )
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    run_main(main)
