"""Shared test fixtures: paths to the real MovieLens files (tests skip when they are absent)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real MovieLens files not found in {SHARED_DATA}")
    return SHARED_DATA


def make_cache(directory, users=60, items=200, ratings=3000, seed=0, convert_args=()):
    """A tiny synthetic cache made by the project's own CLIs: synthetic.py, then convert.py (with convert_args)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ratings_file, cache = directory / "ratings.csv", directory / "cache"
    for command in (
        ["synthetic.py", "--users", users, "--items", items, "--ratings", ratings, "--seed", seed]
        + ["--output", ratings_file],
        ["convert.py", "--format", "ml-20m", "--path", ratings_file, "--output", cache, *convert_args],
    ):
        subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True, capture_output=True, text=True)
    return cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """60 users, 200 items (convert.py needs more items than its 100 test negatives), 3000 ratings."""
    return make_cache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_validation_cache(tmp_path_factory):
    """tiny_cache's ratings converted with --validation."""
    return make_cache(tmp_path_factory.mktemp("tiny_validation"), convert_args=["--validation"])
