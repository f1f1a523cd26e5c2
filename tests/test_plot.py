"""plot.py: figures from ncf.py's logs and from an Optuna study, and its one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import plot
import utils
from utils import JsonLineLogger, run_main

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARAMS = {"data": "cache", "epochs": 3, "batch_size": 4096, "learning_rate": 0.0045, "topk": 10}


@pytest.fixture(autouse=True)
def close_figures():
    """Tests that make figures in this process leave none open for the next."""
    yield
    plot.plt.close("all")


def run(*args):
    command = [sys.executable, *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def write_log(path, runs):
    """A log in ncf.py's format, through the writer ncf.py uses: runs are (params, [epoch records])."""
    logger = JsonLineLogger(path)
    for params, epochs in runs:
        logger.log("PARAMETER", params)
        for epoch, data in enumerate(epochs):
            logger.log((epoch,), data)
        logger.log((), {"best_accuracy": max(data["hr@10"] for data in epochs)})
    logger.close()
    return path


def epochs(test_hr, valid_hr=None):
    records = []
    for epoch, hr in enumerate(test_hr):
        data = {"hr@10": hr, "ndcg@10": hr / 2, "train_loss": 0.5 - epoch / 10, "train_throughput": 1e5 + epoch}
        if valid_hr is not None:
            data |= {"val_hr@10": valid_hr[epoch], "val_ndcg@10": valid_hr[epoch] / 2}
        records.append(data)
    return records


def is_png(path):
    return path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


def test_figures_of_real_ncf_logs(tiny_cache, tmp_path):
    log = tmp_path / "runs.json"
    for seed in (1, 2):  # two runs of one configuration, appended to one log as ncf.py does
        result = run(
            "ncf.py", "--data", tiny_cache, "-e", 2, "-b", 4096, "--seed", seed, "--log_path", log,
            "--checkpoint_dir", tmp_path / f"checkpoints{seed}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    result = run("plot.py", log, "--output", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    names = ["hr.png", "ndcg.png", "loss.png", "throughput.png", "best_hr.png"]
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == sorted(names)
    assert all(is_png(tmp_path / "figures" / name) for name in names)
    runs = plot.read_runs(log)
    assert [run.label for run in runs] == ["runs#0", "runs#1"]
    assert [run.params["seed"] for run in runs] == [1, 2] and all(sorted(run.epochs) == [0, 1] for run in runs)


@pytest.mark.parametrize("with_validation", [False, True])
def test_one_line_per_run_and_split(tmp_path, with_validation):
    valid = [0.3, 0.4, 0.35] if with_validation else None
    logs = [write_log(tmp_path / f"run{seed}.json", [(PARAMS | {"seed": seed}, epochs([0.2, 0.3, 0.4], valid))])
            for seed in range(3)]  # fmt: skip
    runs = [run for log in logs for run in plot.read_runs(log)]
    figures = plot.log_figures(runs)
    lines_per_run = 2 if with_validation else 1
    for name in ("hr.png", "ndcg.png"):
        assert len(figures[name].axes[0].lines) == 3 * lines_per_run
    for name in ("loss.png", "throughput.png"):
        assert len(figures[name].axes[0].lines) == 3
    hr_lines = figures["hr.png"].axes[0].lines
    assert list(hr_lines[0].get_ydata()) == [0.2, 0.3, 0.4]
    if with_validation:
        assert list(hr_lines[1].get_ydata()) == valid and hr_lines[1].get_linestyle() == "--"
    # one configuration of three seeds: a box plot with one box of the three best HRs
    assert "best_hr.png" in figures
    expected_best = 0.3 if with_validation else 0.4  # test HR at the best validation epoch (epoch 1)
    assert [plot.best_hr(run, 10) for run in runs] == [expected_best] * 3


def test_mixed_logs_and_another_k(tmp_path):
    with_valid = write_log(tmp_path / "a.json", [(PARAMS, epochs([0.2, 0.3], [0.25, 0.2]))])
    without = write_log(tmp_path / "b.json", [(PARAMS | {"learning_rate": 0.001}, epochs([0.1, 0.2]))])
    figures = plot.log_figures(plot.read_runs(with_valid) + plot.read_runs(without))
    assert len(figures["hr.png"].axes[0].lines) == 3  # two for the run with validation, one for the other
    assert "best_hr.png" not in figures  # two configurations of one run each: no box plot

    at_5 = tmp_path / "k5.json"
    at_5.write_text(with_valid.read_text().replace("hr@10", "hr@5").replace("ndcg@10", "ndcg@5"))
    figures = plot.log_figures(plot.read_runs(at_5))
    assert figures["hr.png"].axes[0].get_ylabel() == "HR@5" and len(figures["hr.png"].axes[0].lines) == 2
    with pytest.raises(plot.CliError, match=r"K in \[5, 10\]"):
        plot.log_figures(plot.read_runs(at_5) + plot.read_runs(with_valid))


def test_resumed_run_continues_in_the_same_log(tmp_path):
    log = write_log(tmp_path / "r.json", [(PARAMS, epochs([0.2, 0.3]))])
    logger = JsonLineLogger(log)
    logger.log("PARAMETER", PARAMS | {"resume": True})
    logger.log((2,), epochs([0.1, 0.2, 0.5])[2])
    logger.close()
    [resumed] = plot.read_runs(log)
    assert resumed.series("hr@10") == ([0, 1, 2], [0.2, 0.3, 0.5])


def test_configurations_ignore_only_the_non_shaping_flags():
    def make(**changes):
        return plot.Run("r", PARAMS | changes, {0: {"hr@10": 0.5}})

    same = [make(seed=1, log_path="a", checkpoint_dir="x", device="cpu"), make(seed=2, log_path="b", device="cuda:0")]
    assert list(plot.configurations(same)) == [""]
    groups = plot.configurations([*same, make(seed=3, learning_rate=0.001), make(seed=4, batch_size=8192)])
    assert list(groups) == [
        "batch_size=4096 learning_rate=0.0045",
        "batch_size=4096 learning_rate=0.001",
        "batch_size=8192 learning_rate=0.0045",
    ]
    assert [len(runs) for runs in groups.values()] == [2, 1, 1]


def test_study_figures(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    study.optimize(lambda t: -((t.suggest_float("lr", 0, 1) - 0.3) ** 2) - 0.1 * t.suggest_int("layers", 1, 3), 6)
    result = run("plot.py", "--study", storage, "--study_name", "tiny", "--output", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in (tmp_path / "figures").iterdir())
    assert names == ["history.png", "importances.png"]
    assert all(is_png(tmp_path / "figures" / name) for name in names)

    result = run("plot.py", "--study", storage, "--study_name", "other", "--output", tmp_path / "figures")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"plot.py: error: {storage} has no study 'other' (it has: tiny)"


def test_bad_logs_and_storages_are_refused(tmp_path):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "text.json").write_text("epoch 0: HR@10 0.5\n")
    (tmp_path / "params_only.json").write_text('DLLL {"type": "LOG", "step": "PARAMETER", "data": {}}\n')
    cases = {"missing.json": "does not exist", "empty.json": "is empty", "text.json": "line 1 is not a DLLogger record"}
    cases["params_only.json"] = "holds no epoch records"
    for name, message in cases.items():
        with pytest.raises(plot.CliError, match=message):
            plot.read_runs(tmp_path / name)
    with pytest.raises(plot.CliError, match="no such SQLite file"):
        plot.study_figures(f"sqlite:///{tmp_path / 'none.db'}", "x")
    assert not (tmp_path / "none.db").exists()  # not created by the attempt
    with pytest.raises(plot.CliError, match="cannot open the storage nosuchdb://x"):
        plot.study_figures("nosuchdb://x", "x")


@pytest.mark.parametrize(
    "args, message",
    [(["text.json"], "text.json: line 1 is not a DLLogger record"), ([], "give either logs or --study")],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "text.json").write_text("epoch 0: HR@10 0.5\n")
    result = run("plot.py", *[tmp_path / arg for arg in args], "--output", tmp_path / "figures")
    assert result.returncode == 2
    assert result.stderr.startswith("plot.py: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"type": "LOG", "step": [0], "data": [1]}', "line 1: its data is not a JSON object"),
        ('{"type": "LOG", "step": "PARAMETER", "data": [1]}', "line 1: its data is not a JSON object"),
        ('{"type": "LOG", "step": [[0]], "data": {"hr@10": 0.1}}', "line 1: step [[0]] is not [epoch]"),
        ('{"type": "LOG", "step": ["a"], "data": {"hr@10": 0.1}}', "line 1: step ['a'] is not [epoch]"),
        ('{"type": "LOG", "step": [0], "data": {"hr@10": "x", "ndcg@10": 0.1}}', "epoch 0: hr@10 is 'x', not a number"),
    ],
)
def test_records_of_another_shape_are_one_line_errors(tmp_path, record, message):
    """JSON that parses but is not what ncf.py writes: refused with the line or epoch, not a traceback."""
    log = tmp_path / "log.json"
    log.write_text(f"DLLL {record}\n")
    with pytest.raises(plot.CliError) as error:
        plot.log_figures(plot.read_runs(log))
    assert message in str(error.value)


def test_a_directory_given_as_a_log_is_named_so(tmp_path):
    with pytest.raises(plot.CliError, match="is a directory, not a log"):
        plot.read_runs(tmp_path)


def test_figures_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """Each PNG goes to a temporary file beside it, renamed over it once complete: a failure before the
    rename leaves the previous figure as it was and no temporary file behind."""
    log = write_log(tmp_path / "a.json", [(PARAMS, epochs([0.2, 0.3]))])
    figures = tmp_path / "figures"
    monkeypatch.setattr(sys, "argv", ["plot.py", str(log), "--output", str(figures)])
    run_main(plot.main)
    before = {path.name: path.read_bytes() for path in figures.iterdir()}
    assert sorted(before) == ["hr.png", "loss.png", "ndcg.png", "throughput.png"]

    def fail(*_):
        raise OSError(28, "No space left on device")

    write_log(log, [(PARAMS, epochs([0.5, 0.1]))])  # another run: other figures
    monkeypatch.setattr(utils.os, "replace", fail)
    with pytest.raises(SystemExit) as exit_:
        run_main(plot.main)
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"plot.py: error: cannot write {figures / 'hr.png'}: No space left on device"
    )
    assert {path.name: path.read_bytes() for path in figures.iterdir()} == before


def test_a_study_of_pruned_trials_only_has_no_complete_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def pruned(trial):
        trial.suggest_float("lr", 0, 1)
        raise optuna.TrialPruned()

    optuna.create_study(study_name="p", storage=storage).optimize(pruned, 2)
    with pytest.raises(plot.CliError, match="study 'p' has no complete trial yet"):
        plot.study_figures(storage, "p")
