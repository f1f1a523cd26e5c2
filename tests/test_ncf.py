"""ncf.py end to end, as users run it: one process, DDP on CPU (gloo) under every launcher, test mode,
resume, AMP, gradient accumulation, logs, checkpoints, and every bad input of the contract.

Training subprocesses run with OMP_NUM_THREADS=1 (as the DDP launchers set it): on a busy 2-core
machine two OpenMP threads per process spin against each other and a tiny epoch takes 30x longer.
"""

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ncf
import utils
from convert import FORMAT_VERSION
from dataloading import TrainBatches
from neumf import NeuMF
from utils import CliError, Progress, free_port

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["-b", "1024", "-f", "8", "--layers", "16", "8", "--seed", "1"]
PER_EPOCH_KEYS = {
    "train_throughput",
    "hr@10",
    "ndcg@10",
    "train_epoch_time",
    "validation_epoch_time",
    "eval_throughput",
    "train_loss",
    "validation_loss",
}
FINAL_KEYS = {
    "best_train_throughput",
    "mean_train_throughput",
    "best_eval_throughput",
    "mean_eval_throughput",
    "best_accuracy",
    "best_epoch",
    "time_to_best_model",
}
REFERENCE_FLAGS = {
    "data",
    "epochs",
    "batch_size",
    "valid_batch_size",
    "factors",
    "layers",
    "negative_samples",
    "learning_rate",
    "topk",
    "seed",
    "threshold",
    "beta1",
    "beta2",
    "eps",
    "dropout",
    "checkpoint_dir",
    "load_checkpoint_path",
    "mode",
    "grads_accumulated",
    "amp",
    "log_path",
    "local_rank",
}
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    log: list  # the DLLL records of --log_path

    @property
    def parameters(self):
        return next(r["data"] for r in self.log if r["step"] == "PARAMETER")

    @property
    def epochs(self):
        """Per-epoch data, in the order logged."""
        records = [r for r in self.log if isinstance(r["step"], list) and len(r["step"]) == 1]
        return [r["data"] for r in records]

    @property
    def final(self):
        finals = [r["data"] for r in self.log if r["step"] == [] and "best_accuracy" in r["data"]]
        assert len(finals) == 1
        return finals[0]

    def expect_success(self):
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-5000:]}"
        assert "Traceback" not in self.stderr
        return self


def read_log(path):
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    assert all(line.startswith("DLLL ") for line in lines), lines
    return [json.loads(line.removeprefix("DLLL ")) for line in lines]


def torchrun():
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node=2", f"--master_port={free_port()}"]


def old_launch(use_env):
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}"]
    return command + ["--use_env"] * use_env


def run_ncf(*args, log_path, launcher=None, one_thread=True, timeout=300, env=None):
    """Run ncf.py from the repository root; returns its exit status, output and parsed log."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV} | (env or {})
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    command = [*(launcher or [sys.executable]), "ncf.py", *map(str, args), "--log_path", str(log_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, read_log(log_path))


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="session")
def trained(tiny_cache, tmp_path_factory):
    """The run most tests compare with: 3 epochs, seed 1."""
    directory = tmp_path_factory.mktemp("trained")
    run = run_ncf("--data", tiny_cache, *SMALL, "-e", 3, "--checkpoint_dir", directory, log_path=directory / "log.json")
    run.expect_success()
    run.dir = directory
    return run


@pytest.fixture(scope="session")
def torchrun_trained(tiny_cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("torchrun")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 2, "--checkpoint_dir", directory,
        log_path=directory / "log.json", launcher=torchrun(),
    )  # fmt: skip
    run.expect_success()
    run.dir = directory
    return run


# --- one process ------------------------------------------------------------------------------------


def test_training_writes_checkpoints_and_every_log_key(trained):
    assert REFERENCE_FLAGS | {"resume"} <= trained.parameters.keys()
    assert trained.parameters["seed"] == 1 and trained.parameters["world_size"] == 1
    assert [r["step"] for r in trained.log if isinstance(r["step"], list) and r["step"]] == [[0], [1], [2]]
    epochs = trained.epochs
    assert len(epochs) == 3
    for data in epochs:
        assert PER_EPOCH_KEYS <= data.keys()
        assert all(math.isfinite(data[key]) for key in PER_EPOCH_KEYS)
        assert 0 < data["ndcg@10"] <= data["hr@10"] <= 1  # each hit adds at most 1 to NDCG
        assert round(data["hr@10"] * 60) == pytest.approx(data["hr@10"] * 60, abs=1e-9)  # hits / 60 users
        assert 0 < data["train_loss"] < math.log(2) + 0.05 and data["validation_loss"] > 0
        assert min(data["train_throughput"], data["eval_throughput"], data["train_epoch_time"]) > 0
    assert epochs[2]["train_loss"] < epochs[0]["train_loss"]  # it learns

    final = trained.final
    assert FINAL_KEYS <= final.keys()
    assert "time_to_target" not in final  # the default threshold 1.0 is never reached here
    hrs = [data["hr@10"] for data in epochs]
    assert final["best_accuracy"] == max(hrs)
    assert final["best_epoch"] == hrs.index(max(hrs))
    throughputs = [data["train_throughput"] for data in epochs]
    assert final["best_train_throughput"] == max(throughputs)
    assert final["mean_train_throughput"] == pytest.approx(sum(throughputs) / 3)
    assert final["best_eval_throughput"] == max(data["eval_throughput"] for data in epochs)
    until_best = epochs[: final["best_epoch"] + 1]
    elapsed = sum(data["train_epoch_time"] + data["validation_epoch_time"] for data in until_best)
    assert final["time_to_best_model"] == pytest.approx(elapsed)

    lines = [line for line in trained.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"]
    assert f"HR@10 {hrs[0]:.4f}" in lines[0]


def test_checkpoints_hold_the_best_model_and_the_training_state(trained):
    best = state(trained.dir / "model.pth")
    assert list(best) == list(NeuMF(60, 200, 8, (16, 8)).state_dict())  # reference names, no module. prefix
    last = state(trained.dir / "last.pth")
    assert last["epochs_done"] == 3 and last["seed"] == 1
    assert {"model", "optimizer", "scaler"} <= last.keys()
    same = all(torch.equal(best[name], last["model"][name]) for name in best)
    assert same == (trained.final["best_epoch"] == 2)  # model.pth is the best epoch's, not the last one
    assert not any(path.name.endswith(".tmp") for path in trained.dir.iterdir())  # atomic writes leave none


def test_test_mode_reproduces_the_best_hr_in_one_process(trained, tmp_path):
    best_epoch = trained.epochs[trained.final["best_epoch"]]
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "--mode", "test",
        "--load_checkpoint_path", trained.dir / "model.pth",
        log_path=tmp_path / "log.json", one_thread=False,  # the user's default threads, not the training run's
    ).expect_success()  # fmt: skip
    result = run.log[-1]["data"]
    assert result["hr@10"] == trained.final["best_accuracy"]
    assert result["ndcg@10"] == best_epoch["ndcg@10"]
    assert f"HR@10 = {result['hr@10']:.4f}" in run.stdout
    assert not (tmp_path / "model.pth").exists()


def test_test_mode_reproduces_the_best_hr_in_two_processes(trained, tmp_path):
    best_epoch = trained.epochs[trained.final["best_epoch"]]
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "--mode", "test",
        "--load_checkpoint_path", trained.dir / "model.pth",
        log_path=tmp_path / "log.json", launcher=torchrun(),
    ).expect_success()  # fmt: skip
    assert run.parameters["world_size"] == 2
    result = run.log[-1]["data"]
    assert result["hr@10"] == trained.final["best_accuracy"]
    assert result["ndcg@10"] == pytest.approx(best_epoch["ndcg@10"], rel=1e-12)  # summed in another order
    assert run.stdout.count("HR@10 = ") == 1  # rank 0 only


@pytest.fixture(scope="session")
def two_epochs(trained, tmp_path_factory):
    """A second run of `trained`'s settings, 2 epochs: a repeat, and an interrupted run to resume."""
    directory = tmp_path_factory.mktemp("two_epochs")
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "-e", 2, "--checkpoint_dir", directory,
        log_path=directory / "log.json",
    ).expect_success()  # fmt: skip
    run.dir = directory
    return run


def test_seed_makes_cpu_runs_repeatable(trained, two_epochs):
    for again, first in zip(two_epochs.epochs, trained.epochs[:2], strict=True):
        for key in ("hr@10", "ndcg@10", "train_loss", "validation_loss"):
            assert again[key] == first[key], key


def test_resume_keeps_the_run_clock(two_epochs, tmp_path):
    for name in ("model.pth", "last.pth"):
        shutil.copy(two_epochs.dir / name, tmp_path / name)
    resumed = run_ncf(
        "--data", two_epochs.parameters["data"], *SMALL, "-e", 3, "-t", 0.0, "--resume", "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert len(resumed.epochs) == 1
    epochs = two_epochs.epochs + resumed.epochs
    # time_to_target counts the epochs before the interruption too, not only those up to the best one
    elapsed = sum(data["train_epoch_time"] + data["validation_epoch_time"] for data in epochs)
    assert resumed.final["time_to_target"] == pytest.approx(elapsed)
    until_best = epochs[: resumed.final["best_epoch"] + 1]
    best_time = sum(data["train_epoch_time"] + data["validation_epoch_time"] for data in until_best)
    assert resumed.final["time_to_best_model"] == pytest.approx(best_time)


def test_resume_continues_like_an_uninterrupted_run(trained, tmp_path):
    data = trained.parameters["data"]
    interrupted = run_ncf("--data", data, *SMALL, "-e", 1, "--checkpoint_dir", tmp_path, log_path=tmp_path / "a.json")
    interrupted.expect_success()
    assert state(tmp_path / "last.pth")["epochs_done"] == 1
    resumed = run_ncf(
        "--data", data, *SMALL, "-e", 3, "--resume", "--checkpoint_dir", tmp_path, log_path=tmp_path / "b.json"
    ).expect_success()
    assert "resuming after epoch 0" in resumed.stdout
    assert [r["step"] for r in resumed.log if isinstance(r["step"], list) and r["step"]] == [[1], [2]]
    for continued, uninterrupted in zip(interrupted.epochs + resumed.epochs, trained.epochs, strict=True):
        for key in ("hr@10", "ndcg@10", "train_loss", "validation_loss"):
            assert continued[key] == uninterrupted[key], key
    assert resumed.final["best_accuracy"] == trained.final["best_accuracy"]
    assert resumed.final["best_epoch"] == trained.final["best_epoch"]
    assert_same_tensors(state(tmp_path / "model.pth"), state(trained.dir / "model.pth"))
    assert_same_tensors(state(tmp_path / "last.pth")["model"], state(trained.dir / "last.pth")["model"])


def test_threshold_stops_early_and_logs_time_to_target(trained, tmp_path):
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "--seed", 2, "-e", 3, "-t", 0.0,
        "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert len(run.epochs) == 1
    final = run.final
    assert final["best_epoch"] == 0
    assert final["time_to_target"] == final["time_to_best_model"] > 0
    assert "reached the threshold" in run.stdout
    assert run.epochs[0]["train_loss"] != trained.epochs[0]["train_loss"]  # another seed, another run


def test_amp_trains_in_bf16_on_cpu(trained, tmp_path):
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "-e", 1, "--amp", "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert run.parameters["amp"] is True
    loss, fp32_loss = run.epochs[0]["train_loss"], trained.epochs[0]["train_loss"]
    assert math.isfinite(loss) and math.isfinite(run.epochs[0]["validation_loss"])
    assert loss != fp32_loss  # bf16 matmuls: not the fp32 numbers
    assert loss == pytest.approx(fp32_loss, abs=0.05)  # but the same training
    assert (tmp_path / "model.pth").exists()


def test_grads_accumulated_with_adam_steps_as_one_larger_batch(tiny_cache, tmp_path):
    """Adam does not see the factor G of the summed gradients (but through its eps): -b 735 with two
    batches per step takes the 10 steps of -b 1470 (an epoch's 14,700 samples leave no partial group),
    where -b 735 alone takes 20 and ends elsewhere (train loss 0.616 instead of 0.649)."""
    runs = {}
    for name, flags in {"whole": ["-b", 1470], "halves": ["-b", 735, "--grads_accumulated", 2]}.items():
        runs[name] = run_ncf(
            "--data", tiny_cache, *SMALL, *flags, "-e", 1, "--dropout", 0, "--checkpoint_dir", tmp_path / name,
            log_path=tmp_path / f"{name}.json",
        ).expect_success()  # fmt: skip
    whole, halves = runs["whole"].epochs[0], runs["halves"].epochs[0]
    assert runs["halves"].parameters["grads_accumulated"] == 2
    assert halves["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert halves["validation_loss"] == pytest.approx(whole["validation_loss"], rel=1e-4)


# --- DDP on CPU -------------------------------------------------------------------------------------


def assert_rank_zero_logged_once(run, epochs):
    assert run.parameters["world_size"] == 2 and run.parameters["device"] == "cpu"
    assert sum(r["step"] == "PARAMETER" for r in run.log) == 1
    assert len(run.epochs) == epochs
    assert run.stdout.count("epoch 0:") == 1


def test_torchrun_two_processes(torchrun_trained, tmp_path):
    assert_rank_zero_logged_once(torchrun_trained, epochs=2)
    for data in torchrun_trained.epochs:
        assert PER_EPOCH_KEYS <= data.keys() and math.isfinite(data["train_loss"])
    assert FINAL_KEYS <= torchrun_trained.final.keys()
    assert torchrun_trained.epochs[1]["train_loss"] < torchrun_trained.epochs[0]["train_loss"]
    # its best model, evaluated by one process, scores exactly the HR the two processes logged
    run = run_ncf(
        "--data", torchrun_trained.parameters["data"], *SMALL, "--mode", "test",
        "--load_checkpoint_path", torchrun_trained.dir / "model.pth", log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert run.log[-1]["data"]["hr@10"] == torchrun_trained.final["best_accuracy"]


@pytest.mark.parametrize("kind", ["gmf", "mlp"])
def test_torchrun_branch_with_validation_and_l2(tiny_validation_cache, tmp_path, kind):
    """GMF and MLP under DDP (2 gloo processes) on a validation cache, with the L2 term through DDP's model."""
    flags = [*SMALL, "--model", kind, "--l2_regularization", 0.01]
    run = run_ncf(
        "--data", tiny_validation_cache, *flags, "-e", 2, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json", launcher=torchrun(),
    ).expect_success()  # fmt: skip
    assert_rank_zero_logged_once(run, epochs=2)
    best = run.epochs[run.final["best_epoch"]]
    one = run_ncf(
        "--data", tiny_validation_cache, *flags, "--mode", "test", "--load_checkpoint_path", tmp_path / "model.pth",
        log_path=tmp_path / "test.json",
    ).expect_success()  # fmt: skip
    assert one.log[-1]["data"]["val_hr@10"] == best["val_hr@10"] and one.log[-1]["data"]["hr@10"] == best["hr@10"]


@pytest.mark.parametrize("use_env", [True, False], ids=["use_env", "local_rank_flag"])
def test_torch_distributed_launch_two_processes(torchrun_trained, tmp_path, use_env):
    run = run_ncf(
        "--data", torchrun_trained.parameters["data"], *SMALL, "-e", 1, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json", launcher=old_launch(use_env),
    ).expect_success()  # fmt: skip
    assert_rank_zero_logged_once(run, epochs=1)
    # without --use_env the launcher passes --local-rank=0 to rank 0 (which is the rank that logs)
    assert run.parameters["local_rank"] == (None if use_env else 0)
    # the same seed on the same world size: the very same first epoch as under torchrun
    for key in ("hr@10", "ndcg@10", "train_loss", "validation_loss"):
        assert run.epochs[0][key] == torchrun_trained.epochs[0][key], key


# --- the NCF family: GMF, MLP, pre-trained NeuMF ----------------------------------------------------


@pytest.fixture(scope="session")
def branches(tiny_cache, tmp_path_factory):
    """A GMF and an MLP trained 2 epochs each: {kind: Run}."""
    runs = {}
    for kind in ("gmf", "mlp"):
        directory = tmp_path_factory.mktemp(kind)
        run = run_ncf(
            "--data", tiny_cache, *SMALL, "-e", 2, "--model", kind, "--checkpoint_dir", directory,
            log_path=directory / "log.json",
        )  # fmt: skip
        run.expect_success()
        run.dir = directory
        runs[kind] = run
    return runs


def test_gmf_and_mlp_train_and_their_checkpoints_reproduce_in_test_mode(branches, tiny_cache, tmp_path):
    prefixes = {"gmf": {"mf_", "final"}, "mlp": {"mlp_", "mlp.", "final"}}
    for kind, run in branches.items():
        assert run.parameters["model"] == kind and run.stdout.startswith(f"{kind}: ")
        names = state(run.dir / "model.pth").keys()
        assert {name.split("embed")[0].split("0")[0].split("1")[0].split("weight")[0][:4] for name in names}
        assert all(any(name.startswith(prefix) for prefix in prefixes[kind]) for name in names), names
        assert all(PER_EPOCH_KEYS <= data.keys() for data in run.epochs)
        test_run = run_ncf(
            "--data", tiny_cache, *SMALL, "--model", kind, "--mode", "test",
            "--load_checkpoint_path", run.dir / "model.pth", log_path=tmp_path / f"{kind}.json",
        ).expect_success()  # fmt: skip
        assert test_run.log[-1]["data"]["hr@10"] == run.final["best_accuracy"]
        wrong = run_ncf(
            "--data", tiny_cache, *SMALL, "--mode", "test", "--load_checkpoint_path", run.dir / "model.pth",
            log_path=tmp_path / "wrong.json",
        )  # fmt: skip
        assert_clean_error(wrong, f"holds a {kind.upper()} model, not a NEUMF (--model)")


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_pretrained_neumf_starts_from_both_branches(branches, tiny_cache, tmp_path, alpha):
    gmf, mlp = (state(branches[kind].dir / "model.pth") for kind in ("gmf", "mlp"))
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 1, "--pretrained_gmf", branches["gmf"].dir / "model.pth",
        "--pretrained_mlp", branches["mlp"].dir / "model.pth", "--pretrain_alpha", alpha,
        "--optimizer", "sgd", "-l", 1e-30, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    neumf = state(tmp_path / "model.pth")  # one SGD step of 1e-30 changes nothing
    for name, tensor in (gmf | mlp).items():
        if not name.startswith("final"):
            assert torch.equal(neumf[name], tensor), name
    expected = torch.cat([alpha * gmf["final.weight"], (1 - alpha) * mlp["final.weight"]], dim=1)
    torch.testing.assert_close(neumf["final.weight"], expected)
    torch.testing.assert_close(neumf["final.bias"], alpha * gmf["final.bias"] + (1 - alpha) * mlp["final.bias"])
    assert run.parameters["optimizer"] == "sgd"


def test_patience_stops_after_epochs_without_a_better_hr(tiny_cache, tmp_path):
    # a learning rate too small to change the model: HR@10 never beats epoch 0's
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 10, "--patience", 2, "-l", 1e-30, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert len(run.epochs) == 3 and run.final["best_epoch"] == 0
    assert "no better hr@10 for 2 epochs; stopping" in run.stdout


def test_l2_regularization_shrinks_the_embeddings(tiny_cache, tmp_path):
    norms = {}
    for l2 in (0, 0.1):
        directory = tmp_path / str(l2)
        run_ncf(
            "--data", tiny_cache, *SMALL, "-e", 2, "--l2_regularization", l2, "--checkpoint_dir", directory,
            log_path=directory / "log.json",
        ).expect_success()  # fmt: skip
        model = state(directory / "last.pth")["model"]
        norms[l2] = sum(model[name].norm() for name in model if "embed" in name)
    assert norms[0.1] < 0.8 * norms[0]


# --- a validation split: model selection never looks at the test set -------------------------------


@pytest.fixture(scope="session")
def validated(tiny_validation_cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("validated")
    run = run_ncf(
        "--data", tiny_validation_cache, *SMALL, "-e", 4, "--checkpoint_dir", directory,
        log_path=directory / "log.json",
    ).expect_success()  # fmt: skip
    run.dir = directory
    return run


def test_validation_split_is_evaluated_and_selects_the_model(validated, tiny_validation_cache, tmp_path):
    epochs, final = validated.epochs, validated.final
    for data in epochs:
        assert PER_EPOCH_KEYS | {"val_hr@10", "val_ndcg@10", "val_loss"} <= data.keys()
        assert 0 < data["val_ndcg@10"] <= data["val_hr@10"] <= 1
    val_hrs = [data["val_hr@10"] for data in epochs]
    best = val_hrs.index(max(val_hrs))
    assert final["best_epoch"] == best and final["best_val_accuracy"] == max(val_hrs)
    assert final["best_accuracy"] == epochs[best]["hr@10"]  # the test HR at the validation-selected epoch
    assert "model selection on the validation split" in validated.stdout
    run = run_ncf(
        "--data", tiny_validation_cache, *SMALL, "--mode", "test", "--load_checkpoint_path",
        validated.dir / "model.pth", log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    result = run.log[-1]["data"]
    assert result["hr@10"] == final["best_accuracy"] and result["val_hr@10"] == final["best_val_accuracy"]
    assert result["ndcg@10"] == epochs[best]["ndcg@10"] and result["val_ndcg@10"] == epochs[best]["val_ndcg@10"]


def test_selection_follows_validation_when_test_peaks_elsewhere(tiny_validation_cache, tmp_path, monkeypatch):
    """A hand-made run: validation HR@10 peaks in epoch 1, test HR@10 in epoch 3."""
    val_hrs, test_hrs = [0.2, 0.5, 0.4, 0.3, 0.1], [0.1, 0.2, 0.3, 0.9, 0.4]
    snapshots = []

    def scripted(model, evaluators, args, autocast):
        assert set(evaluators) == {"valid", "test"}
        epoch = len(snapshots)
        snapshots.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        metrics = {"hr@10": test_hrs[epoch], "ndcg@10": test_hrs[epoch] / 2, "validation_loss": 0.5}
        return metrics | {"val_hr@10": val_hrs[epoch], "val_ndcg@10": val_hrs[epoch] / 2, "val_loss": 0.5}, 1

    monkeypatch.setattr(ncf, "evaluate_splits", scripted)
    args = ncf.parse_args(
        list(map(str, ["--data", tiny_validation_cache, *SMALL, "-e", 5, "--checkpoint_dir", tmp_path]))
    )
    data = ncf.load_cache(args.data)
    model = ncf.make_model(args, data, torch.device("cpu"))
    evaluators = ncf.make_evaluators(args, data, 0, 1, torch.device("cpu"))
    logger = ncf.make_logger(tmp_path / "log.json", True)
    best = ncf.train(model, evaluators, data, 1, args, torch.device("cpu"), 0, 1, logger, lambda *_: None)
    logger.close()
    assert best["epoch"] == 1 and best["hr"] == 0.2 and best["val_hr"] == 0.5
    final = read_log(tmp_path / "log.json")[-1]["data"]
    assert (final["best_accuracy"], final["best_val_accuracy"], final["best_epoch"]) == (0.2, 0.5, 1)
    assert_same_tensors(state(tmp_path / "model.pth"), snapshots[1])
    assert state(tmp_path / "last.pth")["best"]["epoch"] == 1


def test_resume_refuses_a_cache_with_another_split(validated, tiny_cache, tmp_path):
    shutil.copy(validated.dir / "last.pth", tmp_path / "last.pth")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 5, "--resume", "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    )  # fmt: skip
    assert_clean_error(run, "was trained on a cache with a validation split and --data has none")


# --- bad input --------------------------------------------------------------------------------------


def assert_clean_error(run, *fragments):
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("ncf.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in run.stdout + run.stderr


def copy_cache(source, directory, **metadata_changes):
    copy = directory / "cache"
    shutil.copytree(source, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps(meta | metadata_changes))
    return copy


def missing_cache(cache, trained, tmp):
    return ["--data", tmp / "nowhere"], ["is not a data cache", "convert.py"]


def corrupt_cache(cache, trained, tmp):
    copy = copy_cache(cache, tmp)
    (copy / "train_ratings.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return ["--data", copy], ["train_ratings.pt is corrupt"]


def old_version_cache(cache, trained, tmp):
    return ["--data", copy_cache(cache, tmp, format_version=0)], [f"cache format 0, expected {FORMAT_VERSION}"]


def corrupt_checkpoint(cache, trained, tmp):
    (tmp / "model.pth").write_bytes((trained.dir / "model.pth").read_bytes()[:300])
    return ["--data", cache, "--mode", "test", "--load_checkpoint_path", tmp / "model.pth"], ["is corrupt"]


def other_dataset_checkpoint(cache, trained, tmp):
    model = NeuMF(70, 200, 8, (16, 8))  # another dataset's users; saved from DDP, as the reference does
    torch.save({f"module.{name}": tensor for name, tensor in model.state_dict().items()}, tmp / "model.pth")
    args = ["--data", cache, "--mode", "test", "--load_checkpoint_path", tmp / "model.pth"]
    return args, ["mf_user_embed.weight is [70, 8] there but [60, 8] here"]


def other_shape_checkpoint(cache, trained, tmp):
    args = ["--data", cache, "-f", 16, "--mode", "test", "--load_checkpoint_path", trained.dir / "model.pth"]
    return args, ["mf_user_embed.weight is [60, 8] there but [60, 16] here"]


def other_shape_checkpoint_to_start_from(cache, trained, tmp):
    args = ["--data", cache, "--layers", 32, 8, "--load_checkpoint_path", trained.dir / "model.pth"]
    return args, ["mlp_user_embed.weight is [60, 8] there but [60, 16] here"]


def odd_first_layer(cache, trained, tmp):
    return ["--data", cache, "--layers", 15, 8], ["--layers", "even", "[15, 8]"]


def mode_test_without_checkpoint(cache, trained, tmp):
    return ["--data", cache, "--mode", "test"], ["--mode test needs --load_checkpoint_path"]


def resume_without_training_state(cache, trained, tmp):
    return ["--data", cache, "--resume", "--checkpoint_dir", tmp], [f"{tmp / 'last.pth'} does not exist"]


def resume_on_another_dataset(cache, trained, tmp):
    shutil.copy(trained.dir / "last.pth", tmp / "last.pth")
    other = copy_cache(cache, tmp, source_sha256="0" * 64)  # same shapes, other source file
    return ["--data", other, "-e", 5, "--resume", "--checkpoint_dir", tmp], ["another dataset"]


def resume_with_other_settings(cache, trained, tmp):
    shutil.copy(trained.dir / "last.pth", tmp / "last.pth")
    flags = [*SMALL[:-2], "--seed", 2, "-l", 0.01, "-e", 5, "--resume", "--checkpoint_dir", tmp]
    return ["--data", cache, *flags], [
        "is another run",
        "--learning_rate 0.01 (the run has 0.0045)",
        "--seed 2 (the run has 1)",
    ]


def checkpoint_dir_is_a_file(cache, trained, tmp):
    (tmp / "a_file").write_text("x")
    return ["--data", cache, "--checkpoint_dir", tmp / "a_file"], [f"cannot write checkpoints in {tmp / 'a_file'}"]


def gmf_start_for_neumf(cache, trained, tmp):
    torch.save(NeuMF(60, 200, 8, (16, 8), kind="gmf").state_dict(), tmp / "gmf.pth")
    return ["--data", cache, "--load_checkpoint_path", tmp / "gmf.pth"], ["holds a GMF model, not a NEUMF (--model)"]


def pretrained_of_the_wrong_kind(cache, trained, tmp):
    torch.save(NeuMF(60, 200, 8, (16, 8), kind="mlp").state_dict(), tmp / "mlp.pth")
    flags = ["--pretrained_gmf", tmp / "mlp.pth", "--pretrained_mlp", tmp / "mlp.pth"]
    return ["--data", cache, *flags], [f"{tmp / 'mlp.pth'} holds a MLP model, not a GMF"]


def pretrained_of_another_size(cache, trained, tmp):
    torch.save(NeuMF(60, 200, 8, (16, 8), kind="gmf").state_dict(), tmp / "gmf.pth")
    torch.save(NeuMF(60, 200, 8, (32, 8), kind="mlp").state_dict(), tmp / "mlp.pth")
    flags = ["--pretrained_gmf", tmp / "gmf.pth", "--pretrained_mlp", tmp / "mlp.pth"]
    return ["--data", cache, *flags], ["mlp_user_embed.weight is [60, 16] there but [60, 8] here"]


def flag_error(*flags_and_fragment):
    """A bad-input case of flags alone: flag_error(flag, value, ..., expected message fragment)."""
    *flags, fragment = flags_and_fragment

    def case(cache, trained, tmp):
        return ["--data", cache, *flags], [fragment]

    case.__name__ = "flags_" + "_".join(str(flag).lstrip("-") for flag in flags)
    return case


FLAG_ERRORS = [
    flag_error("-l", -0.1, "--learning_rate must be positive and finite, got -0.1"),
    flag_error("-l", "nan", "--learning_rate must be positive and finite, got nan"),
    flag_error("-l", "inf", "--learning_rate must be positive and finite, got inf"),
    flag_error("-b1", 1.0, "--beta1 must be in [0, 1), got 1.0"),
    flag_error("-b2", -0.5, "--beta2 must be in [0, 1), got -0.5"),
    flag_error("--eps=-0.5", "--eps must be in [0, inf), got -0.5"),
    flag_error("--dropout", "nan", "--dropout must be in [0, 1), got nan"),
    flag_error("--l2_regularization", -1, "--l2_regularization must be in [0, inf), got -1.0"),
    flag_error("--pretrain_alpha", 1.5, "--pretrain_alpha must be in [0, 1], got 1.5"),
    flag_error("--patience", 0, "--patience must be at least 1"),
    flag_error("--threshold", "nan", "--threshold must be a number"),
    flag_error("--model", "gmf", "--pretrained_gmf", "g.pth", "--pretrained_mlp", "m.pth", "it needs --model neumf"),
    flag_error("--pretrained_gmf", "g.pth", "needs both --pretrained_gmf and --pretrained_mlp"),
    flag_error("--pretrained_gmf", "g.pth", "--pretrained_mlp", "m.pth", "--resume", "start a new training run"),
]


BAD_INPUTS = [
    missing_cache,
    corrupt_cache,
    old_version_cache,
    corrupt_checkpoint,
    other_dataset_checkpoint,
    other_shape_checkpoint,
    other_shape_checkpoint_to_start_from,
    odd_first_layer,
    mode_test_without_checkpoint,
    resume_without_training_state,
    resume_on_another_dataset,
    resume_with_other_settings,
    checkpoint_dir_is_a_file,
    gmf_start_for_neumf,
    pretrained_of_the_wrong_kind,
    pretrained_of_another_size,
    *FLAG_ERRORS,
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.__name__ for case in BAD_INPUTS])
def test_bad_input_is_one_clean_line(case, tiny_cache, trained, tmp_path):
    args, fragments = case(tiny_cache, trained, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.glob("*.pth")}
    run = run_ncf(*SMALL, "--checkpoint_dir", tmp_path, *args, log_path=tmp_path / "log.json")
    assert_clean_error(run, *fragments)
    assert {path: path.read_bytes() for path in tmp_path.glob("*.pth")} == before


def test_log_path_in_a_new_directory_and_an_unwritable_one(tiny_cache, tmp_path):
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 1, "--checkpoint_dir", tmp_path, log_path=tmp_path / "a" / "log.json"
    )
    run.expect_success()
    assert run.final["best_epoch"] == 0
    (tmp_path / "a_file").write_text("x")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-e", 1, "--checkpoint_dir", tmp_path, log_path=tmp_path / "a_file" / "log"
    )
    assert_clean_error(run, "cannot write the log")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    for name in ("model.pth", "last.pth"):
        shutil.copy(trained.dir / name, tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in ("model.pth", "last.pth")}
    run = run_ncf(
        "--data", trained.parameters["data"], *SMALL, "-e", 2, "-l", 1e30, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    )  # fmt: skip
    assert_clean_error(run, "diverged in epoch 0", "(loss nan)", "kept")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pth", "log.json", "model.pth"]


def test_ddp_batch_smaller_than_world_size(tiny_cache, tmp_path):
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "-b", 1, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json",
        launcher=torchrun(),
    )  # fmt: skip
    assert run.returncode != 0
    assert "ncf.py: error: the batch size (1) must be at least the number of processes (2)" in run.stderr
    assert not (tmp_path / "model.pth").exists()


# --- real data --------------------------------------------------------------------------------------


def test_real_ml100k_smoke(shared_data, tmp_path):
    cache = tmp_path / "ml-100k"
    subprocess.run(
        [sys.executable, "convert.py", "--path", shared_data / "ml-100k" / "u.data", "--output", cache],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    run = run_ncf(
        "--data", cache, "-e", 1, "-b", 16384, "-f", 8, "--layers", 32, 16, 8, "--seed", 1,
        "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    # measured over 18 seeds: HR@10 0.40-0.42, NDCG@10 0.21-0.23 (popularity ~0.39); random scores give
    # HR ~0.10 +- 0.01 over 943 users, so 0.30 separates a working model from a broken one by far
    assert run.epochs[0]["hr@10"] > 0.30
    assert run.epochs[0]["ndcg@10"] > 0.15


# --- in-process helpers -----------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: to take ncf's CUDA branches on CPU tensors
NO_AUTOCAST = contextlib.nullcontext()


def quiet_progress():
    return Progress(1, 1, "", enabled=False)


def small_setup(cache, *flags):
    """(args, data, model on the CPU, this epoch's batches of 256 samples) of SMALL's settings and `flags`."""
    args = ncf.parse_args(list(map(str, ["--data", cache, *SMALL, "--dropout", 0, *flags])))
    data = ncf.load_cache(args.data)
    torch.manual_seed(args.seed)
    model = ncf.make_model(args, data, CPU)
    batches = TrainBatches(data.train, data.n_items, args.negative_samples, 256, 0, 1, CPU).epoch(seed=0)
    return args, data, model, batches


def train_in_process(cache, checkpoint_dir, *flags, on_epoch=None):
    """ncf.py's training in this process, as main() runs it; returns the log's records."""
    args = ncf.parse_args(list(map(str, ["--data", cache, *SMALL, *flags, "--checkpoint_dir", checkpoint_dir])))
    data = ncf.load_cache(args.data)
    torch.manual_seed(args.seed)
    model = ncf.make_model(args, data, CPU)
    evaluators = ncf.make_evaluators(args, data, 0, 1, CPU)
    logger = ncf.make_logger(Path(checkpoint_dir) / "log.json", True)
    try:
        ncf.train(model, evaluators, data, args.seed, args, CPU, 0, 1, logger, lambda *_: None, on_epoch=on_epoch)
    finally:
        logger.close()
    return read_log(Path(checkpoint_dir) / "log.json")


def assert_same_parameters(model, other, **tolerance):
    for (name, mine), theirs in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name, **tolerance)


# --- --grads_accumulated: G whole batches per step, their mean losses' gradients summed ----------------


def test_accumulated_batches_step_as_one_batch_g_times_larger_and_a_partial_group_is_dropped(tiny_cache):
    """The documented scaling: G batches of B samples accumulate the SUM of their mean-loss gradients,
    which is G times the mean-loss gradient of the one batch of G * B samples they make up; so plain SGD
    with learning rate lr on the G batches steps as SGD with G * lr on the big batch. The batches after
    the last whole group of the epoch are not trained on (the reference drops them)."""
    G, lr = 3, 0.5
    args, _, model, batches = small_setup(tiny_cache, "--optimizer", "sgd", "-l", lr, "--grads_accumulated", G)
    big_batch_model = copy.deepcopy(model)
    before = [param.detach().clone() for param in model.parameters()]

    epoch = batches[: 2 * G + 1]  # two whole groups, then one batch that does not fill a group
    scaler = ncf.make_scaler(args, CPU)
    loss_sum, samples = ncf.train_epoch(
        ncf.BCE(model), ncf.make_optimizer(model, args, CPU), scaler, epoch, args, NO_AUTOCAST, quiet_progress()
    )
    assert samples == 2 * G * 256

    big_args = ncf.parse_args(list(map(str, ["--data", tiny_cache, "--optimizer", "sgd", "-l", G * lr])))
    big_batches = [tuple(torch.cat(parts) for parts in zip(*epoch[i : i + G], strict=True)) for i in (0, G)]
    big_loss_sum, big_samples = ncf.train_epoch(
        ncf.BCE(big_batch_model), ncf.make_optimizer(big_batch_model, big_args, CPU), scaler, big_batches, big_args,
        NO_AUTOCAST, quiet_progress(),
    )  # fmt: skip
    assert big_samples == samples
    assert_same_parameters(model, big_batch_model, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_sum, big_loss_sum, rtol=1e-5, atol=0)  # the same forward passes
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(before, model.parameters(), strict=True))


def test_grads_accumulated_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        ncf.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    entry = help_text[help_text.rindex("--grads_accumulated") :].split(" --amp")[0]  # the entry, not the usage
    assert "whole batches" in entry and "summed" in entry and "dropped" in entry


def test_grads_accumulated_steps_with_ddp_as_one_larger_batch(tiny_cache, tmp_path):
    """Two gloo ranks (DDP, no_sync within a group): -b 1470 -G 2 with SGD at lr trains the model that
    -b 2940 does at 2 lr (each rank's local batch of 1470 is its two consecutive local batches of 735).
    The 14,700 samples of an epoch divide evenly, so no group is partial."""
    runs = {}
    settings = {"accumulated": ["-b", 1470, "--grads_accumulated", 2, "-l", 0.5], "big": ["-b", 2940, "-l", 1.0]}
    for name, flags in settings.items():
        directory = tmp_path / name
        runs[name] = run_ncf(
            "--data", tiny_cache, *SMALL, *flags, "--optimizer", "sgd", "--dropout", 0, "-e", 1,
            "--checkpoint_dir", directory, log_path=directory / "log.json", launcher=torchrun(),
        ).expect_success()  # fmt: skip
    accumulated, big = (state(tmp_path / name / "last.pth")["model"] for name in ("accumulated", "big"))
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6, msg=name)
    epochs = runs["accumulated"].epochs[0], runs["big"].epochs[0]
    assert epochs[0]["train_loss"] == pytest.approx(epochs[1]["train_loss"], rel=1e-6)


def test_fewer_batches_than_one_accumulation_group_is_refused(tiny_cache, tmp_path):
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "--grads_accumulated", 16, "--checkpoint_dir", tmp_path,
        log_path=tmp_path / "log.json",
    )  # fmt: skip
    assert_clean_error(run, "--grads_accumulated 16", "15 batches")
    assert not (tmp_path / "last.pth").exists()


# --- apex, as NVIDIA's containers have it -----------------------------------------------------------


class FakeFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's interface and state layout, with Adam's arithmetic done on the CPU:
    its constructor's arguments, zero_grad() without arguments, the step count kept per parameter group
    (apex's kernels take one count per group), exp_avg / exp_avg_sq per parameter, and a RuntimeError
    from the constructor when apex was built without its CUDA extensions."""

    cuda_extensions = True

    def __init__(
        self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
        weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False, use_master=False,
    ):  # fmt: skip
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.set_grad_none = set_grad_none
        if not self.cuda_extensions:
            raise RuntimeError("apex.optimizers.FusedAdam requires cuda extensions")

    def zero_grad(self):
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    @torch.no_grad()
    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            correction1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            correction2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (state["exp_avg_sq"] / correction2).sqrt_().add_(group["eps"])
                param.addcdiv_(state["exp_avg"] / correction1, denominator, value=-group["lr"])


@pytest.fixture
def apex(monkeypatch):
    """apex importable, with FakeFusedAdam as apex.optimizers.FusedAdam."""
    package, optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    optimizers.FusedAdam, package.optimizers = FakeFusedAdam, optimizers
    monkeypatch.setitem(sys.modules, "apex", package)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    monkeypatch.setattr(FakeFusedAdam, "cuda_extensions", True)
    return optimizers


@pytest.mark.parametrize("amp", [False, True])
def test_apex_fused_adam_only_without_a_grad_scaler(apex, amp):
    args = ncf.parse_args(["--data", "unused", *(["--amp"] if amp else [])])
    model = torch.nn.Linear(2, 1)
    on_cuda = ncf.make_optimizer(model, args, CUDA)
    # with --amp, GradScaler would sync with the host every step around apex's optimizer
    assert type(on_cuda) is (torch.optim.Adam if amp else FakeFusedAdam)
    assert on_cuda.defaults["betas"] == (0.25, 0.5) and on_cuda.defaults["lr"] == 0.0045
    on_cpu = ncf.make_optimizer(model, args, CPU)
    assert type(on_cpu) is torch.optim.Adam and on_cpu.defaults["fused"]
    assert on_cpu.defaults["betas"] == (0.25, 0.5)


def test_apex_fused_adam_trains_through_train_epoch(apex, tiny_cache):
    """ncf's CUDA branch with apex's optimizer, on CPU tensors: its zero_grad() takes no set_to_none."""
    args, _, model, batches = small_setup(tiny_cache)
    optimizer = ncf.make_optimizer(model, args, CUDA)
    assert type(optimizer) is FakeFusedAdam
    before = [param.detach().clone() for param in model.parameters()]
    for _ in range(2):
        ncf.train_epoch(
            ncf.BCE(model), optimizer, ncf.make_scaler(args, CUDA), batches, args, NO_AUTOCAST, quiet_progress()
        )
    assert optimizer.param_groups[0]["step"] == 2 * len(batches)
    assert all(param.grad is None for param in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_apex_without_its_cuda_extensions_falls_back_to_torch_fused_adam(apex, monkeypatch, capsys):
    monkeypatch.setattr(FakeFusedAdam, "cuda_extensions", False)
    ncf.note.cache_clear()
    args = ncf.parse_args(["--data", "unused"])
    for _ in range(2):
        optimizer = ncf.make_optimizer(torch.nn.Linear(2, 1), args, CUDA)
        assert type(optimizer) is torch.optim.Adam and optimizer.defaults["fused"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1  # said once
    assert "requires cuda extensions" in lines[0] and "torch's fused Adam" in lines[0]


@pytest.mark.parametrize("saved_by, resumed_by", [("apex", "torch"), ("torch", "apex")])
def test_resume_converts_the_adam_state_between_apex_and_torch(apex, tiny_cache, tmp_path, saved_by, resumed_by):
    """A run saved with apex's FusedAdam (step count per group) continues under torch's fused Adam (per
    parameter), and the reverse, as if uninterrupted: the bias correction continues from the saved step."""
    devices = {"apex": CUDA, "torch": CPU}  # make_optimizer picks apex on CUDA only
    args, data, model, batches = small_setup(tiny_cache, "-l", 0.01)
    scaler = ncf.make_scaler(args, CPU)
    optimizer = ncf.make_optimizer(model, args, devices[saved_by])
    ncf.train_epoch(ncf.BCE(model), optimizer, scaler, batches[:5], args, NO_AUTOCAST, quiet_progress())
    best = {"hr": 0.0, "val_hr": -1.0, "epoch": 0, "time": 0.0}
    ncf.save_training_state(tmp_path / "last.pth", model, optimizer, scaler, 0, 1, best, data, 0.0, args)
    ncf.train_epoch(ncf.BCE(model), optimizer, scaler, batches[5:8], args, NO_AUTOCAST, quiet_progress())

    resumed = ncf.make_model(args, data, CPU)
    resumed_optimizer = ncf.make_optimizer(resumed, args, devices[resumed_by])
    assert (type(optimizer), type(resumed_optimizer)) != (FakeFusedAdam,) * 2
    ncf.load_training_state(tmp_path / "last.pth", resumed, resumed_optimizer, scaler, data, args)
    ncf.train_epoch(ncf.BCE(resumed), resumed_optimizer, scaler, batches[5:8], args, NO_AUTOCAST, quiet_progress())
    assert_same_parameters(resumed, model)
    if resumed_by == "torch":
        assert resumed_optimizer.param_groups[0]["fused"]  # still the fused implementation
        assert {int(s["step"]) for s in resumed_optimizer.state.values()} == {8}
    else:
        assert resumed_optimizer.param_groups[0]["step"] == 8


def test_resume_refuses_an_adam_state_whose_parameters_took_different_numbers_of_steps(apex, tiny_cache, tmp_path):
    args, data, model, batches = small_setup(tiny_cache)
    scaler = ncf.make_scaler(args, CPU)
    optimizer = ncf.make_optimizer(model, args, CPU)
    ncf.train_epoch(ncf.BCE(model), optimizer, scaler, batches[:2], args, NO_AUTOCAST, quiet_progress())
    next(iter(optimizer.state.values()))["step"] += 1
    best = {"hr": 0.0, "val_hr": -1.0, "epoch": 0, "time": 0.0}
    ncf.save_training_state(tmp_path / "last.pth", model, optimizer, scaler, 0, 1, best, data, 0.0, args)
    with pytest.raises(CliError, match="different numbers of steps"):
        ncf.load_training_state(tmp_path / "last.pth", model, ncf.make_optimizer(model, args, CUDA), scaler, data, args)


def test_loss_scale_state_crosses_precisions_through_a_checkpoint(tiny_cache, tmp_path):
    """A CPU --amp run (bf16, its scaler disabled) resumed on CUDA (fp16, scaler enabled), and the reverse."""
    args, data, model, _ = small_setup(tiny_cache)
    optimizer = ncf.make_optimizer(model, args, CPU)
    best = {"hr": 0.0, "val_hr": -1.0, "epoch": 0, "time": 0.0}

    def through_checkpoint(saved, resumed):
        ncf.save_training_state(tmp_path / "last.pth", model, optimizer, saved, 0, 1, best, data, 0.0, args)
        ncf.load_training_state(tmp_path / "last.pth", model, optimizer, resumed, data, args)
        return resumed

    def enabled(**settings):
        return torch.amp.GradScaler("cpu", enabled=True, **settings)

    def disabled():
        return torch.amp.GradScaler("cpu", enabled=False)

    scaled = enabled(init_scale=1024.0, growth_interval=7)
    assert through_checkpoint(scaled, enabled()).state_dict() == scaled.state_dict()  # the scale continues
    assert through_checkpoint(scaled, disabled()).state_dict() == {}  # bf16 / fp32 need none
    fresh = through_checkpoint(disabled(), enabled())  # the run had no loss scale: a new one starts
    assert fresh.is_enabled() and fresh.state_dict() == enabled().state_dict()


# --- logs through NVIDIA's dllogger -----------------------------------------------------------------

FAKE_DLLOGGER = '''"""NVIDIA's dllogger as far as ncf.py uses it: its signatures, and its JSONStreamBackend
opening the log with "w" unless append=True."""
import json


class Verbosity:
    OFF, DEFAULT, VERBOSE = -1, 0, 1


class JSONStreamBackend:
    def __init__(self, verbosity, filename, append=False):
        self.verbosity = verbosity
        self.file = open(filename, "a" if append else "w")

    def log(self, step, data):
        self.file.write("DLLL " + json.dumps({"type": "LOG", "step": step, "data": data}) + "\\n")

    def metadata(self, metric, metadata):
        self.file.write("DLLL " + json.dumps({"type": "METADATA", "metric": metric, "metadata": metadata}) + "\\n")

    def flush(self):
        self.file.flush()


_backends = []


def init(backends):
    _backends[:] = backends


def log(step, data, verbosity=1):
    for backend in _backends:
        if backend.verbosity >= verbosity:
            backend.log(step, data)


def metadata(metric, metadata):
    for backend in _backends:
        backend.metadata(metric, metadata)


def flush():
    for backend in _backends:
        backend.flush()
'''


def fake_dllogger(directory):
    """A directory holding the dllogger package FAKE_DLLOGGER, for PYTHONPATH."""
    package = directory / "site" / "dllogger"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_DLLOGGER)
    return package.parent


def test_resume_appends_to_the_log_through_nvidia_dllogger(tiny_cache, tmp_path):
    env = {"PYTHONPATH": str(fake_dllogger(tmp_path))}
    common = ["--data", tiny_cache, *SMALL, "--checkpoint_dir", tmp_path]
    run_ncf(*common, "-e", 1, log_path=tmp_path / "log.json", env=env).expect_success()
    resumed = run_ncf(*common, "-e", 2, "--resume", log_path=tmp_path / "log.json", env=env).expect_success()
    assert "timestamp" not in resumed.log[0]  # written by dllogger, not by ncf's own writer
    assert [r["step"] for r in resumed.log if r["step"] == "PARAMETER"] == ["PARAMETER"] * 2
    assert [r["step"] for r in resumed.log if isinstance(r["step"], list) and r["step"]] == [[0], [1]]


def test_dllogger_records_reach_the_file_when_logged(tmp_path, monkeypatch):
    """dllogger's file is block-buffered: unflushed, a killed run would lose its latest epochs (and
    leave half a line for a --resume to append to)."""
    monkeypatch.syspath_prepend(str(fake_dllogger(tmp_path)))
    monkeypatch.delitem(sys.modules, "dllogger", raising=False)
    logger = utils.make_logger(tmp_path / "log.json", True)
    logger.log("PARAMETER", {"seed": 1})
    logger.log((0,), {"hr@10": 0.5})
    assert [r["step"] for r in read_log(tmp_path / "log.json")] == ["PARAMETER", [0]]
    logger.close()


# --- several processes and GPUs ---------------------------------------------------------------------

READ_ON_EVERY_RANK = """
import json
import sys
from pathlib import Path

from utils import CliError, init_distributed, read_checkpoint, run_main


def main():
    rank, _, _ = init_distributed()
    path = sys.argv[1] if rank == 0 else sys.argv[2]  # the other node has no file at rank 0's path
    try:
        result = {name: t.tolist() for name, t in read_checkpoint(path, mmap=sys.argv[4] == "mmap").items()}
    except CliError as error:
        result = {"error": str(error)}
    Path(sys.argv[3], f"{rank}.json").write_text(json.dumps(result))


run_main(main)
"""


@pytest.mark.parametrize("checkpoint", ["good", "corrupt", "mmap"])
def test_checkpoints_are_read_on_rank_0_and_sent_to_the_other_ranks(tmp_path, checkpoint):
    """Nodes without a shared filesystem: only rank 0's node has the checkpoints it wrote. A sharded run
    maps the file on every rank instead: a rank that cannot see it stops every rank with its error."""
    script = tmp_path / "read.py"
    script.write_text(READ_ON_EVERY_RANK)
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(weights, tmp_path / "model.pth")
    if checkpoint == "corrupt":
        (tmp_path / "model.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:100])
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [*torchrun(), str(script), str(tmp_path / "model.pth"), str(tmp_path / "absent.pth"), str(tmp_path)]
    command.append(checkpoint)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    if checkpoint == "good":
        assert results[0] == {"w": weights["w"].tolist()}
    elif checkpoint == "mmap":
        assert "absent.pth does not exist (on rank 1" in results[0]["error"]
    else:
        assert "is corrupt" in results[0]["error"] and "model.pth" in results[0]["error"]


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """A node with two CUDA devices, as far as init_distributed asks; the devices it selects, recorded."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    return selected


def test_more_processes_than_gpus_on_a_node_is_an_error(two_fake_gpus, monkeypatch):
    def no_group(*args, **kwargs):
        raise AssertionError("init_process_group must not be reached")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CliError, match=r"local rank 2 .* 2 GPUs"):
        utils.init_distributed()
    assert two_fake_gpus == []  # no GPU shared with local rank 0


def test_each_local_rank_gets_its_own_gpu(two_fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert utils.init_distributed() == (0, 1, torch.device("cuda", 1))
    assert two_fake_gpus == [torch.device("cuda", 1)]


# --- checkpoint writes ------------------------------------------------------------------------------


def test_checkpoint_every_n_epochs_always_writes_the_last_and_resumes_exactly(tiny_cache, tmp_path, monkeypatch):
    written = []
    save = ncf.save_training_state

    def recorded(path, model, optimizer, scaler, epoch, *rest):
        written.append(epoch)
        save(path, model, optimizer, scaler, epoch, *rest)

    monkeypatch.setattr(ncf, "save_training_state", recorded)
    log = train_in_process(tiny_cache, tmp_path / "whole", "-e", 5, "--checkpoint_every", 2)
    assert written == [1, 3, 4]  # epochs 2 and 4 of 5, and the last
    epochs = [r["data"] for r in log if isinstance(r["step"], list) and r["step"]]
    assert len(epochs) == 5 and all(data["checkpoint_time"] >= 0 for data in epochs)

    def crash_after_epoch_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_in_process(
            tiny_cache, tmp_path / "resumed", "-e", 5, "--checkpoint_every", 2, on_epoch=crash_after_epoch_2
        )
    assert state(tmp_path / "resumed" / "last.pth")["epochs_done"] == 2  # epoch 2 was not written
    log = train_in_process(tiny_cache, tmp_path / "resumed", "-e", 5, "--checkpoint_every", 2, "--resume")
    assert [r["step"] for r in log if isinstance(r["step"], list) and r["step"]][-3:] == [[2], [3], [4]]
    for name in ("last.pth", "model.pth"):
        whole, resumed = state(tmp_path / "whole" / name), state(tmp_path / "resumed" / name)
        assert_same_tensors(whole.get("model", whole), resumed.get("model", resumed))


def test_a_run_deletes_the_temporary_checkpoint_files_of_a_killed_one(tiny_cache, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    killed_writes = [tmp_path / ".last.pth.k1ll3d.tmp", tmp_path / ".model.pth.k1ll3d.tmp"]
    for path in killed_writes:
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.tmp"
    other.write_text("not ours")
    train_in_process(tiny_cache, tmp_path, "-e", 1)
    assert not any(path.exists() for path in killed_writes)
    assert other.exists() and (tmp_path / "last.pth").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def disk_full(obj, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CliError, match="cannot write .*model.pth: No space left on device"):
        utils.atomic_save({}, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []
