"""Crash safety, tested by killing: convert.py, ncf.py training and download_dataset.sh get SIGKILL at
many instants spread over their runs, the writes included, and nothing is lost. Each harness prints how
many instants it killed at (pytest -s shows it)."""

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from conftest import make_cache

import convert

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.0005  # how often a harness looks for the temporary files that mark a run's writes
LANES = 2  # runs killed at once, each lane in its own directory: most of a run is one thread importing torch


def start(command, log, **kwargs):
    """Start command from the repository root, its output going to the file log (a pipe could fill up)."""
    with open(log, "w") as file:
        return subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, **kwargs)


def kill_after(process, delay):
    """SIGKILL process delay seconds after now; False if it exited first."""
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def kill_while_writing(process, is_writing, delay):
    """SIGKILL process delay seconds after is_writing() (its temporary files exist); False if it exited first."""
    while process.poll() is None:
        if is_writing():
            return kill_after(process, delay)
        time.sleep(POLL_S)
    return False


def spread(count):
    """count fractions evenly spread over [0, 1)."""
    return [k / count for k in range(count)]


def in_lanes(lane, instants, directory):
    """lane(its directory, its instants) for every LANES-th instant, the lanes at the same time; their Counters
    added up."""
    with ThreadPoolExecutor(LANES) as pool:
        lanes = [pool.submit(lane, directory / f"lane{k}", instants[k::LANES]) for k in range(LANES)]
        return sum((lane.result() for lane in lanes), Counter())


# --- convert.py -------------------------------------------------------------------------------


def tree_digest(directory):
    """The SHA-256 of a directory's file names and bytes: torch.save writes the same bytes for the same cache."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def leftovers(output):
    return sorted(path.name for path in output.parent.iterdir() if path.name.startswith(f".{output.name}."))


IN_PROCESS = threading.Lock()  # sys.argv and sys.stdout are the process's


def check_in_process(output):
    """`convert.py --check --output OUTPUT` run in this process (its code without the interpreter's start): what
    it prints; a CliError when the cache is not valid."""
    with IN_PROCESS, contextlib.redirect_stdout(io.StringIO()) as stdout:
        saved, sys.argv = sys.argv, ["convert.py", "--check", "--output", str(output)]
        try:
            convert.main()
        finally:
            sys.argv = saved
    return stdout.getvalue()


def convert_command(ratings, output, seed):
    flags = ["--path", ratings, "--format", "ml-20m", "--min_ratings", 2, "--seed", seed, "--output", output]
    return [sys.executable, "convert.py", *flags]


def first_conversion(directory, ratings, seed):
    """Convert into directory/cache: the cache's digest, how long the run lasted and how long it wrote files."""
    directory.mkdir()
    output, log = directory / "cache", directory / "convert.log"
    started = time.perf_counter()
    assert start(convert_command(ratings, output, seed), log).wait() == 0, log.read_text()
    run_s = time.perf_counter() - started
    written = [path.stat().st_mtime for path in output.iterdir()]
    return tree_digest(output), run_s, max(written) - min(written)


def convert_lane(directory, instants, ratings, digests, run_s, write_s):
    """Kill convert.py at the instants (fractions of its run, or of its writes from the moment its temporary
    directory appears) and check what each kill left."""
    output, log = directory / "cache", directory / "convert.log"

    def is_writing():
        return any(name.startswith(f".{output.name}.tmp-") for name in os.listdir(directory))

    seed, outcomes = digests[tree_digest(output)], Counter()
    for phase, fraction in instants:
        process = start(convert_command(ratings, output, 3 - seed), log)  # the other seed: another cache
        if phase == "run":
            killed = kill_after(process, fraction * run_s)
        else:  # the renames and the exit follow the files
            killed = kill_while_writing(process, is_writing, fraction * 2 * write_s)
        if not killed:
            assert process.returncode == 0, log.read_text()
            outcomes["finished"] += 1
        outcomes["killed during the writes"] += killed and leftovers(output) != []
        moved_aside = not output.exists()
        if moved_aside:  # killed between the two renames: the next run puts the old cache back
            assert killed
            outcomes["killed between the renames"] += 1
        elif killed:
            outcomes["old cache" if digests[tree_digest(output)] == seed else "new cache"] += 1
        notes = check_in_process(output)
        assert ("restored the cache that an interrupted run had moved aside" in notes) == moved_aside
        seed = digests[tree_digest(output)]  # KeyError: neither of the two caches
        assert leftovers(output) == []
        outcomes["killed"] += killed
    return outcomes


def test_convert_killed_at_any_instant_leaves_the_old_or_the_new_cache(tmp_path):
    """Over an existing cache, convert.py is killed at instants spread over its whole run and, more densely,
    over its writes; each run converts with the other seed, so it always replaces a cache by another one.
    After each kill --output holds the old or the new cache, or (killed between the two renames) `--check`
    restores the old one; either way `--check` passes and no temporary directory is left."""
    ratings = tmp_path / "ratings.csv"
    # many users and negatives: files that take a while to write
    synthetic = ["--users", 20_000, "--items", 2_000, "--ratings", 200_000, "--min_ratings", 2, "--output", ratings]
    subprocess.run([sys.executable, "synthetic.py", *map(str, synthetic)], cwd=ROOT, check=True, capture_output=True)
    # the first caches, seeds 1 and 2 (one per lane), and how long a run and its writes last
    with ThreadPoolExecutor(LANES) as pool:
        seeds = [1 + lane % 2 for lane in range(LANES)]
        firsts = list(
            pool.map(first_conversion, [tmp_path / f"lane{k}" for k in range(LANES)], [ratings] * LANES, seeds)
        )
    digests = {digest: seed for (digest, _, _), seed in zip(firsts, seeds, strict=True)}
    assert len(digests) == 2
    run_s, write_s = (max(times) for times in list(zip(*firsts, strict=True))[1:])

    instants = [("run", fraction) for fraction in spread(20)] + [("writes", fraction) for fraction in spread(6)]
    outcomes = in_lanes(
        lambda directory, share: convert_lane(directory, share, ratings, digests, run_s, write_s), instants, tmp_path
    )
    print(f"\nconvert.py killed at {outcomes['killed']} instants: {dict(outcomes)}")
    assert outcomes["killed"] >= 20
    assert outcomes["killed during the writes"] >= 1


# --- ncf.py -----------------------------------------------------------------------------------


CHECKPOINTS = ("last.pth", "model.pth")


def epochs_done(checkpoints):
    """The epochs that last.pth records (0 without one), after loading last.pth and model.pth as a reader does."""
    last, best = (checkpoints / name for name in CHECKPOINTS)
    if best.exists():
        torch.load(best, weights_only=True)
    return torch.load(last, weights_only=True)["epochs_done"] if last.exists() else 0


def same_run(checkpoints, reference):
    """Whether two checkpoint directories hold the same models, epochs and best epoch."""
    last, expected = (torch.load(d / "last.pth", weights_only=True) for d in (checkpoints, reference))
    best, expected_best = (torch.load(d / "model.pth", weights_only=True) for d in (checkpoints, reference))
    return (
        (last["epochs_done"], last["best"]["epoch"]) == (expected["epochs_done"], expected["best"]["epoch"])
        and all(torch.equal(last["model"][name], tensor) for name, tensor in expected["model"].items())
        and all(torch.equal(best[name], tensor) for name, tensor in expected_best.items())
    )


TRAINING_ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: a tiny model, two lanes


def training_command(cache, epochs, checkpoints, resume):
    flags = ["--data", cache, "-e", epochs, "-b", 4096, "--seed", 1, "--checkpoint_dir", checkpoints]
    return [sys.executable, "ncf.py", *flags] + ["--resume"] * resume


def new_files(checkpoints):
    """A function that says whether a file that is not there now (a checkpoint being written) is there."""
    before = set(CHECKPOINTS) | (set(os.listdir(checkpoints)) if checkpoints.exists() else set())
    return lambda: checkpoints.exists() and not set(os.listdir(checkpoints)) <= before


def uninterrupted_training(cache, epochs, checkpoints, log):
    """A run never killed: its checkpoints are the ones to get; the seconds before its first epoch, and of one."""
    started, saved_at = time.perf_counter(), []
    process = start(training_command(cache, epochs, checkpoints, False), log, env=TRAINING_ENV)
    while process.poll() is None:
        if (checkpoints / "last.pth").exists() and epochs_done(checkpoints) > len(saved_at):
            saved_at.append(time.perf_counter() - started)
        time.sleep(POLL_S)
    assert process.returncode == 0, log.read_text()
    epoch_s = (saved_at[-1] - saved_at[0]) / (len(saved_at) - 1)
    return saved_at[0] - epoch_s, epoch_s


def training_lane(directory, instants, cache, epochs, reference, startup_s, epoch_s):
    """Train, killing ncf.py at the instants (fractions of what is left of the run, or delays after a checkpoint
    file starts being written); after each kill the next run resumes; the last one runs to the end."""
    directory.mkdir()
    log, checkpoints = directory / "ncf.log", directory / "checkpoints"
    counts = Counter()

    def run(phase, when):
        done, resume = epochs_done(checkpoints), (checkpoints / "last.pth").exists()
        writing = new_files(checkpoints)
        process = start(training_command(cache, epochs, checkpoints, resume), log, env=TRAINING_ENV)
        if phase == "run":
            killed = kill_after(process, when * (startup_s + (epochs - done) * epoch_s))
        elif phase == "writes":
            killed = kill_while_writing(process, writing, when)
        else:  # to the end
            process.wait()
            killed = False
        output = log.read_text()
        if resume and "resuming after epoch" in output:
            assert f"resuming after epoch {done - 1} " in output, output  # from the last complete checkpoint
        counts["killed while writing a checkpoint"] += killed and writing()
        assert done <= epochs_done(checkpoints) <= epochs  # the checkpoints load, and never go back
        if not killed:
            assert process.returncode == 0, output
            assert same_run(checkpoints, reference)
            counts["resumed runs that finished" if resume else "runs that finished"] += 1
            counts["temporary files left in the checkpoint directory"] += len(
                set(os.listdir(checkpoints)) - {*CHECKPOINTS}
            )
            shutil.rmtree(checkpoints)  # the next run starts another
        counts["killed"] += killed

    for phase, when in instants:
        run(phase, when)
    # the last run resumes and goes to the end; when there is no checkpoint to resume from, one is made first
    while not (checkpoints / "last.pth").exists():
        process = start(training_command(cache, epochs, checkpoints, False), log, env=TRAINING_ENV)
        kill_while_writing(process, lambda: (checkpoints / "last.pth").exists(), 0)
    run("end", None)
    return counts


def test_training_killed_at_any_instant_resumes_from_its_last_checkpoint(tmp_path):
    """ncf.py is killed at instants spread over its run and right after it starts writing a checkpoint; the
    next run resumes (--resume, the same flags) from what last.pth holds, and is itself killed, until one run
    finishes: its checkpoints are those of a run that was never killed (training on CPU is deterministic)."""
    cache, epochs, reference = make_cache(tmp_path / "data"), 5, tmp_path / "reference"
    startup_s, epoch_s = uninterrupted_training(cache, epochs, reference, tmp_path / "reference.log")
    runs = [("run", fraction) for fraction in spread(8)]
    instants = runs[0::2] + [("writes", 0), ("writes", 0.002)] + runs[1::2] + [("writes", 0.001), ("writes", 0.004)]
    counts = in_lanes(
        lambda directory, share: training_lane(directory, share, cache, epochs, reference, startup_s, epoch_s),
        instants,
        tmp_path,
    )
    print(f"\nncf.py killed at {counts['killed']} instants: {dict(counts)}")
    assert counts["killed"] >= 10
    assert counts["resumed runs that finished"] >= LANES
    assert counts["temporary files left in the checkpoint directory"] == 0


# --- prepare_dataset.sh and download_dataset.sh -------------------------------------------------


def script_env(tmp_path, **extra):
    """The scripts run with the interpreter running the tests, and never reach the network."""
    return os.environ | {"PYTHON": sys.executable, "DATA_ROOT": str(tmp_path / "data_root")} | extra


def test_prepare_dataset_puts_back_a_cache_that_a_killed_conversion_moved_aside(tmp_path):
    lines = [f"u{user},i{(user * 7 + k) % 60},{1000 * user + k}" for user in range(12) for k in range(8)]
    (tmp_path / "my.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    command = ["bash", "prepare_dataset.sh", tmp_path / "my.csv", tmp_path / "raw", cache]
    env = script_env(tmp_path, CONVERT_ARGS="--min_ratings 5 --valid_negative 10")
    subprocess.run(list(map(str, command)), cwd=ROOT, env=env, check=True, capture_output=True)
    before = tree_digest(cache)
    # what convert.py leaves when killed between its two renames, and a half-written cache of another kill
    (tmp_path / ".cache.old-k1ll3d01").mkdir()
    os.replace(cache, tmp_path / ".cache.old-k1ll3d01" / "cache")
    (tmp_path / ".cache.tmp-k1ll3d02").mkdir()
    (tmp_path / ".cache.tmp-k1ll3d02" / "train_ratings.pt").write_bytes(b"PK")

    result = subprocess.run(list(map(str, command)), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cache is ready (delete it to rebuild)" in result.stdout  # no conversion: the cache was put back
    assert tree_digest(cache) == before
    assert leftovers(cache) == []


def test_download_killed_at_any_instant_leaves_the_ratings_file_whole_or_absent(tmp_path):
    """download_dataset.sh with the zip already in place (no network), killed at instants spread over its run
    and over its unpacking: the ratings file is whole or absent, and the next run unpacks it and removes the
    temporary folders that killed runs left (not a running one's: here, this process's)."""
    target = tmp_path / "raw"
    target.mkdir()
    ratings = np.random.default_rng(0).bytes(16 << 20)  # large enough for its unpacking to take a while
    with zipfile.ZipFile(target / "ml-100k.zip", "w") as archive:
        archive.writestr("ml-100k/u.data", ratings)
        archive.writestr("ml-100k/README", "a test copy\n")
    md5 = hashlib.md5((target / "ml-100k.zip").read_bytes()).hexdigest()
    env = script_env(tmp_path, NCF_DOWNLOAD_MD5=md5, NCF_DOWNLOAD_URL_BASE="http://127.0.0.1:9")
    command, log = ["bash", "download_dataset.sh", "ml-100k", target], tmp_path / "download.log"
    unpacked = target / "ml-100k" / "u.data"
    running = target / f".unpack.{os.getpid()}"  # a folder of a run that is still going
    running.mkdir()
    (target / ".unpack.Xy12ab").mkdir()  # as mktemp named them before

    def is_unpacking():
        return any(name.startswith(".unpack.") and name != running.name for name in os.listdir(target))

    started = time.perf_counter()
    assert start(command, log, env=env).wait() == 0, log.read_text()
    run_s = time.perf_counter() - started
    instants = [("run", run_s * f) for f in spread(8)] + [("unpacking", 0.01 * f) for f in spread(6)]
    killed = 0
    for phase, delay in instants:
        shutil.rmtree(target / "ml-100k")
        process = start(command, log, env=env)
        killed += kill_after(process, delay) if phase == "run" else kill_while_writing(process, is_unpacking, delay)
        assert not unpacked.exists() or unpacked.read_bytes() == ratings
        assert start(command, log, env=env).wait() == 0, log.read_text()
        assert unpacked.read_bytes() == ratings
        assert sorted(path.name for path in target.iterdir()) == sorted(["ml-100k", "ml-100k.zip", running.name])
    print(f"\ndownload_dataset.sh killed at {killed} instants")
    assert killed >= 8
