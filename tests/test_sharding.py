"""ncf.py --embedding_sharding: TorchRec-sharded tables on 2 gloo processes, against replicated (DDP) runs.

Sharded and replicated runs of the same seed and batches with plain SGD train and evaluate the same
model; a sharded run's checkpoints are a replicated run's (test mode, recommendations, --resume on
another layout or number of processes); no rank keeps more than its shards of the tables; what
sharding cannot do is a one-line error.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_cache
from test_ncf import ROOT, SMALL, run_ncf, state, torchrun
from torch import nn

import ncf
import sharding
from benchmarks import baselines
from dataloading import load_cache, make_evaluator
from utils import free_port, leave_process_group, read_log

pytest.importorskip("torchrec", reason="the 'sharding' extra (TorchRec) is not installed")

# one optimizer step per epoch (14,700 samples, one batch per rank): each epoch's loss is a step's loss
ONE_STEP = [*SMALL, "-b", "16384", "--optimizer", "sgd", "-l", "2", "-e", "3"]
# each CPU kind is checked against replicated tables once: table- and column-wise here (NeuMF), row-wise
# with the extra flags (MLP), auto in test_resume_across_layouts_and_world_sizes; GMF in the Adagrad test


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
    """The replicated NeuMF run (2 processes, DDP) the sharded ones are compared with."""
    return train(tiny_cache, tmp_path_factory.mktemp("replicated"), *ONE_STEP)


@pytest.fixture(scope="module")
def sharded(tiny_cache, tmp_path_factory):
    """{kind: the sharded NeuMF run}, trained when first asked for."""
    runs = {}

    def run(kind):
        if kind not in runs:
            flags = [*ONE_STEP, "--embedding_sharding", kind]
            runs[kind] = train(tiny_cache, tmp_path_factory.mktemp(kind), *flags)
        return runs[kind]

    return run


def assert_close_models(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def assert_same_epochs(ours, theirs, keys, rel):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=rel * 1e-3), (step, key)


@pytest.mark.parametrize("kind", ["table_wise", "column_wise"])
def test_sharded_tables_train_as_replicated_ones(replicated, sharded, kind):
    ours, theirs = sharded(kind), replicated
    assert f"tables sharded {kind}" in ours.stdout
    assert len(ours.epochs) == 3
    assert_same_epochs(ours.epochs, theirs.epochs, ("train_loss", "hr@10", "ndcg@10", "validation_loss"), 1e-6)
    assert ours.epochs[-1]["train_loss"] < ours.epochs[0]["train_loss"]  # it trained: the steps were not no-ops
    assert_close_models(state(ours.dir / "model.pth"), state(theirs.dir / "model.pth"))
    assert_close_models(state(ours.dir / "last.pth")["model"], state(theirs.dir / "last.pth")["model"])


def test_validation_patience_l2_sampled_softmax_and_amp_train_as_replicated(tiny_validation_cache, tmp_path):
    """Row-wise MLP tables. The L2 term and the sampled softmax look the tables up again (a second fused SGD
    update, which adds up as one); bf16 autocast leaves the tables' lookups in fp32 either way."""
    flags = [*SMALL, "-b", "4096", "--optimizer", "sgd", "-l", "1", "-e", "3", "--loss", "sampled_softmax",
             "--softmax_negatives", "50", "--l2_regularization", "0.01", "--amp", "--patience", "1",
             "--model", "mlp"]  # fmt: skip
    theirs = train(tiny_validation_cache, tmp_path / "replicated", *flags)
    ours = train(tiny_validation_cache, tmp_path / "sharded", *flags, "--embedding_sharding", "row_wise")
    assert len(ours.epochs) >= 2
    assert_same_epochs(ours.epochs, theirs.epochs, ("train_loss", "val_hr@10", "val_ndcg@10", "hr@10"), 1e-4)
    assert ours.final["best_val_accuracy"] == pytest.approx(theirs.final["best_val_accuracy"], abs=1e-6)
    assert ours.epochs[-1]["train_loss"] < ours.epochs[0]["train_loss"]
    assert_close_models(state(ours.dir / "model.pth"), state(theirs.dir / "model.pth"), rtol=1e-3, atol=1e-4)
    ours_last, theirs_last = state(ours.dir / "last.pth"), state(theirs.dir / "last.pth")
    assert_close_models(ours_last["model"], theirs_last["model"], rtol=1e-3, atol=1e-4)
    assert ours_last["epochs_done"] == theirs_last["epochs_done"] == len(ours.epochs)


def recommendations(cache, model_path, output):
    command = [sys.executable, "inference.py", "--mode", "recommend", "--data", cache, "--load_checkpoint_path",
               model_path, "--users", "1", "2", "3", "4", "--topk", "5", "--output", output]  # fmt: skip
    subprocess.run(list(map(str, command)), cwd=ROOT, check=True, capture_output=True, text=True)
    return [[entry["item_id"] for entry in user["items"]] for user in json.loads(output.read_text())]


@pytest.fixture(scope="module")
def taste_cache(tmp_path_factory):
    """1000 users with latent tastes over 300 items: a model learns them, popularity does not."""
    return make_cache(tmp_path_factory.mktemp("taste"), users=1000, items=300, ratings=40_000)


@pytest.mark.parametrize("kind, model", [("row_wise", "gmf"), ("column_wise", "gmf"), ("table_wise", "neumf")])
def test_sharded_tables_learn_well_above_popularity(taste_cache, tmp_path, kind, model):
    """Each CPU kind learns (the equivalence tests show it learns what replicated tables would)."""
    flags = ["--model", model, "-f", "16", "--layers", "32", "16", "8", "--dropout", "0", "-b", "2048", "-e", "15"]
    flags += ["--embedding_sharding", kind, "--optimizer", "rowwise_adagrad", "-l", "0.5", "--seed", "1"]
    run = train(taste_cache, tmp_path, *flags)
    best = max(record["hr@10"] for record in run.epochs)
    data = load_cache(taste_cache)
    evaluator = make_evaluator(data, "test", "reference", 0, 1, torch.device("cpu"))
    popular, _ = baselines.hit_rates(baselines.popularity(baselines.interactions(data), {}), evaluator)
    assert best > popular + 0.05, (best, popular)


def test_sharded_model_pth_is_a_replicated_one(tiny_cache, replicated, sharded, tmp_path):
    """--mode test (one process) reproduces the sharded run's best HR; recommendations are the replicated model's."""
    ours = sharded("column_wise")
    run = run_ncf(
        "--data", tiny_cache, *SMALL, "--mode", "test", "--load_checkpoint_path", ours.dir / "model.pth",
        log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert run.log[-1]["data"]["hr@10"] == ours.final["best_accuracy"]
    ours_top = recommendations(tiny_cache, ours.dir / "model.pth", tmp_path / "ours.json")
    assert ours_top == recommendations(tiny_cache, replicated.dir / "model.pth", tmp_path / "theirs.json")
    assert len(ours_top) == 4 and all(len(items) == 5 for items in ours_top)


def test_resume_continues_on_another_layout_with_the_table_optimizer_state(tiny_cache, tmp_path):
    """Adagrad's per-element state is gathered into last.pth and scattered again: a GMF run stopped after one
    epoch of table-wise shards and resumed row-wise ends where an uninterrupted column-wise run does."""
    flags = [*SMALL, "-b", "4096", "--optimizer", "adagrad", "-l", "0.1", "--model", "gmf"]
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
    assert whole.epochs[-1]["train_loss"] < whole.epochs[0]["train_loss"]
    assert_close_models(state(tmp_path / "parts" / "model.pth"), state(tmp_path / "whole" / "model.pth"))
    for name, states in state(tmp_path / "whole" / "last.pth")["optimizer"]["tables"].items():
        torch.testing.assert_close(state(tmp_path / "parts" / "last.pth")["optimizer"]["tables"][name], states)


def test_resume_across_layouts_and_world_sizes(tiny_cache, replicated, tmp_path):
    """SGD (no table state), one run in three parts: 2 replicated processes -> 2 sharded (auto) -> 1 replicated
    process, each part going on where the uninterrupted replicated run does."""
    train(tiny_cache, tmp_path, *ONE_STEP[:-1], "1")
    two = train(tiny_cache, tmp_path, *ONE_STEP[:-1], "2", "--resume", "--embedding_sharding", "auto")
    assert "resuming after epoch 0" in two.stdout and "tables sharded auto" in two.stdout
    assert_same_epochs(two.epochs, replicated.epochs[:2], ("train_loss", "hr@10", "ndcg@10"), 1e-6)
    one = train(tiny_cache, tmp_path, *ONE_STEP, "--resume", launcher=None)
    assert "resuming after epoch 1" in one.stdout and "1 process(es)" in one.stdout
    # one process holding the global batch rounds its sums otherwise than two: close, not equal
    uninterrupted = state(replicated.dir / "model.pth")
    assert_close_models(state(tmp_path / "model.pth"), uninterrupted, rtol=1e-3, atol=1e-4)


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


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--optimizer", "adagrad"], "--optimizer adagrad is a fused optimizer of sharded tables"),
        (["--embedding_sharding", "row_wise"], "--optimizer adam with --embedding_sharding on CPU: .* sgd, adagrad, "),
        (["--embedding_sharding", "auto", "--optimizer", "sgd"], "needs several processes"),
        (["--embedding_sharding", "auto", "--optimizer", "sgd", "--grads_accumulated", "2"], "step every batch"),
        (["--embedding_sharding", "auto", "--optimizer", "sgd", "--loss", "softmax"], "whole item table"),
        (["--embedding_sharding", "auto", "--optimizer", "adagrad", "--loss", "sampled_softmax"], "once per lookup"),
        (["--embedding_sharding", "auto", "--optimizer", "rowwise_adagrad", "--l2_regularization", "1"], "lookup"),
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


def held_bytes(*roots):
    """Bytes of the distinct storages of the tensors that `roots` hold: through modules (parameters and
    buffers), optimizers (their state), ShardedTensors (their local shards), dicts, lists and the
    attributes of sharding.py's objects."""
    storages = {}

    def visit(value):
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                visit(shard.tensor)
        elif isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, nn.Module):
            for tensor in itertools.chain(value.parameters(), value.buffers()):
                visit(tensor)
        elif isinstance(value, torch.optim.Optimizer):
            visit(dict(value.state))
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)
        elif type(value).__module__ == sharding.__name__:
            visit(vars(value))

    for root in roots:
        visit(root)
    return sum(storages.values())


def sharded_run_in_process(rank, argv, port, output):
    """ncf.py's main() as one of 2 gloo processes, its checkpoints gathered in small blocks; writes to
    output/RANK.json the bytes its ShardedNeuMF and optimizer hold at the end (after training, evaluation
    and checkpoints) and whether each read of a .pth file was memory-mapped."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ |= {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    torch.set_num_threads(1)
    made, mapped = [], []
    shard, load = sharding.shard, torch.load

    def recorded_shard(*args):
        made.append(shard(*args))
        return made[-1]

    def recorded_load(path, *args, **kwargs):
        if str(path).endswith(".pth"):
            mapped.append(kwargs.get("mmap", False))
        return load(path, *args, **kwargs)

    sharding.shard, torch.load, sys.argv = recorded_shard, recorded_load, ["ncf.py", *argv]
    sharding.SEND_BYTES = 256  # checkpoints gather the shards 4 rows of 16 floats at a time
    try:
        ncf.main()
        model, _, optimizer = made[0]
        result = {"held": held_bytes(model, optimizer), "mapped": mapped}
        Path(output, f"{rank}.json").write_text(json.dumps(result))
    finally:
        leave_process_group()


def test_no_rank_holds_a_full_table_and_uneven_ranks_evaluate_as_replicated(tmp_path):
    """201 users: the ranks have 101 and 100 evaluation users, 11 and 10 blocks of 10 under the full protocol
    (3000 scores a block), so the sharded lookups run in step with padding. A sharded run started from a
    model.pth (--load_checkpoint_path, which each rank memory-maps) trains and evaluates as the replicated
    run does, and after training, evaluation and checkpoints each rank holds its half of the tables
    (row-wise) and the dense layers."""
    cache = make_cache(tmp_path / "data", users=201, items=300, ratings=6000)
    flags = ["--data", cache, "-b", "4096", "-f", "16", "--layers", "32", "16", "--seed", "1", "--optimizer",
             "sgd", "-l", "1", "--eval_protocol", "full", "--valid_batch_size", "3000"]  # fmt: skip
    start = train(cache, tmp_path / "start", *flags[2:], "-e", 1)
    flags += ["-e", 2, "--load_checkpoint_path", start.dir / "model.pth"]
    theirs = train(cache, tmp_path / "replicated", *flags[2:])
    argv = [*map(str, flags), "--checkpoint_dir", str(tmp_path / "sharded"), "--log_path", str(tmp_path / "log.json")]
    mp.spawn(
        sharded_run_in_process, args=([*argv, "--embedding_sharding", "row_wise"], free_port(), tmp_path), nprocs=2
    )
    ours = [r["data"] for r in read_log(tmp_path / "log.json") if isinstance(r["step"], list) and r["step"]]
    assert_same_epochs(ours, theirs.epochs, ("train_loss", "hr@10", "ndcg@10", "validation_loss"), 1e-6)
    assert_close_models(state(tmp_path / "sharded" / "model.pth"), state(theirs.dir / "model.pth"))
    assert_close_models(state(tmp_path / "sharded" / "last.pth")["model"], state(theirs.dir / "last.pth")["model"])
    full = state(theirs.dir / "model.pth")
    tables = sum(tensor.numel() * 4 for name, tensor in full.items() if "_embed." in name)
    dense = sum(tensor.numel() * 4 for name, tensor in full.items() if "_embed." not in name)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["mapped"] == [True], rank
        # row-wise halves: 101 and 100 user rows, 150 item rows; TorchRec's own buffers are a few bytes
        assert tables * 0.49 < result["held"] - dense < tables * 0.51, (rank, result, tables, dense)
