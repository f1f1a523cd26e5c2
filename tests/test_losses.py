"""ncf.py's training losses: BCE (the reference's), full softmax and sampled softmax."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cache
from test_ncf import DISTRIBUTED_ENV, SMALL, assert_same_tensors, run_ncf, state, torchrun

import ncf
import tune
from dataloading import load_cache
from neumf import NeuMF
from utils import CliError

ROOT = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS = 7, 11
KINDS = {  # kind, layers
    "gmf": ("gmf", [8]),
    "mlp": ("mlp", [8, 4]),
    "neumf": ("neumf", [8, 6, 4]),
    "mlp-no-hidden-layer": ("mlp", [8]),
}


def tiny_model(kind, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model_kind, layers = KINDS[kind]
    model = NeuMF(N_USERS, N_ITEMS, 4, layers, dropout, kind=model_kind)
    with torch.no_grad():  # larger than the reference's N(0, 0.01): logits that differ between items
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def batch():
    users = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 3, 5], dtype=torch.int32)
    items = torch.tensor([3, 0, 10, 7, 7, 1, 2, 9, 4, 5], dtype=torch.int32)
    return users, items, torch.ones(len(users))


def full_score_matrix(model, users):
    """forward() of every (user, item) pair, pair by pair: no factored scoring."""
    pairs_users = users.repeat_interleave(N_ITEMS)
    pairs_items = torch.arange(N_ITEMS).repeat(len(users))
    return model(pairs_users, pairs_items).view(len(users), N_ITEMS)


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_full_softmax_of_equal_logits_is_log_of_the_catalogue_size():
    model = tiny_model("gmf")
    with torch.no_grad():
        model.mf_user_embed.weight.zero_()  # every logit is the final bias
    users, items, labels = batch()
    assert ncf.Softmax(model, N_ITEMS)(users, items, labels).item() == pytest.approx(math.log(N_ITEMS))


@pytest.mark.parametrize("kind", KINDS)
def test_catalogue_logits_are_forward_of_every_pair(kind):
    model = tiny_model(kind).eval()
    users = batch()[0]
    torch.testing.assert_close(model.catalogue_logits(users, torch.arange(N_ITEMS)), full_score_matrix(model, users))


@pytest.mark.parametrize("kind", KINDS)
def test_full_softmax_is_cross_entropy_on_the_full_score_matrix(kind):
    model = tiny_model(kind)
    users, items, labels = batch()
    loss = ncf.Softmax(model, N_ITEMS)(users, items, labels)
    direct = F.cross_entropy(full_score_matrix(model, users), items.long())
    torch.testing.assert_close(loss, direct)
    assert loss.item() > 0.5  # not a trivial value: the logits differ


@pytest.mark.parametrize("kind", KINDS)
def test_full_softmax_in_blocks_equals_it_in_one_block(kind):
    """2 users a block (5 checkpointed blocks): the same value and gradients as the batch at once."""
    model = tiny_model(kind)
    users, items, labels = batch()
    whole = ncf.Softmax(model, N_ITEMS)
    assert whole.users_per_block >= len(users)
    blocked = ncf.Softmax(model, N_ITEMS, block_scores=2 * N_ITEMS + 1)
    assert blocked.users_per_block == 2
    whole_loss, blocked_loss = whole(users, items, labels), blocked(users, items, labels)
    torch.testing.assert_close(blocked_loss, whole_loss)
    whole_gradients, blocked_gradients = gradients(model, whole_loss), gradients(model, blocked_loss)
    for name, gradient in whole_gradients.items():
        torch.testing.assert_close(blocked_gradients[name], gradient, msg=name)


def test_full_softmax_scores_at_most_a_block_at_once(monkeypatch):
    """Forward and backward (the checkpointed blocks are recomputed) never score more than block_scores pairs."""
    model = tiny_model("neumf")
    shapes, catalogue_logits = [], NeuMF.catalogue_logits

    def recording(self, users, items):
        logits = catalogue_logits(self, users, items)
        shapes.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(NeuMF, "catalogue_logits", recording)
    users, items, labels = batch()
    ncf.Softmax(model, N_ITEMS, block_scores=3 * N_ITEMS + 2)(users, items, labels).backward()
    forward = [(3, N_ITEMS), (3, N_ITEMS), (3, N_ITEMS), (1, N_ITEMS)]
    assert shapes[:4] == forward and sorted(shapes[4:]) == sorted(forward)  # then recomputed, last block first


def test_full_softmax_refuses_a_catalogue_larger_than_a_block():
    with pytest.raises(CliError, match="use --loss sampled_softmax"):
        ncf.Softmax(tiny_model("gmf"), N_ITEMS, block_scores=N_ITEMS - 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("copies", [1, 3])
def test_sampled_softmax_against_the_whole_catalogue_is_the_full_softmax(kind, copies):
    """Every item as a negative (copies times): the positive's own copy is an accidental hit, left out,
    and the logQ correction -log(copies) makes the copies count as one: the full softmax exactly."""
    model = tiny_model(kind)
    users, items, labels = batch()
    negatives = torch.arange(N_ITEMS).repeat(copies)
    sampled = ncf.SampledSoftmax(model, N_ITEMS, len(negatives)).candidates_loss(users, items, negatives)
    full = ncf.Softmax(model, N_ITEMS)(users, items, labels)
    torch.testing.assert_close(sampled, full)
    sampled_gradients, full_gradients = gradients(model, sampled), gradients(model, full)
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(sampled_gradients[name], gradient, msg=name)


def test_sampled_softmax_known_value_with_one_negative():
    """One shared negative j: row loss log(1 + exp(s_j - log(1 / n_items) - s_pos)), unless j is the positive."""
    model = tiny_model("neumf").eval()
    users, items, labels = batch()
    negative = torch.tensor([7])
    scores = full_score_matrix(model, users)
    positive, other = scores.gather(1, items.long()[:, None])[:, 0], scores[:, 7] + math.log(N_ITEMS)
    expected = torch.where(items == 7, 0.0, F.softplus(other - positive)).mean()
    loss = ncf.SampledSoftmax(model, N_ITEMS, 1).candidates_loss(users, items, negative)
    torch.testing.assert_close(loss, expected)


def test_sampled_softmax_draws_follow_the_epoch_seed():
    model = tiny_model("gmf")
    users, items, labels = batch()
    loss = ncf.SampledSoftmax(model, N_ITEMS, 4)
    values = []
    for seed in (5, 5, 6):
        loss.start_epoch(seed)
        values.append([loss(users, items, labels).item() for _ in range(2)])
    assert values[0] == values[1]  # the same epoch seed: the same draws
    assert values[0][0] != values[0][1] and values[0] != values[2]  # a new draw per batch, and per epoch


# --- DDP: the loss of a global batch, split over 2 gloo processes --------------------------------------

DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ncf
from utils import run_main
from test_losses import N_ITEMS, batch, tiny_model


def main():  # run_main leaves the process group after main's locals (DDP holds it in a cycle) are gone
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    name, output = sys.argv[1:]
    model = tiny_model("neumf")
    losses = {
        "bce": lambda: ncf.BCE(model),
        "softmax": lambda: ncf.Softmax(model, N_ITEMS, block_scores=2 * N_ITEMS),  # 2 users a block: checkpointed
        "sampled_softmax": lambda: ncf.SampledSoftmax(model, N_ITEMS, 5),
    }
    loss = losses[name]()
    loss.start_epoch(3)
    users, items, labels = batch()
    if name == "bce":
        labels = (items % 2).float()
    share = len(users) // world_size
    mine = slice(rank * share, (rank + 1) * share)
    trained = DistributedDataParallel(loss) if world_size > 1 else loss
    value = trained(users[mine], items[mine], labels[mine])
    value.backward()
    dist.all_reduce(value)
    if rank == 0:
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"loss": value / world_size, **grads}, output)
    dist.barrier()  # leave together, as ncf.py does: a rank tearing gloo down while rank 0 writes can abort it


run_main(main)
"""


@pytest.mark.parametrize("loss", ncf.LOSSES)
def test_ddp_gradients_equal_one_process_on_the_global_batch(loss, tmp_path):
    script = tmp_path / "ddp_loss.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for processes in (1, 2):
        launcher = [arg.replace("--nproc_per_node=2", f"--nproc_per_node={processes}") for arg in torchrun()]
        output = tmp_path / f"{processes}.pth"
        env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
        env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}  # the script imports test_losses
        command = [*launcher, str(script), loss, str(output)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[processes] = torch.load(output, weights_only=True)
    assert results[1].keys() == results[2].keys()
    for name, value in results[1].items():
        torch.testing.assert_close(results[2][name], value, msg=name)
    assert results[1]["loss"].item() > 0.1


# --- ncf.py end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax"])
def test_resume_with_a_softmax_loss_continues_exactly(tiny_cache, tmp_path, loss):
    flags = ["--data", tiny_cache, *SMALL, "-b", 256, "--loss", loss]
    whole = run_ncf(*flags, "-e", 2, "--checkpoint_dir", tmp_path / "whole", log_path=tmp_path / "w.json")
    whole.expect_success()
    assert f"; {loss} loss; " in whole.stdout.splitlines()[0]
    assert whole.parameters["loss"] == loss and whole.parameters["negative_samples"] == 0
    directory = tmp_path / "parts"
    run_ncf(*flags, "-e", 1, "--checkpoint_dir", directory, log_path=tmp_path / "a.json").expect_success()
    resumed = run_ncf(*flags, "-e", 2, "--resume", "--checkpoint_dir", directory, log_path=tmp_path / "b.json")
    resumed.expect_success()
    assert resumed.epochs[-1]["train_loss"] == whole.epochs[-1]["train_loss"]
    assert_same_tensors(state(directory / "last.pth")["model"], state(tmp_path / "whole" / "last.pth")["model"])
    # another loss is another run
    other = run_ncf(
        "--data", tiny_cache, *SMALL, "-b", 256, "-e", 3, "--resume", "--checkpoint_dir", directory,
        log_path=tmp_path / "c.json",
    )  # fmt: skip
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert f"--loss bce (the run has {loss})" in other.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss", "softmax", "-n", "4"], "-n/--negative_samples is --loss bce's"),
        (["--loss", "sampled_softmax", "--negative_samples", "2"], "trains on positives only"),
        (["--softmax_negatives", "100"], "--softmax_negatives is --loss sampled_softmax's"),
        (["--loss", "softmax", "--softmax_negatives", "100"], "not --loss softmax's"),
        (["--loss", "sampled_softmax", "--softmax_negatives", "0"], "--softmax_negatives must be at least 1"),
        (["--loss", "hinge"], "invalid choice"),
    ],
)
def test_bad_loss_flags_are_one_line_errors(tiny_cache, tmp_path, flags, message):
    run = run_ncf("--data", tiny_cache, *flags, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert message in run.stderr.strip().splitlines()[-1]


def test_loss_defaults():
    assert ncf.parse_args(["--data", "x"]).negative_samples == 4
    assert ncf.parse_args(["--data", "x", "--loss", "softmax", "-n", "0"]).negative_samples == 0
    sampled = ncf.parse_args(["--data", "x", "--loss", "sampled_softmax"])
    assert (sampled.negative_samples, sampled.softmax_negatives) == (0, ncf.SAMPLED_NEGATIVES)
    assert ncf.parse_args(["--data", "x"]).softmax_negatives is None


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax"])
def test_softmax_losses_train_under_ddp_with_l2_accumulation_and_validation(tiny_validation_cache, tmp_path, loss):
    run = run_ncf(
        "--data", tiny_validation_cache, *SMALL, "-b", 128, "--model", "gmf", "--loss", loss, "-e", 2,
        "--l2_regularization", 0.001, "--grads_accumulated", 2, "--patience", 5, "-l", 0.02,
        "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json", launcher=torchrun(),
    ).expect_success()  # fmt: skip
    assert run.parameters["world_size"] == 2 and len(run.epochs) == 2
    assert run.epochs[1]["train_loss"] < run.epochs[0]["train_loss"] < math.log(200) + 0.01
    assert "val_hr@10" in run.epochs[0] and (tmp_path / "model.pth").exists()


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax"])
def test_softmax_losses_train_in_bf16_on_cpu(tiny_cache, tmp_path, loss):
    runs = {}
    for amp in (False, True):
        runs[amp] = run_ncf(
            "--data", tiny_cache, *SMALL, "-b", 256, "--model", "neumf", "--loss", loss, "-e", 1,
            *(["--amp"] if amp else []), "--checkpoint_dir", tmp_path / str(amp), log_path=tmp_path / f"{amp}.json",
        ).expect_success()  # fmt: skip
    fp32, bf16 = runs[False].epochs[0]["train_loss"], runs[True].epochs[0]["train_loss"]
    assert math.isfinite(bf16) and bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.05)


@pytest.fixture(scope="module")
def taste_cache(tmp_path_factory):
    """Latent taste that a model can learn (tests/test_baselines.py: iALS beats popularity on it)."""
    return make_cache(tmp_path_factory.mktemp("taste"), users=1000, items=300, ratings=40_000)


@pytest.mark.parametrize("loss, flags", [("softmax", []), ("sampled_softmax", ["--softmax_negatives", 32])])
def test_softmax_losses_learn_well_above_popularity(taste_cache, tmp_path, loss, flags):
    from benchmarks import baselines
    from dataloading import make_evaluator

    data = load_cache(taste_cache)
    evaluator = make_evaluator(data, "test", "reference", 0, 1, torch.device("cpu"))
    popularity_hr, _ = baselines.hit_rates(baselines.popularity(baselines.interactions(data), {}), evaluator)
    run = run_ncf(
        "--data", taste_cache, "--model", "gmf", "-f", 16, "-b", 256, "-l", 0.01, "-e", 4, "--seed", 1,
        "--loss", loss, *flags, "--checkpoint_dir", tmp_path, log_path=tmp_path / "log.json",
    ).expect_success()  # fmt: skip
    assert run.final["best_accuracy"] > popularity_hr + 0.04, (run.final["best_accuracy"], popularity_hr)


# --- tune.py searches the loss --------------------------------------------------------------------------


def test_tune_searches_the_loss_and_drops_the_parameters_it_leaves_unused():
    space = tune.default_space("gmf", 100_000, pretrained=False)
    assert tune.describe(space, {})["loss"] == "one of bce, softmax, sampled_softmax"
    assert list(space).index("loss") < min(
        list(space).index(name) for name in ("negative_samples", "softmax_negatives")
    )
    searched, fixed = tune.narrowed_space(space, ["loss=softmax"], [])
    assert fixed == {"loss": "softmax"} and not {"negative_samples", "softmax_negatives"} & searched.keys()
    searched, _ = tune.narrowed_space(space, ["loss=sampled_softmax"], ["softmax_negatives=100:200"])
    assert "negative_samples" not in searched and searched["softmax_negatives"].high == 200
    settings = {"model": "gmf", "seed": 1, "epochs": 2, "patience": None, "amp": False, "pretrained_gmf": None}
    values = {"loss": "softmax", "negative_samples": 4, "softmax_negatives": 100, "learning_rate": 0.01}
    flags = tune.ncf_flags(values, settings)
    assert "--negative_samples" not in flags and "--softmax_negatives" not in flags
    args = ncf.parse_args(["--data", "x", *flags])  # a flag set ncf.py takes
    assert (args.loss, args.negative_samples, args.learning_rate) == ("softmax", 0, 0.01)
    args = ncf.parse_args(["--data", "x", *tune.ncf_flags(values | {"loss": "sampled_softmax"}, settings)])
    assert (args.loss, args.softmax_negatives, args.negative_samples) == ("sampled_softmax", 100, 0)
    args = ncf.parse_args(["--data", "x", *tune.ncf_flags(values | {"loss": "bce"}, settings)])
    assert (args.loss, args.negative_samples, args.softmax_negatives) == ("bce", 4, None)


def test_tune_trials_train_with_the_searched_loss(tiny_validation_cache, tmp_path):
    best = tmp_path / "best.json"
    command = [
        sys.executable, "tune.py", "--data", tiny_validation_cache, "--storage", f"sqlite:///{tmp_path / 's.db'}",
        "--study_name", "loss", "--model", "gmf", "--trials", 2, "-e", 1, "--output", best, "--pruner", "none",
        "--fix", "loss=sampled_softmax", "batch_size=256", "--range", "softmax_negatives=16:32",
    ]  # fmt: skip
    proc = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(best.read_text())
    assert "--loss sampled_softmax" in result["command"] and "--negative_samples" not in result["command"]
    assert 16 <= result["params"]["softmax_negatives"] <= 32


# --- benchmarks ---------------------------------------------------------------------------------------


def test_accuracy_recipes_with_a_softmax_loss_are_ncf_settings():
    from benchmarks import accuracy

    for recipe, batches in accuracy.BATCHES.items():
        for dataset, batch in batches.items():
            args = ncf.parse_args(["--data", "x", *accuracy.RECIPES[recipe], "-b", batch])
            assert args.loss != "bce" and args.negative_samples == 0, recipe  # batches of positives
            assert args.batch_size == int(batch) <= (1024 if dataset == "ml-1m" else 640), (recipe, dataset)


def test_loss_bench_times_every_loss_against_bce(tiny_cache, tmp_path):
    command = [sys.executable, "benchmarks/loss_bench.py", "--data", tiny_cache, "--softmax_negatives", 16]
    command += ["--bce_batch", 2048, "--softmax_batch", 512, "--json", tmp_path / "loss.json"]
    proc = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows] == ["loss", *ncf.LOSSES]
    assert [row[6].strip() for row in rows[1:2]] == ["1.00"]  # BCE against itself
    results = json.loads((tmp_path / "loss.json").read_text())["results"]
    positives = results["positives"]
    assert positives == len(load_cache(tiny_cache).train)
    losses = results["losses"]
    assert [losses[loss]["negatives"] for loss in ncf.LOSSES] == [4, 199, 16]
    assert losses["bce"]["samples_per_s"] == pytest.approx(5 * losses["bce"]["positives_per_s"])
    for result in losses.values():
        assert result["positives_per_s"] * result["epoch_seconds"] == pytest.approx(positives)


def test_pretrained_neumf_trains_with_a_softmax_loss(tiny_cache, tmp_path):
    branches = {}
    for kind in ("gmf", "mlp"):
        run_ncf(
            "--data", tiny_cache, *SMALL, "-b", 256, "-e", 1, "--model", kind, "--loss", "softmax",
            "--checkpoint_dir", tmp_path / kind, log_path=tmp_path / f"{kind}.json",
        ).expect_success()  # fmt: skip
        branches[kind] = tmp_path / kind / "model.pth"
    runs = {}
    for name, flags in {
        "fresh": [],
        "pretrained": ["--pretrained_gmf", branches["gmf"], "--pretrained_mlp", branches["mlp"]],
    }.items():
        runs[name] = run_ncf(
            "--data", tiny_cache, *SMALL, "-b", 256, "-e", 1, "--loss", "softmax", *flags,
            "--checkpoint_dir", tmp_path / name, log_path=tmp_path / f"{name}.json",
        ).expect_success()  # fmt: skip
    fresh, pretrained = (runs[name].epochs[0]["train_loss"] for name in ("fresh", "pretrained"))
    assert runs["pretrained"].parameters["loss"] == "softmax" and math.isfinite(pretrained) and pretrained != fresh
