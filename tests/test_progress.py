"""Progress lines in logs: utils.Progress on its own, and ncf.py writing them (rank 0 only) when its
stdout is a file and an epoch lasts longer than NCF_PROGRESS_INTERVAL seconds."""

import re

import pytest
from test_ncf import SMALL, run_ncf, torchrun

from utils import CliError, Progress

# "epoch 0: step 3/15  123,456 samples/s  2s left"
PROGRESS_LINE = re.compile(r"^epoch (\d+): step (\d+)/(\d+)  [\d,]+ samples/s  [\d,]+s left$")


def progress_steps(stdout):
    """(epoch, step, steps) of every progress line."""
    return [tuple(map(int, match.groups())) for match in map(PROGRESS_LINE.match, stdout.splitlines()) if match]


def test_a_line_per_interval_never_after_the_last_step(monkeypatch, capsys):
    monkeypatch.setenv("NCF_PROGRESS_INTERVAL", "0")
    progress = Progress(4, 4000, "epoch 0")
    for _ in range(4):
        progress.update()
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [PROGRESS_LINE.match(line).groups() for line in lines] == [("0", str(step), "4") for step in (1, 2, 3)]


@pytest.mark.parametrize("interval, enabled", [("3600", True), ("0", False)], ids=["short loop", "other rank"])
def test_silent_for_a_loop_shorter_than_the_interval_and_on_other_ranks(monkeypatch, capsys, interval, enabled):
    monkeypatch.setenv("NCF_PROGRESS_INTERVAL", interval)
    progress = Progress(50, 5000, "epoch 0", enabled)
    for _ in range(50):
        progress.update()
    progress.close()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("interval", ["soon", "-1", "inf"])
def test_a_bad_interval_is_a_one_line_error(monkeypatch, interval):
    monkeypatch.setenv("NCF_PROGRESS_INTERVAL", interval)
    with pytest.raises(CliError, match="NCF_PROGRESS_INTERVAL must be a number of seconds"):
        Progress(1, 1, "epoch 0")


def test_ncf_writes_progress_lines_to_a_log_file(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NCF_PROGRESS_INTERVAL", "0")  # every step of these tiny epochs is "long"
    run = run_ncf("--data", tiny_cache, *SMALL, "-e", 2, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json")
    run.expect_success()
    steps = progress_steps(run.stdout)  # run_ncf's stdout is a pipe, as a log file is: no tqdm bar
    n_steps = steps[0][2]
    assert n_steps > 2
    assert steps == [(epoch, step, n_steps) for epoch in (0, 1) for step in range(1, n_steps)]
    assert run.stdout.index("epoch 0: step 1/") < run.stdout.index("epoch 0: HR@10")


def test_ncf_writes_no_progress_lines_for_short_epochs(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("NCF_PROGRESS_INTERVAL", raising=False)  # the default: 20 s, longer than these epochs
    run = run_ncf("--data", tiny_cache, *SMALL, "-e", 1, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json")
    run.expect_success()
    assert "epoch 0: HR@10" in run.stdout and "step" not in run.stdout


def test_only_rank_zero_writes_progress_lines(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NCF_PROGRESS_INTERVAL", "0")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 1, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json", launcher=torchrun(),
    )  # fmt: skip
    run.expect_success()
    steps = progress_steps(run.stdout)
    n_steps = steps[0][2]  # both ranks take as many steps: a second writer would double every line
    assert steps == [(0, step, n_steps) for step in range(1, n_steps)]
