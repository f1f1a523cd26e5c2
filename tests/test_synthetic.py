"""Tests of synthetic.py: determinism, layout, sizes, constraints, learnable taste structure, bad input."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

import convert
import synthetic
from utils import run_main

ROOT = Path(__file__).resolve().parents[1]
HEADER = "userId,movieId,rating,timestamp"
HALF_STARS = {0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0}


def run_synthetic(*args):
    return subprocess.run(
        [sys.executable, "synthetic.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def generate_in_process(*args):
    """synthetic.py's main() in this process (no second torch import); returns its stdout."""
    with mock.patch.object(sys, "argv", ["synthetic.py", *map(str, args)]):
        run_main(synthetic.main)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files written once per module: the ml-100k preset by the CLI and in process, and variants."""
    root = tmp_path_factory.mktemp("synthetic")
    paths = {
        "cli": root / "cli" / "ratings.csv",
        "ml-100k": root / "ml-100k.csv",
        "seed 1": root / "seed1.csv",
        "no taste": root / "flat.csv",
        "custom": root / "custom.csv",
    }
    with ThreadPoolExecutor(1) as pool:  # the CLI run overlaps the in-process ones
        cli = pool.submit(run_synthetic, "--preset", "ml-100k", "--output", paths["cli"])
        generate_in_process("--preset", "ml-100k", "--output", paths["ml-100k"])
        generate_in_process("--preset", "ml-100k", "--seed", 1, "--output", paths["seed 1"])
        generate_in_process("--preset", "ml-100k", "--taste_share", 0, "--output", paths["no taste"])
        generate_in_process(
            *("--users", 300, "--items", 800, "--ratings", 24_000, "--min_ratings", 25, "--clusters", 8),
            *("--output", paths["custom"]),
        )
        result = cli.result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{paths['cli']}: 943 users, 1,682 items, 99,996 ratings"
    return paths


def read(path):
    return pd.read_csv(path, dtype={"userId": np.int64, "movieId": np.int64, "rating": float, "timestamp": np.int64})


# --- determinism ------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes(files):
    assert files["cli"].read_bytes() == files["ml-100k"].read_bytes()
    assert files["seed 1"].read_bytes() != files["ml-100k"].read_bytes()
    assert [p.name for p in files["cli"].parent.iterdir()] == ["ratings.csv"]  # no temporary file left


# --- layout, sizes and constraints ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, users, items, ratings, min_ratings",
    [("ml-100k", 943, 1_682, 100_000, 20), ("seed 1", 943, 1_682, 100_000, 20), ("custom", 300, 800, 24_000, 25)],
)
def test_layout_sizes_and_constraints(files, name, users, items, ratings, min_ratings):
    path = files[name]
    assert path.read_text().split("\n", 1)[0] == HEADER
    frame = read(path)
    assert list(frame.columns) == HEADER.split(",")
    assert sorted(frame["userId"].unique().tolist()) == list(range(1, users + 1))
    assert frame["movieId"].nunique() == items
    assert frame["movieId"].min() >= 1
    assert abs(len(frame) - ratings) <= ratings // 100
    per_user = frame.groupby("userId").size()
    assert per_user.min() >= min_ratings
    assert per_user.max() <= items // 2
    assert not frame.duplicated(["userId", "movieId"]).any()
    assert set(frame["rating"].unique()) <= HALF_STARS
    assert frame["timestamp"].between(synthetic.FIRST_TIMESTAMP, synthetic.LAST_TIMESTAMP).all()
    # sorted by user, then movie, as the docstring says
    keys = frame["userId"].to_numpy() * (frame["movieId"].max() + 1) + frame["movieId"].to_numpy()
    assert (np.diff(keys) > 0).all()


def test_movielens_like_shape(files):
    frame = read(files["ml-100k"])
    # rating values follow ML-20m's histogram (4.0 is the most common, 27.8 %)
    shares = frame["rating"].value_counts(normalize=True)
    assert shares.idxmax() == 4.0
    assert abs(shares[4.0] - 0.278) < 0.01
    # power-law popularity: the top 10 % of items hold far more than 10 % of the ratings
    counts = np.sort(frame.groupby("movieId").size().to_numpy())[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()
    # heavy-tailed activity: the busiest user rates many times the median
    per_user = frame.groupby("userId").size()
    assert per_user.max() > 5 * per_user.median()
    # ties in time happen but are rare
    assert 0 < frame.duplicated(["userId", "timestamp"]).mean() < 0.05


@pytest.mark.parametrize("preset", ["ml-1m"])
def test_preset_sizes(tmp_path, preset):
    generate_in_process("--preset", preset, "--output", tmp_path / "r.csv")
    frame = pd.read_csv(tmp_path / "r.csv", usecols=["userId", "movieId"])
    users, items, ratings = synthetic.PRESETS[preset]
    assert frame["userId"].nunique() == users and frame["userId"].max() == users
    assert frame["movieId"].nunique() == items
    assert abs(len(frame) - ratings) <= ratings // 100
    assert frame.groupby("userId").size().min() >= 20


# --- the taste structure is learnable ---------------------------------------------------------


def hit_rate_at_10(scores, test_items, negatives):
    """HR@10 with the reference's protocol: the test item against its distinct negatives (itself excluded)."""
    n_users = len(test_items)
    positive = scores[np.arange(n_users), test_items]
    order = np.argsort(negatives, axis=1)
    sorted_negatives = np.take_along_axis(negatives, order, axis=1)
    distinct = np.ones_like(negatives, dtype=bool)
    distinct[:, 1:] = sorted_negatives[:, 1:] != sorted_negatives[:, :-1]
    counted = distinct & (sorted_negatives != test_items[:, None])
    negative_scores = np.take_along_axis(scores, sorted_negatives, axis=1)
    rank = ((negative_scores > positive[:, None]) & counted).sum(axis=1)
    return (rank < 10).mean()


def popularity_and_user_knn(path, neighbours=50):
    """HR@10 of a popularity ranking and of user-based cosine kNN, on convert.py's cache of a file."""
    cache = convert.build(*convert.read_ratings(path, "ml-20m"), 20, 100, 1)
    n_users, n_items = len(cache["user_ids"]), len(cache["item_ids"])
    seen = np.zeros((n_users, n_items), dtype=np.float32)
    seen[cache["train"][:, 0], cache["train"][:, 1]] = 1
    norms = np.sqrt(seen.sum(axis=1))
    similarity = (seen @ seen.T) / np.outer(norms, norms)
    np.fill_diagonal(similarity, 0)
    threshold = -np.partition(-similarity, neighbours - 1, axis=1)[:, neighbours - 1 : neighbours]
    similarity[similarity < threshold] = 0
    test_items, negatives = cache["test"][:, 1], cache["negatives"]
    popularity = np.broadcast_to(seen.sum(axis=0), seen.shape)
    return hit_rate_at_10(popularity, test_items, negatives), hit_rate_at_10(similarity @ seen, test_items, negatives)


def test_hit_rate_helper():
    scores = np.array([[0.0, 1, 2, 3], [3, 2, 1, 0]])
    # user 0: test item 1 is beaten by 2 and 3; user 1: test item 0 beats all; duplicates count once
    assert hit_rate_at_10(scores, np.array([1, 0]), np.array([[2, 3, 3, 1], [1, 2, 3, 0]])) == 1.0
    many = np.arange(20.0)[None]
    assert hit_rate_at_10(many, np.array([0]), np.arange(1, 20)[None]) == 0.0  # 19 better negatives
    assert hit_rate_at_10(many, np.array([10]), np.arange(1, 20)[None]) == 1.0  # 9 better


def test_neighbours_beat_popularity_only_when_there_is_taste(files):
    popularity, knn = popularity_and_user_knn(files["ml-100k"])
    # seeds 0..2 measured: popularity 0.41-0.43, user-kNN 0.55-0.57 (the generator's own
    # probabilities reach 0.62-0.64); 943 users give a standard error of about 0.016
    assert 0.3 < popularity < 0.55
    assert knn > popularity + 0.07
    # the control: with --taste_share 0 there is nothing beyond popularity to learn
    popularity, knn = popularity_and_user_knn(files["no taste"])
    assert knn < popularity + 0.02


# --- bad input --------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "zero users": (["--users", 0], "must be positive"),
    "negative items": (["--items", -5], "must be positive"),
    "zero clusters": (["--clusters", 0], "must be positive"),
    "zero dim": (["--dim", 0], "must be positive"),
    "zero min_ratings": (["--min_ratings", 0], "must be positive"),
    "zero ratings": (["--ratings", 0], "--ratings must be at least users x min_ratings (18,860)"),
    "too few ratings": (["--ratings", 18_859], "--ratings must be at least users x min_ratings"),
    "too many ratings": (["--ratings", 10**9], "--ratings must be at most users x items / 2 (793,063)"),
    "too few items": (["--items", 39], "--items must be at least twice --min_ratings (40)"),
    "negative seed": (["--seed", -1], "--seed must be non-negative"),
    "taste_strength not a number": (["--taste_strength", "nan"], "--taste_strength must be finite, got nan"),
    "infinite taste_strength": (["--taste_strength", "inf"], "--taste_strength must be finite, got inf"),
    "overflowing taste_strength": (["--taste_strength", "1e308"], "--taste_strength 1e+308 is too large"),
    "taste_share above 1": (["--taste_share", 1.5], "--taste_share must be in [0, 1], got 1.5"),
    "taste_share not a number": (["--taste_share", "nan"], "--taste_share must be in [0, 1], got nan"),
    "negative popularity_exponent": (["--popularity_exponent", -1], "--popularity_exponent must be finite and >= 0"),
    "infinite popularity_exponent": (["--popularity_exponent", "inf"], "--popularity_exponent must be finite"),
    "output is a directory": (["--output", "{dir}"], "is a directory"),
    "output under a file": (["--output", "{dir}/a_file/ratings.csv"], "cannot write"),
    "unknown preset": (["--preset", "ml-30m"], "invalid choice: 'ml-30m'"),
    "not a number": (["--users", "many"], "invalid int value: 'many'"),
}
ARGPARSE_ERRORS = {"unknown preset", "not a number"}
CLI_CASES = ["zero users", "output under a file", "unknown preset", "overflowing taste_strength"]


def bad_case(directory, name):
    (directory / "a_file").write_text("x")
    args, _ = BAD_ARGUMENTS[name]
    args = ["--preset", "ml-100k", "--output", str(directory / "ratings.csv"), *map(str, args)]
    return [a.format(dir=directory) for a in args]


def check_bad_result(name, directory, returncode, stderr):
    assert returncode == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    if name in ARGPARSE_ERRORS:
        assert stderr.startswith("usage: synthetic.py")
        lines = lines[-1:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("synthetic.py: error: ")
    assert BAD_ARGUMENTS[name][1] in lines[0]
    assert sorted(p.name for p in directory.iterdir()) == ["a_file"]  # no output, no temporary file


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_in_process(name, tmp_path, capsys):
    with mock.patch.object(sys, "argv", ["synthetic.py", *bad_case(tmp_path, name)]), pytest.raises(SystemExit) as e:
        run_main(synthetic.main)
    check_bad_result(name, tmp_path, e.value.code, capsys.readouterr().err)


def test_bad_arguments_cli(tmp_path):
    directories = {name: tmp_path / str(number) for number, name in enumerate(CLI_CASES)}
    for directory in directories.values():
        directory.mkdir()
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda name: run_synthetic(*bad_case(directories[name], name)), CLI_CASES)
    for name, result in zip(CLI_CASES, results, strict=True):
        check_bad_result(name, directories[name], result.returncode, result.stderr)
