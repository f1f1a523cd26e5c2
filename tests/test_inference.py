"""inference.py: the benchmark table and log, latency statistics, and top-K recommendations in raw ids.

Most runs call inference.main() in this process (through utils.run_main, as the script does), which
is much faster than a subprocess per case; two tests run the script itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import utils
from convert import ITEM_IDS_FILE, USER_IDS_FILE
from dataloading import load_cache
from neumf import NeuMF
from utils import load_model_weights, run_main

ROOT = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS, FACTORS, LAYERS = 50, 60, 8, [16, 8]
HAS_CUDA = torch.cuda.is_available()


def run_script(script, *args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def make_cache(directory, fmt="ml-20m", string_ids=False):
    """A 50-user, 60-item synthetic ratings file and its cache (string ids: a custom CSV like u1,i7)."""
    directory.mkdir()
    ratings = directory / "ratings.csv"
    made = run_script(
        "synthetic.py", "--users", N_USERS, "--items", N_ITEMS, "--ratings", 1400, "--output", ratings, cwd=directory
    )
    assert made.returncode == 0, made.stderr
    if string_ids:
        table = pd.read_csv(ratings)
        ratings = directory / "custom.csv"
        pd.DataFrame(
            {
                "user_id": "u" + table.userId.astype(str),
                "item_id": "i" + table.movieId.astype(str),
                "timestamp": table.timestamp,
            }
        ).to_csv(ratings, index=False)
    cache = directory / "cache"
    converted = run_script(
        "convert.py", "--path", ratings, "--format", fmt, "--output", cache, "--valid_negative", 10, cwd=directory
    )
    assert converted.returncode == 0, converted.stderr
    return ratings, cache


@pytest.fixture(scope="module")
def int_data(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("int") / "data")


@pytest.fixture(scope="module")
def str_data(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("str") / "data", fmt="custom", string_ids=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained model saved DDP-style (`module.` prefix): its scores are random but fixed."""
    torch.manual_seed(0)
    model = NeuMF(N_USERS, N_ITEMS, FACTORS, LAYERS)
    path = tmp_path_factory.mktemp("model") / "model.pth"
    torch.save({f"module.{name}": tensor for name, tensor in model.state_dict().items()}, path)
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run inference.py's main in-process: returns (exit code, stdout, stderr)."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["inference.py", *map(str, args)])
        code = 0
        try:
            run_main(inference.main)
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inference.py: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def recommend_json(cli, tmp_path, cache, model, *args):
    output = tmp_path / "recommendations.json"
    code, _, err = cli(
        "--mode", "recommend", "--data", cache, "--load_checkpoint_path", model, "--output", output, *args
    )
    assert code == 0, err
    return json.loads(output.read_text())


def seen_dense_items(cache):
    """{dense user: set of dense items the cache records for it (training, validation and test)}."""
    data = load_cache(cache)
    seen = {}
    for pairs in (data.train, data.test, data.valid):
        for user, item in [] if pairs is None else pairs.tolist():
            seen.setdefault(user, set()).add(item)
    return seen


def raw_ids(cache, name):
    return pd.read_csv(Path(cache) / name, dtype=str, keep_default_na=False)["raw_id"].tolist()


# --- benchmark --------------------------------------------------------------------------------


def test_benchmark_prints_every_column_and_logs_every_key(tmp_path):
    log = tmp_path / "log.json"
    sizes = ["--n_users", N_USERS, "--n_items", N_ITEMS, "--factors", FACTORS, "--layers", *LAYERS]
    runs = "--batch_sizes 1,16 --num_batches 12 --device cpu".split()
    result = run_script("inference.py", *sizes, *runs, "--log_path", log, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert header == list(inference.TABLE_COLUMNS)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert [row[0] for row in rows] == ["1", "16"]
    for row in rows:
        assert len(row) == len(inference.TABLE_COLUMNS)
        assert all(float(cell.replace(",", "")) > 0 for cell in row)
    logged = {}
    for line in log.read_text().splitlines():
        record = json.loads(line.removeprefix("DLLL "))
        logged.update(record.get("data", {}))
    for batch in (1, 16):
        for key in ("mean_throughput", "mean_latency", "p90_latency", "p95_latency", "p99_latency"):
            assert logged[f"batch_{batch}_{key}"] > 0


def test_benchmark_takes_sizes_from_a_ddp_checkpoint_in_bf16(cli, model_path, tmp_path):
    runs = "--batch_sizes 1 4 --num_batches 12 --bf16 --device cpu".split()
    code, out, err = cli("--load_checkpoint_path", model_path, *runs, "--log_path", tmp_path / "log.json")
    assert code == 0, err
    assert f"NEUMF: {N_USERS} users, {N_ITEMS} items, factors {FACTORS}, layers {LAYERS}" in out
    assert "bf16 on cpu" in out
    assert len([line for line in out.splitlines() if line.startswith("|")]) == 4


def test_latency_statistics_on_known_latencies():
    stats = inference.latency_stats(10, np.arange(1.0, 101.0))  # 1, 2, ..., 100 ms
    assert stats["mean_latency"] == pytest.approx(50.5)
    assert stats["mean_throughput"] == pytest.approx(10 / 0.0505)
    # linear between closest ranks: h = 99 * q / 100
    assert stats["p90_latency"] == pytest.approx(90.1)
    assert stats["p95_latency"] == pytest.approx(95.05)
    assert stats["p99_latency"] == pytest.approx(99.01)
    assert inference.percentile([40.0, 10.0, 30.0, 20.0], 90) == pytest.approx(37.0)
    assert inference.percentile([5.0], 99) == 5.0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--batch_sizes", "0"], "at least 1"),
        (["--batch_sizes", "16,-4"], "at least 1"),
        (["--batch_sizes", "1,x"], "'x' is not an integer"),
        (["--num_batches", "10"], "warm-up"),
        pytest.param(["--fp16"], "CUDA", marks=pytest.mark.skipif(HAS_CUDA, reason="fp16 runs on CUDA")),
        pytest.param(["--device", "cuda"], "CUDA", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA is here")),
        (["--layers", "15", "8"], "even"),
    ],
)
def test_benchmark_bad_input_is_a_one_line_error(cli, args, fragment):
    assert_one_line_error(*cli("--batch_sizes", "1", *args)[::2], fragment)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    result = run_script("inference.py", "--load_checkpoint_path", checkpoint, "--batch_sizes", 1, cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "corrupt")


def test_checkpoint_and_size_flags_conflict(cli, model_path):
    assert_one_line_error(*cli("--load_checkpoint_path", model_path, "--n_users", 5)[::2], "--n_users")


# --- recommend --------------------------------------------------------------------------------


def test_training_items_are_excluded_unless_asked(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    seen = seen_dense_items(cache)
    items = raw_ids(cache, ITEM_IDS_FILE)
    users = raw_ids(cache, USER_IDS_FILE)[:5]
    k = N_ITEMS - max(len(seen[dense]) for dense in range(5))  # every unseen item of the busiest user
    excluded = recommend_json(cli, tmp_path, cache, model_path, "--users", *users, "--topk", k)
    included = recommend_json(cli, tmp_path, cache, model_path, "--users", *users, "--topk", N_ITEMS, "--include_seen")
    for dense, (without, with_seen) in enumerate(zip(excluded, included, strict=True)):
        seen_raw = {items[i] for i in seen[dense]}
        recommended = [str(entry["item_id"]) for entry in without["items"]]
        assert len(recommended) == k and not seen_raw & set(recommended)
        assert sorted(str(entry["item_id"]) for entry in with_seen["items"]) == sorted(items)


def test_raw_ids_round_trip_against_the_input_file(cli, int_data, model_path, tmp_path):
    ratings, cache = int_data
    table = pd.read_csv(ratings)
    item_ids = pd.read_csv(cache / ITEM_IDS_FILE)["raw_id"].tolist()
    user_ids = pd.read_csv(cache / USER_IDS_FILE)["raw_id"].tolist()
    model = NeuMF(N_USERS, N_ITEMS, FACTORS, LAYERS)
    load_model_weights(model, model_path)
    user = int(table.userId.iloc[-1])
    rated = set(table.movieId[table.userId == user])  # training items and the held-out test item
    k = N_ITEMS - len(rated)
    [result] = recommend_json(cli, tmp_path, cache, model_path, "--users", user, "--topk", k)
    assert result["user_id"] == user
    recommended = [entry["item_id"] for entry in result["items"]]
    assert set(recommended) == set(table.movieId) - rated  # the held-out test item is left out too
    with torch.inference_mode():
        for entry in result["items"]:
            dense_user = torch.tensor([user_ids.index(user)])
            dense_item = torch.tensor([item_ids.index(entry["item_id"])])
            assert torch.sigmoid(model.eval()(dense_user, dense_item)).item() == pytest.approx(entry["score"], abs=1e-6)


def test_batched_equals_one_by_one_and_brute_force(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    users = raw_ids(cache, USER_IDS_FILE)[:7]
    k = 10
    batched = recommend_json(cli, tmp_path, cache, model_path, "--users", *users, "--topk", k)
    # two users per forward pass, so the users span several chunks
    chunked = recommend_json(
        cli, tmp_path, cache, model_path, "--users", *users, "--topk", k, "--score_batch_size", 2 * N_ITEMS
    )
    single = [recommend_json(cli, tmp_path, cache, model_path, "--users", user, "--topk", k)[0] for user in users]
    for other in (chunked, single):
        for a, b in zip(batched, other, strict=True):
            assert a["user_id"] == b["user_id"]
            assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
            assert [x["score"] for x in a["items"]] == pytest.approx([x["score"] for x in b["items"]], abs=1e-6)

    model = NeuMF(N_USERS, N_ITEMS, FACTORS, LAYERS)
    load_model_weights(model, model_path)
    seen = seen_dense_items(cache)
    items = raw_ids(cache, ITEM_IDS_FILE)
    with torch.inference_mode():
        for dense, result in enumerate(batched):
            logits = model.eval()(torch.full((N_ITEMS,), dense), torch.arange(N_ITEMS)).flatten().tolist()
            expected = sorted((i for i in range(N_ITEMS) if i not in seen[dense]), key=lambda i: (-logits[i], i))[:k]
            assert [str(x["item_id"]) for x in result["items"]] == [items[i] for i in expected]
            expected_scores = [1 / (1 + np.exp(-logits[i])) for i in expected]
            assert [x["score"] for x in result["items"]] == pytest.approx(expected_scores, abs=1e-6)


@pytest.mark.parametrize("kind", ["gmf", "mlp"])
def test_gmf_and_mlp_checkpoints_recommend_and_benchmark(cli, int_data, tmp_path, kind):
    _, cache = int_data
    torch.manual_seed(1)
    model = NeuMF(N_USERS, N_ITEMS, FACTORS, LAYERS, kind=kind).eval()
    with torch.no_grad():  # spread the logits, so the ranking is not decided by rounding
        for tables in model.embeddings():
            for table in tables:
                table.weight.normal_(0.0, 1.0)
    path = tmp_path / f"{kind}.pth"
    torch.save(model.state_dict(), path)
    users = raw_ids(cache, USER_IDS_FILE)[:3]
    result = recommend_json(cli, tmp_path, cache, path, "--users", *users, "--topk", 5)
    seen, items = seen_dense_items(cache), raw_ids(cache, ITEM_IDS_FILE)
    with torch.inference_mode():
        for dense, recommended in enumerate(result):
            logits = model(torch.full((N_ITEMS,), dense), torch.arange(N_ITEMS)).flatten().tolist()
            expected = sorted((i for i in range(N_ITEMS) if i not in seen[dense]), key=lambda i: (-logits[i], i))[:5]
            assert [str(x["item_id"]) for x in recommended["items"]] == [items[i] for i in expected]
    code, out, err = cli("--load_checkpoint_path", path, *"--batch_sizes 4 --num_batches 11 --device cpu".split())
    assert code == 0, err
    sizes = f"factors {FACTORS}" if kind == "gmf" else f"layers {LAYERS}"
    assert f"{kind.upper()}: {N_USERS} users, {N_ITEMS} items, {sizes}, " in out
    code, _, err = cli("--model", kind, "--load_checkpoint_path", path, "--num_batches", 11)
    assert_one_line_error(code, err, "the model sizes come from the checkpoint; drop --model")


def test_benchmark_of_a_random_gmf(cli, tmp_path):
    args = "--model gmf --n_users 30 --n_items 40 -f 4 --batch_sizes 8 --num_batches 11 --device cpu".split()
    code, out, err = cli(*args, "--log_path", tmp_path / "log.json")
    assert code == 0, err
    assert "GMF: 30 users, 40 items, factors 4, 285 parameters" in out  # (30 + 40) x 4 embeddings, final 4 + 1


def test_ties_come_in_ascending_dense_item_order(cli, int_data, tmp_path):
    _, cache = int_data
    model = NeuMF(N_USERS, N_ITEMS, FACTORS, LAYERS)
    with torch.no_grad():  # every item identical: a user's scores all tie
        model.mf_item_embed.weight[:] = model.mf_item_embed.weight[0]
        model.mlp_item_embed.weight[:] = model.mlp_item_embed.weight[0]
    path = tmp_path / "tied.pth"
    torch.save(model.state_dict(), path)
    user = raw_ids(cache, USER_IDS_FILE)[3]
    items = raw_ids(cache, ITEM_IDS_FILE)
    [result] = recommend_json(cli, tmp_path, cache, path, "--users", user, "--topk", 12)
    unseen = [i for i in range(N_ITEMS) if i not in seen_dense_items(cache)[3]]
    assert [str(x["item_id"]) for x in result["items"]] == [items[i] for i in unseen[:12]]
    assert len({x["score"] for x in result["items"]}) == 1
    [result] = recommend_json(cli, tmp_path, cache, path, "--users", user, "--topk", 12, "--include_seen")
    assert [str(x["item_id"]) for x in result["items"]] == items[:12]


def test_string_ids_and_users_file(cli, str_data, model_path, tmp_path):
    ratings, cache = str_data
    table = pd.read_csv(ratings, dtype=str)
    users_file = tmp_path / "users.txt"
    users_file.write_text("u3\n\nu1\n")
    results = recommend_json(cli, tmp_path, cache, model_path, "--users", "u2", "--users_file", users_file, "--topk", 4)
    assert [result["user_id"] for result in results] == ["u2", "u3", "u1"]
    for result in results:
        for entry in result["items"]:
            assert isinstance(entry["item_id"], str) and entry["item_id"] in set(table.item_id)
    code, _, err = cli("--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--users", "1")
    assert_one_line_error(code, err, "unknown user 1", "cold-start")


def test_table_and_csv_outputs(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    users = raw_ids(cache, USER_IDS_FILE)[:2]
    base = ["--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--users", *users]
    code, out, err = cli(*base, "--topk", 3)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["user_id", "rank", "item_id", "score"] and len(lines) == 1 + 2 * 3
    assert [line.split()[:2] for line in lines[1:4]] == [[users[0], "1"], [users[0], "2"], [users[0], "3"]]
    code, _, err = cli(*base, "--topk", 3, "--output", tmp_path / "top.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "top.csv")
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    assert table.user_id.astype(str).tolist() == [users[0]] * 3 + [users[1]] * 3
    assert table["rank"].tolist() == [1, 2, 3] * 2
    assert ((table.score > 0) & (table.score < 1)).all()
    assert table.groupby("user_id").score.is_monotonic_decreasing.all()


def test_recommend_bad_inputs_are_one_line_errors(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    user = raw_ids(cache, USER_IDS_FILE)[0]
    unseen = N_ITEMS - len(seen_dense_items(cache)[0])

    def recommend(*args, data=cache, model=model_path):
        return cli("--mode", "recommend", "--data", data, "--load_checkpoint_path", model, *args)[::2]

    assert_one_line_error(*recommend("--users", user, "99999", "abc"), "99999, abc", "cold-start")
    assert_one_line_error(*recommend("--users", user, "--topk", N_ITEMS + 1), "catalogue")
    assert_one_line_error(*recommend("--users", user, "--topk", unseen + 1), f"only {unseen} items", "--include_seen")
    assert_one_line_error(*recommend("--users", user, "--topk", 0), "--topk")
    assert_one_line_error(*recommend("--users", user, "--output", tmp_path / "top.txt"), ".csv or .json")
    assert_one_line_error(*recommend("--users_file", tmp_path / "missing.txt"), "--users_file")
    assert_one_line_error(*recommend("--users", user, "--bf16"), "benchmark only")

    other = tmp_path / "other.pth"
    torch.save(NeuMF(N_USERS + 1, N_ITEMS, FACTORS, LAYERS).state_dict(), other)
    assert_one_line_error(*recommend("--users", user, model=other), "mf_user_embed.weight")

    old = tmp_path / "old_cache"
    old.mkdir()
    for path in cache.iterdir():
        if path.name != ITEM_IDS_FILE:
            (old / path.name).write_bytes(path.read_bytes())
    assert_one_line_error(*recommend("--users", user, data=old), ITEM_IDS_FILE, "convert.py")


# --- what a recommendation leaves out ---------------------------------------------------------


def write_ncf_paper_files(directory, train, test, negatives):
    """The NCF paper's three files (NAME.train.rating, .test.rating, .test.negative); returns the first."""
    directory.mkdir()
    (directory / "x.train.rating").write_text("".join(f"{u}\t{i}\t5\t{t}\n" for t, (u, i) in enumerate(train)))
    (directory / "x.test.rating").write_text("".join(f"{u}\t{i}\t4\t{10**9 + u}\n" for u, i in test))
    lines = ["\t".join([f"({u},{i})", *map(str, row)]) + "\n" for (u, i), row in zip(test, negatives, strict=True)]
    (directory / "x.test.negative").write_text("".join(lines))
    return directory / "x.train.rating"


@pytest.fixture(scope="module")
def every_kind_of_cache(tiny_cache, tiny_validation_cache, tmp_path_factory):
    """{kind: cache} for the caches convert.py makes: plain, --validation, and the NCF paper's files with
    and without --validation (the plain one with some test pairs among the training pairs, as the paper's)."""
    data = load_cache(tiny_cache)
    train, test, negatives = data.train.tolist(), data.test.tolist(), data.test_negatives.tolist()
    caches = {"plain": tiny_cache, "validation": tiny_validation_cache}
    for kind, extra_train, args in (("ncf-paper", test[::7], []), ("ncf-paper-validation", [], ["--validation"])):
        source = write_ncf_paper_files(tmp_path_factory.mktemp(kind) / "paper", train + extra_train, test, negatives)
        cache = source.parent / "cache"
        converted = run_script("convert.py", "--path", source, "--output", cache, *args, cwd=source.parent)
        assert converted.returncode == 0, converted.stderr
        caches[kind] = cache
    return caches


def oracle_gmf(cache, path):
    """A GMF whose logit is 1 for every item the cache records for the user and 0 for the others:
    a model that has learnt them all, so any of them that is not left out comes first."""
    seen = seen_dense_items(cache)
    n_users, n_items = (load_cache(cache).meta[key] for key in ("n_users", "n_items"))
    model = NeuMF(n_users, n_items, n_items, kind="gmf")
    with torch.no_grad():
        model.mf_item_embed.weight.copy_(torch.eye(n_items))
        model.mf_user_embed.weight.zero_()
        for user, items in seen.items():
            model.mf_user_embed.weight[user, list(items)] = 1.0
        model.final.weight.fill_(1.0)
        model.final.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["plain", "validation", "ncf-paper", "ncf-paper-validation"])
def test_every_item_the_cache_records_is_left_out_unless_include_seen(cli, every_kind_of_cache, tmp_path, kind):
    """Training, validation and test items: none is recommended back, with as large a --topk as the
    busiest user allows (the busiest user then gets exactly the items it never had)."""
    cache = every_kind_of_cache[kind]
    model = oracle_gmf(cache, tmp_path / "oracle.pth")
    seen, users, items = seen_dense_items(cache), raw_ids(cache, USER_IDS_FILE), raw_ids(cache, ITEM_IDS_FILE)
    n_items = len(items)
    k = n_items - max(len(seen[user]) for user in range(len(users)))
    results = recommend_json(cli, tmp_path, cache, model, "--users", *users, "--topk", k)
    code, _, err = cli(
        "--mode", "recommend", "--data", cache, "--load_checkpoint_path", model, "--users", *users,
        "--topk", k, "--output", tmp_path / "top.csv",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(tmp_path / "top.csv", dtype={"user_id": str, "item_id": str})
    for dense, result in enumerate(results):
        recorded = {items[i] for i in seen[dense]}
        recommended = [str(entry["item_id"]) for entry in result["items"]]
        assert len(set(recommended)) == k and not recorded & set(recommended), (kind, dense)
        if len(seen[dense]) == n_items - k:
            assert set(recommended) == set(items) - recorded
        assert table.item_id[table.user_id == users[dense]].tolist() == recommended
    # the busiest user has no k + 1-th item left
    busiest = users[max(range(len(users)), key=lambda user: len(seen[user]))]
    code, _, err = cli(
        "--mode", "recommend", "--data", cache, "--load_checkpoint_path", model, "--users", busiest, "--topk", k + 1
    )
    assert_one_line_error(code, err, f"only {k} items", "--include_seen")
    # --include_seen: the whole catalogue, the recorded items first (the model scores them highest)
    included = recommend_json(cli, tmp_path, cache, model, "--users", *users, "--topk", n_items, "--include_seen")
    for dense, result in enumerate(included):
        recommended = [str(entry["item_id"]) for entry in result["items"]]
        assert sorted(recommended) == sorted(items)
        assert set(recommended[: len(seen[dense])]) == {items[i] for i in seen[dense]}


def test_a_trained_model_recommends_none_of_a_users_items(cli, tiny_validation_cache, tmp_path):
    """End to end: a GMF trained by ncf.py on a --validation cache, asked for every user's top 10."""
    trained = run_script(
        "ncf.py", "--data", tiny_validation_cache, "--model", "gmf", "-e", 2, "-b", 512, "-f", 8, "-l", 0.01,
        "-s", 1, "--checkpoint_dir", tmp_path, "--log_path", tmp_path / "log.json", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "model.pth"
    seen, users, items = (
        seen_dense_items(tiny_validation_cache),
        raw_ids(tiny_validation_cache, USER_IDS_FILE),
        raw_ids(tiny_validation_cache, ITEM_IDS_FILE),
    )
    recorded = [{items[i] for i in seen[dense]} for dense in range(len(users))]
    results = recommend_json(cli, tmp_path, tiny_validation_cache, model, "--users", *users, "--topk", 10)
    for dense, result in enumerate(results):
        assert not recorded[dense] & {str(entry["item_id"]) for entry in result["items"]}
    included = recommend_json(
        cli, tmp_path, tiny_validation_cache, model, "--users", *users, "--topk", 10, "--include_seen"
    )
    assert any(recorded[d] & {str(entry["item_id"]) for entry in r["items"]} for d, r in enumerate(included))


# --- bad input and safe output ----------------------------------------------------------------


def test_a_users_file_that_is_not_text_is_a_one_line_error(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    users_file = tmp_path / "users.bin"
    users_file.write_bytes(b"\xff\xfe\x00\x01")
    code, _, err = cli(
        "--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--users_file", users_file
    )
    assert_one_line_error(code, err, "--users_file", "UTF-8")


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_output_is_replaced_whole_or_not_at_all(cli, int_data, model_path, tmp_path, monkeypatch, suffix):
    """The recommendations go to a temporary file beside --output, renamed over it once complete: a failure
    before the rename leaves the previous file as it was and no temporary file behind."""
    _, cache = int_data
    output = tmp_path / "out" / f"top{suffix}"  # its directory is made
    base = ["--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--output", output]
    code, _, err = cli(*base, "--users", *raw_ids(cache, USER_IDS_FILE)[:2])
    assert code == 0, err
    before = output.read_bytes()

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.os, "replace", fail)
    code, _, err = cli(*base, "--users", *raw_ids(cache, USER_IDS_FILE)[2:5])
    assert_one_line_error(code, err, f"cannot write {output}: No space left on device")
    assert output.read_bytes() == before
    assert [path.name for path in output.parent.iterdir()] == [output.name]


def test_output_in_a_directory_that_cannot_be_made_is_a_one_line_error(cli, int_data, model_path, tmp_path):
    _, cache = int_data
    (tmp_path / "a_file").write_text("x")
    output = tmp_path / "a_file" / "top.csv"
    code, _, err = cli(
        "--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--users", "1",
        "--output", output,
    )  # fmt: skip
    assert_one_line_error(code, err, f"cannot write {output}: File exists")  # the directory cannot be made


@pytest.mark.parametrize(
    "mode, flag",
    [
        ("recommend", ["--batch_sizes", "0"]),
        ("recommend", ["--num_batches", "5"]),
        ("recommend", ["--log_path", "other.json"]),
        ("recommend", ["--n_users", "5"]),
        ("recommend", ["--bf16"]),
        ("benchmark", ["--users", "1"]),
        ("benchmark", ["--topk", "0"]),
        ("benchmark", ["--include_seen"]),
        ("benchmark", ["--output", "top.csv"]),
    ],
)
def test_a_flag_of_the_other_mode_is_refused_not_ignored(cli, int_data, model_path, mode, flag):
    _, cache = int_data
    base = ["--load_checkpoint_path", model_path, "--batch_sizes", 1, "--num_batches", 11]
    if mode == "recommend":
        base = ["--mode", "recommend", "--data", cache, "--load_checkpoint_path", model_path, "--users", "1"]
    other = "benchmark" if mode == "recommend" else "recommend"
    assert_one_line_error(*cli(*base, *flag)[::2], f"{flag[0]} applies to --mode {other} only")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--batch_sizes", 2**50], f"batch size {2**50} does not fit in cpu memory"),
        (["--n_users", 2**50, "--model", "gmf", "-f", 1], "the model does not fit in memory"),
    ],
)
def test_what_does_not_fit_in_cpu_memory_is_a_one_line_error(cli, tmp_path, args, fragment):
    """Petabytes: more than the address space, so the allocation fails at once whatever the overcommit policy."""
    base = ["--device", "cpu", "--num_batches", 11, "--log_path", tmp_path / "log.json"]
    assert_one_line_error(*cli(*base, *args)[::2], fragment)
