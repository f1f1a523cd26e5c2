"""ncf.py end to end, as users run it: one process, DDP on CPU (gloo) under every launcher, test mode,
resume, AMP, gradient accumulation, logs, checkpoints, and every bad input of the contract.

Training subprocesses run with OMP_NUM_THREADS=1 (as the DDP launchers set it): on a busy 2-core
machine two OpenMP threads per process spin against each other and a tiny epoch takes 30x longer.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ncf
from convert import FORMAT_VERSION
from neumf import NeuMF

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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun():
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node=2", f"--master_port={free_port()}"]


def old_launch(use_env):
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}"]
    return command + ["--use_env"] * use_env


def run_ncf(*args, log_path, launcher=None, one_thread=True, timeout=300):
    """Run ncf.py from the repository root; returns its exit status, output and parsed log."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
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


def test_grads_accumulated_sums_micro_batches_into_one_step(trained, tmp_path):
    common = ["--data", trained.parameters["data"], *SMALL, "-e", 1, "--dropout", 0, "--checkpoint_dir", tmp_path]
    whole = run_ncf(*common, log_path=tmp_path / "whole.json").expect_success()
    halves = run_ncf(*common, "-b", 512, "--grads_accumulated", 2, log_path=tmp_path / "halves.json").expect_success()
    assert halves.parameters["grads_accumulated"] == 2
    # two half batches per step make the same steps as whole batches (without accumulation -b 512 takes
    # twice the steps and ends near 0.59 instead of 0.63)
    assert halves.epochs[0]["train_loss"] == pytest.approx(whole.epochs[0]["train_loss"], rel=2e-3)
    assert halves.epochs[0]["validation_loss"] == pytest.approx(whole.epochs[0]["validation_loss"], rel=3e-2)


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


@pytest.mark.parametrize("amp", [False, True])
def test_apex_fused_adam_only_without_a_grad_scaler(monkeypatch, amp):
    class FusedAdam(torch.optim.Adam):  # stands in for apex's
        pass

    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", types.SimpleNamespace(FusedAdam=FusedAdam))
    args = types.SimpleNamespace(optimizer="adam", learning_rate=1e-3, beta1=0.25, beta2=0.5, eps=1e-8, amp=amp)
    model = torch.nn.Linear(2, 1)
    on_cuda = ncf.make_optimizer(model, args, torch.device("cuda"))
    # with --amp, GradScaler would sync with the host every step around apex's optimizer
    assert type(on_cuda) is (torch.optim.Adam if amp else FusedAdam)
    on_cpu = ncf.make_optimizer(model, args, torch.device("cpu"))
    assert type(on_cpu) is torch.optim.Adam and on_cpu.defaults["fused"]
    assert on_cpu.defaults["betas"] == (0.25, 0.5)
