"""prepare_dataset.sh and download_dataset.sh, run as a user runs them. Never touches the network:
downloads go to an unreachable address or to file:// URLs (NCF_DOWNLOAD_URL_BASE)."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from convert import read_metadata

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "prepare_dataset.sh"
DOWNLOAD = ROOT / "download_dataset.sh"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="file:// downloads need curl")


def script_env(tmp_path, **extra):
    """`python` is the interpreter running the tests; nothing can land in the repository's ./data."""
    env = dict(os.environ)
    for name in ("CONVERT_ARGS", "NCF_DOWNLOAD_MD5", "NCF_DOWNLOAD_RETRIES"):
        env.pop(name, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["DATA_ROOT"] = str(tmp_path / "data_root")
    env["NCF_DOWNLOAD_URL_BASE"] = UNREACHABLE
    env.update(extra)
    return env


def run(script, *args, tmp_path, cwd=None, **env):
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        cwd=cwd or tmp_path,
        env=script_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def metadata(cache_dir):
    """The cache's metadata, after the same checks as `convert.py --check` (in-process: faster)."""
    return read_metadata(cache_dir)


def assert_one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def mtimes(directory):
    return {path.name: path.stat().st_mtime_ns for path in Path(directory).iterdir()}


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_ml100k_zip(path, u_data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(u_data, "ml-100k/u.data")
        archive.writestr("ml-100k/README", "test copy\n")
    return path


# --- prepare_dataset.sh -----------------------------------------------------------------------


def test_prepare_synthetic_then_reuse_the_cache(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    first = run(PREPARE, "synthetic-ml-100k", raw, cache, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (raw / "ratings.csv").is_file()
    assert metadata(cache)["n_users"] == 943
    before, raw_before = mtimes(cache), (raw / "ratings.csv").stat().st_mtime_ns

    second = run(
        PREPARE, "synthetic-ml-100k", raw, cache, tmp_path=tmp_path,
        CONVERT_ARGS="--min_ratings 5", SYNTHETIC_ARGS="--users 50",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "ready" in second.stdout  # printed only when `convert.py --check` accepts the cache
    assert "training and" not in second.stdout  # convert.py's summary: it did not run again
    assert mtimes(cache) == before
    assert (raw / "ratings.csv").stat().st_mtime_ns == raw_before
    assert "CONVERT_ARGS ignored" in second.stderr and "SYNTHETIC_ARGS ignored" in second.stderr


def test_prepare_custom_csv_with_relative_paths_from_another_directory(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    lines = ["user_id,item_id,timestamp"]
    lines += [f"user{u},item{(u * 7 + k) % 60},{1000 * u + k}" for u in range(12) for k in range(8)]
    (work / "my_ratings.csv").write_text("\n".join(lines) + "\n")

    result = run(
        PREPARE,
        "my_ratings.csv",
        tmp_path=tmp_path,
        cwd=work,
        DATA_ROOT="data",
        CONVERT_ARGS="--min_ratings 5 --valid_negative 10",
    )
    assert result.returncode == 0, result.stderr
    cache = work / "data" / "cache" / "my_ratings"
    meta = metadata(cache)
    assert (meta["format"], meta["n_users"], meta["n_test"], meta["valid_negative"]) == ("custom", 12, 12, 10)
    assert meta["n_train"] == 12 * 7


def test_prepare_passes_validation_to_convert(tmp_path):
    lines = [f"{u},{(u * 5 + k) % 30},{k}" for u in range(6) for k in range(4)]
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    result = run(
        PREPARE,
        tmp_path / "events.csv",
        tmp_path / "raw",
        cache,
        tmp_path=tmp_path,
        CONVERT_ARGS="--validation --min_ratings 3 --valid_negative 5",
    )
    assert result.returncode == 0, result.stderr
    meta = metadata(cache)
    assert meta["validation"] is True and (meta["n_users"], meta["n_train"]) == (6, 6 * 2)
    assert (cache / "valid_ratings.pt").is_file() and (cache / "valid_negatives.pt").is_file()


def test_prepare_refuses_an_unknown_dataset(tmp_path):
    result = run(PREPARE, "ml-30m", tmp_path=tmp_path)
    assert_one_line_error(result)
    assert "unknown dataset 'ml-30m'" in result.stderr
    assert not (tmp_path / "data_root").exists()


def test_prepare_refuses_a_missing_custom_file(tmp_path):
    result = run(PREPARE, "missing/ratings.csv", tmp_path=tmp_path)
    assert_one_line_error(result)
    assert "does not exist" in result.stderr


def test_prepare_offline_without_data_says_where_to_put_the_zip(tmp_path):
    raw = tmp_path / "raw"
    result = run(PREPARE, "ml-100k", raw, tmp_path / "cache", tmp_path=tmp_path)
    assert_one_line_error(result)
    assert f"put it at {raw}/ml-100k.zip" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_prepare_ml100k_from_the_raw_file(tmp_path, shared_data):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    (raw / "ml-100k").mkdir(parents=True)
    shutil.copy(shared_data / "ml-100k" / "u.data", raw / "ml-100k" / "u.data")
    result = run(PREPARE, "ml-100k", raw, cache, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = metadata(cache)
    assert (meta["format"], meta["n_users"], meta["n_test"]) == ("ml-100k", 943, 943)
    assert meta["n_train"] + meta["n_test"] == 100_000


def test_prepare_ml100k_unpacks_a_zip_put_there_by_hand(tmp_path, shared_data):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    zip_path = make_ml100k_zip(raw / "ml-100k.zip", shared_data / "ml-100k" / "u.data")
    # not the official zip's bytes: tell the checksum what to expect, as for a mirror's own packaging
    result = run(PREPARE, "ml-100k", raw, cache, tmp_path=tmp_path, NCF_DOWNLOAD_MD5=md5(zip_path))
    assert result.returncode == 0, result.stderr
    assert (raw / "ml-100k" / "u.data").read_bytes() == (shared_data / "ml-100k" / "u.data").read_bytes()
    assert (raw / "ml-100k" / "README").is_file()
    assert not list(raw.glob(".unpack*"))
    assert metadata(cache)["n_users"] == 943


@needs_curl
def test_prepare_ml100k_downloads_when_nothing_is_there(tmp_path, shared_data):
    mirror = make_ml100k_zip(tmp_path / "mirror" / "ml-100k.zip", shared_data / "ml-100k" / "u.data")
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    result = run(
        PREPARE,
        "ml-100k",
        raw,
        cache,
        tmp_path=tmp_path,
        NCF_DOWNLOAD_URL_BASE=mirror.parent.as_uri(),
        NCF_DOWNLOAD_MD5=md5(mirror),
    )
    assert result.returncode == 0, result.stderr
    assert md5(raw / "ml-100k.zip") == md5(mirror)
    assert metadata(cache)["n_users"] == 943


# --- download_dataset.sh ----------------------------------------------------------------------


def test_download_refuses_an_unknown_name(tmp_path):
    result = run(DOWNLOAD, "ml-2m", tmp_path / "dir", tmp_path=tmp_path)
    assert_one_line_error(result)
    assert "unknown dataset 'ml-2m'" in result.stderr
    assert not (tmp_path / "dir").exists()


def test_download_offline_says_where_to_put_the_zip(tmp_path):
    target = tmp_path / "dir"
    result = run(DOWNLOAD, "ml-100k", target, tmp_path=tmp_path)
    assert_one_line_error(result)
    assert f"put it at {target}/ml-100k.zip" in result.stderr
    assert list(target.iterdir()) == []  # no zip, no .part, nothing unpacked


@needs_curl
def test_download_rejects_a_zip_with_the_wrong_checksum(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ml-100k.zip").write_bytes(b"not the MovieLens zip")
    target = tmp_path / "dir"
    result = run(DOWNLOAD, "ml-100k", target, tmp_path=tmp_path, NCF_DOWNLOAD_URL_BASE=mirror.as_uri())
    assert_one_line_error(result)
    assert "0e33842e24a9c977be4e0107933c0723" in result.stderr  # the official md5 of ml-100k.zip
    assert list(target.iterdir()) == []


@needs_curl
def test_download_verifies_unpacks_and_then_reuses_the_zip(tmp_path, shared_data):
    mirror = make_ml100k_zip(tmp_path / "mirror" / "ml-100k.zip", shared_data / "ml-100k" / "u.data")
    target = tmp_path / "dir"
    env = {"NCF_DOWNLOAD_URL_BASE": mirror.parent.as_uri(), "NCF_DOWNLOAD_MD5": md5(mirror)}
    first = run(DOWNLOAD, "ml-100k", target, tmp_path=tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert sorted(path.name for path in target.iterdir()) == ["ml-100k", "ml-100k.zip"]
    assert (target / "ml-100k" / "u.data").stat().st_size == (shared_data / "ml-100k" / "u.data").stat().st_size

    # an unpack that lost its ratings file is redone from the zip, without downloading again
    (target / "ml-100k" / "u.data").unlink()
    again = run(DOWNLOAD, "ml-100k", target, tmp_path=tmp_path, NCF_DOWNLOAD_MD5=md5(mirror))
    assert again.returncode == 0, again.stderr
    assert "already downloaded" in again.stdout
    assert (target / "ml-100k" / "u.data").is_file()

    # a zip that is not the expected one is refused and left alone
    official = run(DOWNLOAD, "ml-100k", target, tmp_path=tmp_path)
    assert_one_line_error(official)
    assert (target / "ml-100k.zip").is_file()


# --- every script's flags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args",
    [
        ("ncf.py", ["--data", "cache", "--epoch", "1"]),  # --epochs
        ("inference.py", ["--num_batch", "20"]),  # --num_batches
        ("synthetic.py", ["--output", "x.csv", "--cluster", "4"]),  # --clusters
        ("benchmarks/convert_bench.py", ["--repeated", "0.5"]),  # --repeated_share
        ("benchmarks/train_bench.py", ["--epoch", "1"]),  # --epochs
        ("benchmarks/accuracy.py", ["--dataset", "ml-100k"]),  # --datasets
        ("benchmarks/full_ranking_bench.py", ["--repeat", "2"]),  # --repeats
        ("benchmarks/baselines.py", ["--data", "cache", "--method", "ials"]),  # --methods
        ("plot.py", ["x.json", "--output", "figures", "--study_nam", "s"]),  # --study_name
        ("tune.py", ["--data", "cache", "--trials", "3", "--study_name", "s", "--storag", "x"]),  # --storage
        ("benchmarks/stability.py", ["--data", "cache", "--seed", "3"]),  # --seeds
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_an_abbreviated_flag_is_an_error(script, args, tmp_path):
    # argparse would otherwise take a unique prefix for the whole flag (--min_rating for --min_ratings)
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    # (a script that passes the rest on to ncf.py, stability.py, takes the abbreviation's value as one of those)
    assert f"error: unrecognized arguments: {args[-2]}" in result.stderr.strip().splitlines()[-1]


# --- quickstart.sh ----------------------------------------------------------------------------


def test_quickstart_ends_with_the_recommendations_of_two_users(tmp_path):
    # the environment counts as installed: setup_env.sh finds its stamp and installs nothing
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    environment = tmp_path / "env"
    environment.mkdir()
    (environment / ".ncf-install").write_text(f"torch {ROOT} . {hashlib.md5(pyproject).hexdigest()}  -\n")
    result = subprocess.run(
        ["bash", str(ROOT / "quickstart.sh"), "-e", "1", "-b", "1024", "-f", "8", "--layers", "16", "8"],
        env=script_env(
            tmp_path, VIRTUAL_ENV=str(environment), TORCH_SPEC="torch", OMP_NUM_THREADS="1",
            SYNTHETIC_ARGS="--users 80 --items 300 --ratings 4000",
        ),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data_root = tmp_path / "data_root"
    assert metadata(data_root / "cache" / "synthetic")["n_users"] == 80  # the smaller synthetic set
    assert (data_root / "checkpoints" / "synthetic" / "model.pth").is_file()
    output = result.stdout
    assert "epoch 0: HR@10" in output
    table = output[output.index("== 3/3") :].splitlines()[1:]
    assert table[0].split() == ["user_id", "rank", "item_id", "score"]
    rows = [line.split() for line in table[1:]]
    # the first two users of the file (synthetic user ids start at 1), ten items each, ranked
    assert [(row[0], row[1]) for row in rows] == [(user, str(rank)) for user in ("1", "2") for rank in range(1, 11)]
    for user in ("1", "2"):
        scores = [float(row[3]) for row in rows if row[0] == user]
        assert scores == sorted(scores, reverse=True) and all(0 < score < 1 for score in scores)
