"""ncf.py --embedding_sharding: TorchRec-sharded tables on 2 gloo processes, against replicated (DDP) runs.

Sharded and replicated runs of the same seed and batches with plain SGD train the same model; a
sharded run's checkpoints are a replicated run's (test mode, recommendations, --resume on another
layout or number of processes); what sharding cannot do is a one-line error.
"""

import json
import subprocess
import sys

import pytest
import torch
from test_ncf import ROOT, SMALL, assert_clean_error, run_ncf, state, torchrun

import ncf
import sharding

pytest.importorskip("torchrec", reason="the 'sharding' extra (TorchRec) is not installed")

# one optimizer step per epoch (14,700 samples, one batch per rank): each epoch's loss is a step's loss
ONE_STEP = [*SMALL, "-b", "16384", "--optimizer", "sgd", "-l", "2", "-e", "3"]
EQUIVALENT = [("table_wise", "neumf"), ("column_wise", "neumf"), ("row_wise", "neumf"), ("row_wise", "gmf"),
              ("column_wise", "mlp")]  # fmt: skip


def train(cache, directory, *flags, launcher="torchrun"):
    run = run_ncf(
        "--data", cache, *flags, "--checkpoint_dir", directory, log_path=directory / "log.json",
        launcher=torchrun() if launcher == "torchrun" else None,
    )  # fmt: skip
    run.expect_success()
    run.dir = directory
    return run


@pytest.fixture(scope="module")
def replicated(tiny_cache, tmp_path_factory):
    """{model: the replicated run (2 processes, DDP)}, trained when first asked for."""
    runs = {}

    def run(model):
        if model not in runs:
            runs[model] = train(tiny_cache, tmp_path_factory.mktemp(f"replicated_{model}"), *ONE_STEP, "--model", model)
        return runs[model]

    return run


@pytest.fixture(scope="module")
def sharded(tiny_cache, tmp_path_factory):
    runs = {}

    def run(kind, model):
        if (kind, model) not in runs:
            directory = tmp_path_factory.mktemp(f"{kind}_{model}")
            flags = [*ONE_STEP, "--model", model, "--embedding_sharding", kind]
            runs[kind, model] = train(tiny_cache, directory, *flags)
        return runs[kind, model]

    return run


def assert_close_models(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("kind", "model"), EQUIVALENT)
def test_sharded_tables_train_as_replicated_ones(replicated, sharded, kind, model):
    ours, theirs = sharded(kind, model), replicated(model)
    assert f"tables sharded {kind}" in ours.stdout
    assert len(ours.epochs) == len(theirs.epochs) == 3
    for step, (a, b) in enumerate(zip(ours.epochs, theirs.epochs, strict=True)):
        for key in ("train_loss", "hr@10", "ndcg@10", "validation_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (step, key)
    assert ours.epochs[-1]["train_loss"] < ours.epochs[0]["train_loss"]  # it trained: the steps were not no-ops
    assert_close_models(state(ours.dir / "model.pth"), state(theirs.dir / "model.pth"))
    assert_close_models(state(ours.dir / "last.pth")["model"], state(theirs.dir / "last.pth")["model"])


def test_validation_patience_l2_sampled_softmax_and_amp_train_as_replicated(tiny_validation_cache, tmp_path):
    """The L2 term and the sampled softmax look the tables up again (a second fused SGD update, which adds
    up as one); bf16 autocast leaves the tables' lookups in fp32 either way."""
    flags = [*SMALL, "-b", "4096", "--optimizer", "sgd", "-l", "1", "-e", "3", "--loss", "sampled_softmax",
             "--softmax_negatives", "50", "--l2_regularization", "0.01", "--amp", "--patience", "1"]  # fmt: skip
    theirs = train(tiny_validation_cache, tmp_path / "replicated", *flags)
    ours = train(tiny_validation_cache, tmp_path / "sharded", *flags, "--embedding_sharding", "row_wise")
    assert len(ours.epochs) == len(theirs.epochs) >= 2
    for a, b in zip(ours.epochs, theirs.epochs, strict=True):
        for key in ("train_loss", "val_hr@10", "val_ndcg@10", "hr@10"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert ours.final["best_val_accuracy"] == pytest.approx(theirs.final["best_val_accuracy"], abs=1e-6)
    assert ours.epochs[-1]["train_loss"] < ours.epochs[0]["train_loss"]


def recommendations(cache, model_path, output):
    command = [sys.executable, "inference.py", "--mode", "recommend", "--data", cache, "--load_checkpoint_path",
               model_path, "--users", "1", "2", "3", "4", "--topk", "5", "--output", output]  # fmt: skip
    subprocess.run(list(map(str, command)), cwd=ROOT, check=True, capture_output=True, text=True)
    return [[entry["item_id"] for entry in user["items"]] for user in json.loads(output.read_text())]


def test_sharded_model_pth_is_a_replicated_one(tiny_cache, replicated, sharded, tmp_path):
    """--mode test (one process) reproduces the sharded run's best HR; recommendations are the replicated model's."""
    ours = sharded("row_wise", "neumf")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "--mode", "test", "--load_checkpoint_path", ours.dir / "model.pth",
        log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert run.log[-1]["data"]["hr@10"] == ours.final["best_accuracy"]
    theirs = replicated("neumf")
    ours_top = recommendations(tiny_cache, ours.dir / "model.pth", tmp_path / "ours.json")
    assert ours_top == recommendations(tiny_cache, theirs.dir / "model.pth", tmp_path / "theirs.json")
    assert len(ours_top) == 4 and all(len(items) == 5 for items in ours_top)


def test_resume_continues_on_another_layout_with_the_table_optimizer_state(tiny_cache, tmp_path):
    """Adagrad's per-element state is gathered into last.pth and scattered again: a run stopped after one
    epoch of table-wise shards and resumed row-wise ends where an uninterrupted column-wise run does."""
    flags = [*SMALL, "-b", "4096", "--optimizer", "adagrad", "-l", "0.1"]
    whole = train(tiny_cache, tmp_path / "whole", *flags, "-e", 2, "--embedding_sharding", "column_wise")
    train(tiny_cache, tmp_path / "parts", *flags, "-e", 1, "--embedding_sharding", "table_wise")
    saved = state(tmp_path / "parts" / "last.pth")["optimizer"]["tables"]
    assert saved["mf_user_embed.weight"]["momentum1"].shape == (60, 8)
    assert saved["mf_user_embed.weight"]["momentum1"].abs().sum() > 0
    resumed = train(tiny_cache, tmp_path / "parts", *flags, "-e", 2, "--resume", "--embedding_sharding", "row_wise")
    assert "resuming after epoch 0" in resumed.stdout
    for a, b in zip(resumed.epochs, whole.epochs, strict=True):  # the log holds both parts' epochs
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["hr@10"] == pytest.approx(b["hr@10"], abs=1e-9)
    assert_close_models(state(tmp_path / "parts" / "model.pth"), state(tmp_path / "whole" / "model.pth"))
    for name, states in state(tmp_path / "whole" / "last.pth")["optimizer"]["tables"].items():
        torch.testing.assert_close(state(tmp_path / "parts" / "last.pth")["optimizer"]["tables"][name], states)


def test_resume_across_layouts_and_world_sizes(tiny_cache, replicated, sharded, tmp_path):
    """SGD (no table state): 2 sharded processes -> 1 replicated, and 2 replicated -> 2 sharded, each
    ending where the uninterrupted run does."""
    first = [*ONE_STEP[:-1], "1"]
    train(tiny_cache, tmp_path / "a", *first, "--embedding_sharding", "row_wise")
    one = train(tiny_cache, tmp_path / "a", *ONE_STEP, "--resume", launcher=None)
    assert "1 process(es)" in one.stdout
    train(tiny_cache, tmp_path / "b", *first)
    train(tiny_cache, tmp_path / "b", *ONE_STEP, "--resume", "--embedding_sharding", "auto")
    uninterrupted = state(replicated("neumf").dir / "model.pth")
    # one process holding the global batch rounds its sums otherwise than two: close, not equal
    one_process = state(tmp_path / "a" / "model.pth")
    for name in uninterrupted:
        torch.testing.assert_close(one_process[name], uninterrupted[name], rtol=1e-3, atol=1e-4, msg=name)
    assert_close_models(state(tmp_path / "b" / "model.pth"), uninterrupted)


def test_row_wise_adagrad_state_of_column_blocks_resumes_only_on_its_layout(tiny_cache, tmp_path):
    """Column-wise shards keep one row-wise Adagrad sum per row and column block: another layout has none
    to take it."""
    flags = [*SMALL, "-b", "4096", "--optimizer", "rowwise_adagrad", "-l", "0.1"]
    train(tiny_cache, tmp_path, *flags, "-e", 1, "--embedding_sharding", "column_wise")
    assert state(tmp_path / "last.pth")["optimizer"]["tables"]["mf_user_embed.weight"]["momentum1"].shape == (120,)
    run = run_ncf(
        "--data", tiny_cache, *flags, "-e", 2, "--resume", "--embedding_sharding", "row_wise",
        "--checkpoint_dir", tmp_path, log_path=tmp_path / "b.json", launcher=torchrun(),
    )  # fmt: skip
    assert run.returncode != 0 and "ncf.py: error: last.pth's momentum1" in run.stderr  # (torchrun adds its own lines)
    assert "resume it with the run's --embedding_sharding and number of processes" in run.stderr


def test_a_replicated_run_refuses_a_sharded_table_state():
    """Only CUDA has a stateful optimizer (Adam) under both layouts: its fused state is fbgemm's, not torch's."""
    saved = {"state": {}, "param_groups": [{}], "tables": {"mf_user_embed.weight": {"momentum1": torch.ones(2)}}}
    with pytest.raises(ncf.CliError, match="resume it with --embedding_sharding"):
        sharding.check_replicated_resume(saved, "last.pth")
    sharding.check_replicated_resume(saved | {"tables": {"mf_user_embed.weight": {}}}, "last.pth")  # SGD: none


def test_adam_with_sharded_tables_on_cpu_is_one_line(tiny_cache, tmp_path):
    run = run_ncf("--data", tiny_cache, *SMALL, "--embedding_sharding", "row_wise", log_path=tmp_path / "log.json")
    assert_clean_error(run, "--optimizer adam with --embedding_sharding on CPU", "sgd, adagrad, rowwise_adagrad")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--optimizer", "adagrad"], "--optimizer adagrad is a fused optimizer of sharded tables"),
        (["--embedding_sharding", "auto", "--optimizer", "sgd"], "needs several processes"),
        (["--embedding_sharding", "auto", "--optimizer", "sgd", "--grads_accumulated", "2"], "step every batch"),
        (["--embedding_sharding", "auto", "--optimizer", "sgd", "--loss", "softmax"], "whole item table"),
    ],
)
def test_what_sharding_cannot_do_is_refused(tiny_cache, flags, fragment, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2" if "several" not in fragment else "1")
    with pytest.raises(ncf.CliError, match=fragment):
        ncf.parse_args(["--data", str(tiny_cache), *flags])


def test_an_unknown_kind_is_refused(tiny_cache, tmp_path):
    run = run_ncf("--data", tiny_cache, "--embedding_sharding", "data_parallel", log_path=tmp_path / "log.json")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("ncf.py: error: argument --embedding_sharding: invalid")
    assert "Traceback" not in run.stderr


def test_sharding_without_torchrec_says_how_to_install_it(tiny_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # `import torchrec` raises ImportError
    argv = ["--data", str(tiny_cache), "--embedding_sharding", "auto", "--optimizer", "sgd"]
    with pytest.raises(ncf.CliError, match=r"needs TorchRec .*pip install --no-deps torchrec==1\.8\.0"):
        ncf.parse_args(argv)
