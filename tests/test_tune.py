"""tune.py end to end on a tiny validation cache: studies finish, resume, survive kill -9, share
a database between processes, prune, and refuse bad input in one line."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch

import ncf
import tune
from neumf import NeuMF
from utils import atomic_save, run_main

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
RUNNING = optuna.trial.TrialState.RUNNING
# Trials of about 0.3 s an epoch on the tiny cache: long enough to be caught running.
SLOW_TRIALS = ["--model", "gmf", "--fix", "batch_size=256", "negative_samples=10", "--pruner", "none"]


def tune_command(cache, storage, name, *flags):
    return [sys.executable, "tune.py", "--data", str(cache), "--storage", f"sqlite:///{storage}", "--study_name", name,
            *map(str, flags)]  # fmt: skip


def run_tune(*args, **kwargs):
    return subprocess.run(tune_command(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, **kwargs)


def load(storage, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")


def trial_lines(stdout):
    """{trial number: its progress line}."""
    return {int(line.split()[1].rstrip(":")): line for line in stdout.splitlines() if line.startswith("trial ")}


def wait_for(storage, name, condition):
    """Poll the study until condition(its trials) holds, as another process runs it."""
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = load(storage, name).trials
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # not made yet, or being made
            continue
        if trials and condition(trials):
            return
    raise AssertionError(f"study {name} never got there")


def reporting(trial):
    """Whether the trial runs and has reported an epoch."""
    return trial.state == RUNNING and trial.intermediate_values


def test_best_command_reproduces_and_a_rerun_adds_trials(tiny_validation_cache, tmp_path):
    storage, best_json = tmp_path / "study.db", tmp_path / "best.json"
    flags = ["--model", "neumf", "--epochs", 2, "--trials", 3, "--output", best_json]
    first = run_tune(tiny_validation_cache, storage, "s", *flags)
    assert first.returncode == 0, first.stderr
    assert sorted(trial_lines(first.stdout)) == [0, 1, 2]
    best = json.loads(best_json.read_text())
    study = load(storage, "s")
    assert best["value"] == best["val_hr@10"] == study.best_value and best["trial"] == study.best_trial.number
    assert study.user_attrs["tune"]["dataset"]["n_users"] == 60
    assert "learning_rate" in study.user_attrs["tune"]["search_space"]
    assert best["command"] in first.stdout

    # the printed command, run as is (plus where to write), gives the trial's validation HR
    command = shlex.split(best["command"])[1:] + ["--checkpoint_dir", tmp_path / "run", "--log_path", tmp_path / "l"]
    run = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line[5:]) for line in (tmp_path / "l").read_text().splitlines()]
    summary = next(r["data"] for r in records if r["step"] == [] and "best_val_accuracy" in r["data"])
    assert summary["best_val_accuracy"] == best["val_hr@10"]
    assert summary["best_epoch"] == best["epoch"]

    values = {trial.number: trial.value for trial in study.trials}
    again = run_tune(tiny_validation_cache, storage, "s", *flags, "--trials", 4)
    assert again.returncode == 0, again.stderr
    assert sorted(trial_lines(again.stdout)) == [3]  # one more, not a new study
    study = load(storage, "s")
    assert {trial.number: trial.value for trial in study.trials[:3]} == values and len(study.trials) == 4


def test_objective_ndcg_maximizes_validation_ndcg(tiny_validation_cache, tmp_path):
    storage, best_json = tmp_path / "study.db", tmp_path / "best.json"
    flags = ["--model", "gmf", "--epochs", 2, "--trials", 3, "--objective", "ndcg", "--output", best_json]
    result = run_tune(tiny_validation_cache, storage, "n", *flags)
    assert result.returncode == 0, result.stderr
    trials = load(storage, "n").trials
    assert [trial.value for trial in trials] == [trial.user_attrs["val_ndcg@10"] for trial in trials]
    best = json.loads(best_json.read_text())
    assert best["objective"] == "val_ndcg@10" and best["value"] == max(trial.value for trial in trials)


def test_a_killed_study_continues_and_reruns_the_killed_trial(tiny_validation_cache, tmp_path):
    storage = tmp_path / "study.db"
    flags = [*SLOW_TRIALS, "--epochs", 15, "--trials", 2, "--heartbeat", 1, "--output", tmp_path / "best.json"]
    process = subprocess.Popen(tune_command(tiny_validation_cache, storage, "k", *flags), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # the first trial, or the second when the first finished before a slow poll saw it running
    wait_for(storage, "k", lambda trials: reporting(trials[-1]))
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = load(storage, "k").trials[-1]
    assert killed.state == RUNNING and len(killed.intermediate_values) < 15

    rerun = run_tune(tiny_validation_cache, storage, "k", *flags)
    assert rerun.returncode == 0, rerun.stderr
    trials = load(storage, "k").trials
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL  # failed by its missing heartbeat
    finished = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    # the rerun may start a new trial before the killed one's heartbeat is stale (2 s): order is not fixed
    retried = [trial for trial in finished if trial.system_attrs.get("failed_trial") == killed.number]
    assert len(finished) == 2 and len(retried) == 1 and retried[0].params == killed.params


def test_ctrl_c_reports_the_best_trial_so_far(tiny_validation_cache, tmp_path):
    storage, best_json = tmp_path / "study.db", tmp_path / "best.json"
    # more trials than can finish before the signal, however slowly the study is polled
    flags = [*SLOW_TRIALS, "--epochs", 15, "--trials", 50, "--output", best_json]
    # Ctrl-C as in a terminal, also when this test runs as a background job (which ignores SIGINT, and
    # so would the child: Python installs its KeyboardInterrupt handler only over the default)
    process = subprocess.Popen(tune_command(tiny_validation_cache, storage, "i", *flags), cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    wait_for(storage, "i", lambda trials: len(trials) > 1 and reporting(trials[-1]))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    *finished, interrupted = load(storage, "i").trials
    assert interrupted.state == optuna.trial.TrialState.FAIL  # not counted
    assert finished and all(trial.state == optuna.trial.TrialState.COMPLETE for trial in finished)
    best = json.loads(best_json.read_text())["trial"]  # of equal values, whichever Optuna calls best
    assert finished[best].value == max(trial.value for trial in finished) and f"best: trial {best}," in out


def test_two_processes_share_one_study(tiny_validation_cache, tmp_path):
    storage = tmp_path / "study.db"
    flags = [*SLOW_TRIALS, "--epochs", 5, "--trials", 4, "--output", tmp_path / "best.json"]
    command = tune_command(tiny_validation_cache, storage, "c", *flags)
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    mine = [set(trial_lines(out)) for out, _ in outputs]
    assert mine[0] and mine[1] and not mine[0] & mine[1]  # both worked, never on the same trial
    trials = load(storage, "c").trials
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert len(trials) >= 4 and {trial.number for trial in trials} == mine[0] | mine[1]


def test_pruning_stops_a_trial_that_learns_nothing(tiny_validation_cache, tmp_path):
    storage = tmp_path / "study.db"
    fixed = ["batch_size=256", "negative_samples=4", "factors=16", "beta1=0.9", "beta2=0.999", "l2_regularization=0"]
    enqueued = [f"--enqueue=learning_rate={lr}" for lr in (0.01, 0.02, 0.005, 1e-6)]  # the median, then a tiny one
    result = run_tune(
        tiny_validation_cache, storage, "p", "--model", "gmf", "--epochs", 4, "--trials", 4, "--fix", *fixed,
        "--range", "learning_rate=0.000001:0.05", *enqueued, "--output", tmp_path / "best.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load(storage, "p").trials
    assert [trial.params["learning_rate"] for trial in trials] == [0.01, 0.02, 0.005, 1e-6]
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert len(trials[3].intermediate_values) < 4  # stopped before its last epoch
    assert "pruned after epoch" in trial_lines(result.stdout)[3]


def run_in_process(monkeypatch, capsys, *args):
    """tune.py's main as the command line runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tune.py", *map(str, args)])
    try:
        run_main(tune.main)
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trials", 0], "--trials must be at least 1"),
        (["--storage", "study.db"], "--storage must be a database URL"),
        (["--storage", "nosuch://x"], "cannot use the storage nosuch://x"),
        (["--storage", "sqlite:///{tmp}/no/such/dir/s.db"], "cannot use the storage"),
        (["--range", "factors=64:16"], "--range factors=64:16 is empty (low > high)"),
        (["--range", "learning_rate=0:0.1"], "log scale"),
        (["--fix", "factor=16"], "--fix: unknown parameter 'factor'"),
        (["--range", "dropout=0:0.5"], "--range: unknown parameter 'dropout'"),  # GMF has no dropout
        (["--enqueue", "lr=0.1"], "--enqueue: unknown parameter 'lr'"),
        (["--fix", "factors=sixteen"], "--fix factors needs an integer"),
        (["--fix", "beta1=1"], "--beta1 must be in [0, 1)"),
        (["--fix", "factors=8", "--range", "factors=8:16"], "factors is given more than once"),
        (["--patience", 0], "--patience must be at least 1"),
        (["--study_name", ""], "--study_name must not be empty"),
        (["--output", "{tmp}"], "is a directory"),
    ],
)
def test_bad_input_is_one_line(tiny_validation_cache, tmp_path, monkeypatch, capsys, flags, message):
    flags = [str(flag).replace("{tmp}", str(tmp_path)) for flag in flags]
    storage = ["--storage", f"sqlite:///{tmp_path}/s.db"]
    code, err = run_in_process(
        monkeypatch, capsys, "--data", tiny_validation_cache, "--model", "gmf", "--trials", 1, "--study_name", "b",
        "--epochs", 1, "--output", tmp_path / "best.json", *storage, *flags,
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("tune.py: error: ") and message in err


def test_an_output_that_cannot_be_written_is_refused_before_any_trial(
    tiny_validation_cache, tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("x")
    code, err = run_in_process(
        monkeypatch, capsys, "--data", tiny_validation_cache, "--model", "gmf", "--trials", 1, "--epochs", 1,
        "--study_name", "o", "--storage", f"sqlite:///{tmp_path}/s.db", "--output", tmp_path / "a_file" / "best.json",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and f"cannot write --output {tmp_path / 'a_file' / 'best.json'}" in err
    assert not (tmp_path / "s.db").exists()  # no study made, no trial run


def test_refuses_a_cache_without_validation_split(tiny_cache, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(
        monkeypatch, capsys, "--data", tiny_cache, "--trials", 1, "--study_name", "b", "--storage",
        f"sqlite:///{tmp_path}/s.db",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "has no validation split" in err and "--validation" in err


def test_refuses_a_study_of_another_search_or_dataset(tiny_validation_cache, tmp_path, monkeypatch, capsys):
    base = ["--model", "gmf", "--trials", 1, "--epochs", 1, "--study_name", "m", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--output", tmp_path / "best.json"]  # fmt: skip
    assert run_in_process(monkeypatch, capsys, "--data", tiny_validation_cache, *base)[0] == 0
    other = tmp_path / "other"  # the same files under another identity
    shutil.copytree(tiny_validation_cache, other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps(meta | {"source_sha256": "0" * 64}))
    code, err = run_in_process(monkeypatch, capsys, "--data", other, *base)
    assert code == 2 and err.count("\n") == 1 and "dataset source_sha256" in err and "0" * 64 in err
    code, err = run_in_process(monkeypatch, capsys, "--data", tiny_validation_cache, *base, "--fix", "factors=16")
    assert code == 2 and "search_space factors: 8..128 (log) there, fixed 16 here" in err
    code, err = run_in_process(monkeypatch, capsys, "--data", tiny_validation_cache, *base, "--epochs", 2)
    assert code == 2 and "settings epochs: 1 there, 2 here" in err


def test_pretrained_neumf_searches_the_fine_tuning(tiny_validation_cache, tmp_path, monkeypatch, capsys):
    data = ncf.load_cache(tiny_validation_cache)
    branches = {"gmf": NeuMF(data.n_users, data.n_items, 16, [32, 16], kind="gmf"),
                "mlp": NeuMF(data.n_users, data.n_items, 16, [32, 16], kind="mlp")}  # fmt: skip
    for kind, model in branches.items():
        atomic_save(model.state_dict(), tmp_path / f"{kind}.pth")
    flags = ["--data", tiny_validation_cache, "--trials", 2, "--epochs", 1, "--study_name", "p", "--storage",
             f"sqlite:///{tmp_path}/s.db", "--output", tmp_path / "best.json"]  # fmt: skip
    swapped = ["--pretrained_gmf", tmp_path / "mlp.pth", "--pretrained_mlp", tmp_path / "gmf.pth"]
    code, err = run_in_process(monkeypatch, capsys, *flags, *swapped)
    assert code == 2 and "holds a MLP model, not a GMF" in err
    pretrained = ["--pretrained_gmf", tmp_path / "gmf.pth", "--pretrained_mlp", tmp_path / "mlp.pth"]
    assert run_in_process(monkeypatch, capsys, *flags, *pretrained)[0] == 0
    space = load(tmp_path / "s.db", "p").user_attrs["tune"]["search_space"]
    assert space["optimizer"] == "one of adam, sgd" and "pretrain_alpha" in space and "factors" not in space
    command = json.loads((tmp_path / "best.json").read_text())["command"]
    assert "--factors 16 --layers 32 16" in command and f"--pretrained_gmf {tmp_path / 'gmf.pth'}" in command


@pytest.mark.parametrize("n_train", [100_000, 1_000_000, 20_000_000])
def test_the_largest_batch_takes_about_20_steps_an_epoch_under_any_loss_and_number_of_negatives(n_train):
    """An epoch is n_train * (1 + negatives) samples under BCE and n_train under a softmax loss; the largest
    batch searched, a power of two, is at most sqrt(2) times an epoch's twentieth under every loss and number
    of negatives searched (few huge steps learn nothing), and the smallest is 256 times smaller (or 256)."""
    space = tune.default_space("neumf", n_train, pretrained=False)
    batch, negatives = space["batch_size"], space["negative_samples"]
    assert set(space["loss"].choices) == {"bce", "softmax", "sampled_softmax"}
    epochs = [n_train] + [n_train * (1 + n) for n in range(negatives.low, negatives.high + 1)]
    for samples in epochs:
        assert batch.high <= samples / 20 * 2**0.5, samples
    assert batch.low == max(256, batch.high // 256)


@pytest.mark.parametrize(
    "fixes, kept, dropped",
    [
        ([], {"negative_samples", "softmax_negatives"}, set()),  # the loss searched: every loss's parameters
        (["loss=bce"], {"negative_samples"}, {"softmax_negatives"}),
        (["loss=sampled_softmax"], {"softmax_negatives"}, {"negative_samples"}),
        (["loss=softmax"], set(), {"negative_samples", "softmax_negatives"}),
    ],
)
def test_a_loss_parameter_is_searched_when_its_loss_can_be_drawn(fixes, kept, dropped):
    space, fixed = tune.narrowed_space(tune.default_space("gmf", 100_000, pretrained=False), fixes, [])
    assert kept <= space.keys() and not dropped & space.keys()


def test_a_trial_out_of_memory_is_pruned_and_the_study_goes_on(tiny_validation_cache, tmp_path, monkeypatch, capsys):
    """A trial whose parameters do not fit in the device's memory is a bad point of the search, not the end of it."""
    train, calls = ncf.train, []

    def first_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return train(*args, **kwargs)

    monkeypatch.setattr(ncf, "train", first_out_of_memory)
    code, err = run_in_process(
        monkeypatch, capsys, "--data", tiny_validation_cache, "--model", "gmf", "--trials", 2, "--epochs", 1,
        "--study_name", "m", "--storage", f"sqlite:///{tmp_path}/s.db", "--output", tmp_path / "best.json",
    )  # fmt: skip
    assert code == 0, err
    trials = load(tmp_path / "s.db", "m").trials
    assert [trial.state.name for trial in trials] == ["PRUNED", "COMPLETE"]
    assert json.loads((tmp_path / "best.json").read_text())["trial"] == 1
