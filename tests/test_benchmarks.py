"""Smoke tests of the benchmark scripts on tiny sizes: they run and print every column.

Performance itself is measured by running the benchmarks, never asserted here.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

import ncf
from benchmarks import train_bench
from dataloading import TrainBatches, load_cache
from neumf import NeuMF
from utils import enable_tf32, read_log

ROOT = Path(__file__).resolve().parents[1]

TRAIN_COLUMNS = [
    "precision", "batch", "epoch [s]", "pipeline [samples/s]", "bare step [samples/s]", "pipeline / bare",
    "eval [s]", "eval [users/s]", "eval [samples/s]", "peak RSS [GB]", "peak device [GB]",
]  # fmt: skip


def run(*args):
    command = [sys.executable, *map(str, args)]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )


def table(stdout):
    """The header and rows of the first markdown table in the output."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_train_bench_prints_every_column(tiny_cache, tmp_path, compiled):
    flags = ["--compile"] if compiled else []
    result = run(
        "benchmarks/train_bench.py", "--data", tiny_cache, "--batch_size", 1024, "--json", tmp_path / "r.json", *flags
    )
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header == TRAIN_COLUMNS
    assert len(rows) == 1 and len(rows[0]) == len(TRAIN_COLUMNS)
    assert rows[0][0] == ("fp32 compiled" if compiled else "fp32")
    figures = json.loads((tmp_path / "r.json").read_text())["results"]
    assert figures["compiled"] is compiled
    assert figures["compiles_while_timed"] == (0 if compiled else None)  # the warm-up compiled every shape
    assert figures["tf32"] is False  # a CPU
    for key in ("pipeline_samples_per_s", "bare_step_samples_per_s", "eval_samples_per_s", "peak_host_rss_gb"):
        assert figures[key] > 0
    assert figures["pipeline_over_bare"] == pytest.approx(
        figures["pipeline_samples_per_s"] / figures["bare_step_samples_per_s"]
    )


@pytest.mark.parametrize(
    "precision, device, amp",
    [("fp32", "cuda", False), ("fp16", "cuda", True), ("bf16", "cuda", False), ("fp32", "cpu", False),
     ("bf16", "cpu", True)],
)  # fmt: skip
def test_train_bench_trains_with_ncf_settings(tiny_cache, precision, device, amp):
    # a CUDA device without CUDA: make_optimizer reads more of the settings on CUDA than on the CPU
    args = train_bench.parse_args(["--data", str(tiny_cache), "--precision", precision, "--batch_size", "4096"])
    settings = train_bench.training_settings(args, torch.device(device), tiny_cache)
    assert settings.amp is amp  # ncf.py's --amp: fp16 on CUDA, bf16 on the CPU
    assert vars(settings) == vars(ncf.parse_args(["--data", str(tiny_cache), "-b", "4096", *["--amp"] * amp]))
    optimizer = ncf.make_optimizer(NeuMF(10, 20, 8, [16, 8]), settings, torch.device(device))
    assert optimizer.param_groups[0]["lr"] == settings.learning_rate == 0.0045


def test_train_bench_warms_up_on_every_batch_shape_of_an_epoch(tiny_cache):
    data = load_cache(tiny_cache)
    epoch = TrainBatches(data.train, data.n_items, 4, 1024, 0, 1, torch.device("cpu")).epoch(seed=0)
    shapes = {len(labels) for *_, labels in epoch}
    assert len(shapes) == 2  # full batches and the last, short one
    assert {len(labels) for *_, labels in train_bench.warmup_batches(epoch)} == shapes


def test_enable_tf32_only_on_cuda():
    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    try:
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
        assert enable_tf32(torch.device("cpu")) is False
        assert (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32) == (False, False)
        assert enable_tf32(torch.device("cuda")) is True  # the flags are settable without a GPU
        assert (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32) == (True, True)
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", 10**9], "--batch_size must be between 1 and"),
        (["--device", "tpu"], "device"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    ],
)
def test_train_bench_refuses_impossible_settings(tiny_cache, flags, message):
    result = run("benchmarks/train_bench.py", "--data", tiny_cache, *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("train_bench.py: error:") and message in result.stderr


def test_convert_bench_prints_the_comparison(tmp_path):
    result = run(
        "benchmarks/convert_bench.py", "--preset", "ml-100k", "--workdir", tmp_path, "--json", tmp_path / "convert.json"
    )
    assert result.returncode == 0, result.stderr
    rows = ("read_csv (call)", "read_csv (process)", "end to end", "peak RSS", "read_csv process", "read_csv call")
    for row in rows:
        assert row in result.stdout
    figures = json.loads((tmp_path / "convert.json").read_text())["results"]
    assert figures["ratio"] == pytest.approx(figures["convert_s"] / figures["read_csv_process_s"])
    assert figures["read_csv_s"] < figures["read_csv_process_s"]  # the call is part of the process
    assert figures["cache"]["n_users"] == 943
    assert "import torch alone (process)" in result.stdout
    assert figures["import_torch_ratio"] == pytest.approx(
        figures["import_torch_process_s"] / figures["read_csv_process_s"]
    )


def test_accuracy_bench_reports_each_model_over_seeds(shared_data, tmp_path):
    result = run(
        "benchmarks/accuracy.py", "--datasets", "ml-100k", "--settings", "neumf-pre", "--seeds", 2,
        "--epochs", 1, "--workdir", tmp_path, "--json", tmp_path / "a.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header[:4] == ["dataset", "model", "test HR@10", "test NDCG@10"]
    assert [row[1] for row in rows] == ["gmf", "mlp", "neumf-pre"]  # the branches are trained first
    runs = json.loads((tmp_path / "a.json").read_text())["results"]
    for row in rows:
        seeds = runs[f"ml-100k {row[1]}"]
        assert [r["seed"] for r in seeds] == [2] and all(r["epochs"] == 1 for r in seeds)
        for cell, key in zip(row[2:6], ("hr@10", "ndcg@10", "refit_hr@10", "refit_ndcg@10"), strict=True):
            assert cell == f"{seeds[0][key]:.4f} ± 0.0000"
        assert 0.2 < seeds[0]["hr@10"] < 1.0  # one epoch on ML-100k: about 0.4; random scores give about 0.1
        for r in seeds:  # the refit trained as many epochs as validation chose, on the cache without a split
            refit_log = tmp_path / "logs" / f"ml-100k-full-{row[1]}-seed{r['seed']}.json"
            refit = [json.loads(line[5:]) for line in refit_log.read_text().splitlines()]
            refit_epochs = [x["data"] for x in refit if isinstance(x["step"], list) and len(x["step"]) == 1]
            assert len(refit_epochs) == r["epoch"] + 1 and refit_epochs[-1]["hr@10"] == r["refit_hr@10"]
    assert (tmp_path / "checkpoints" / "ml-100k-neumf-pre-seed2" / "model.pth").exists()
    refit_pre = (tmp_path / "logs" / "ml-100k-full-neumf-pre-seed2.json").read_text().splitlines()[0]
    parameters = json.loads(refit_pre[5:])["data"]  # the refit starts from the refit branches' last epoch
    assert parameters["pretrained_gmf"].endswith("ml-100k-full-gmf-seed2/last.pth")
    assert parameters["pretrained_mlp"].endswith("ml-100k-full-mlp-seed2/last.pth")


def test_accuracy_bench_names_the_data_location_when_files_are_missing(tmp_path):
    ml_1m = tmp_path / "data" / "ml-1m" / "ratings.PARTIAL-users-1-2999.dat"
    ml_1m.parent.mkdir(parents=True)
    ml_1m.write_text("1::1::5::978300760\n")  # ml-100k is missing: nothing runs, not even ml-1m
    env = os.environ | {"OMP_NUM_THREADS": "1", "NCF_SHARED_DATA": str(tmp_path / "data")}
    command = ["benchmarks/accuracy.py", "--datasets", "ml-1m", "ml-100k", "--settings", "gmf", "--seeds", "1"]
    command += ["--epochs", "1", "--workdir", str(tmp_path / "work")]
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("accuracy.py: error: ")
    for named in (str(tmp_path / "data" / "ml-100k" / "u.data"), "--shared_data", "NCF_SHARED_DATA"):
        assert named in result.stderr
    assert not (tmp_path / "work").exists()


def fake_movielens(ratings_csv, directory):
    """The ML-1m and ML-100k files accuracy.py reads, holding a synthetic ratings file in their formats."""
    ratings = pd.read_csv(ratings_csv)
    ratings["rating"] = ratings.rating.round().astype(int)  # both formats hold whole stars
    rows = list(ratings[["userId", "movieId", "rating", "timestamp"]].itertuples(index=False))
    for name, separator in (("ml-1m/ratings.PARTIAL-users-1-2999.dat", "::"), ("ml-100k/u.data", "\t")):
        (directory / name).parent.mkdir(parents=True)
        (directory / name).write_text("".join(separator.join(map(str, row)) + "\n" for row in rows))
    return directory


def test_run_gpu_dry_run_runs_every_step_on_the_cpu(tiny_cache, tmp_path):
    shared_data = fake_movielens(tiny_cache.parent / "ratings.csv", tmp_path / "movielens")
    out = tmp_path / "out"
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is this one
        "DRY_RUN": "1", "OUT": str(out), "WORK": str(tmp_path / "work"), "NCF_SHARED_DATA": str(shared_data),
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    result = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "accuracy.json", "inference-bf16.json", "inference-fp32.json", "train-synthetic-tiny-bf16-compiled.json",
        "train-synthetic-tiny-bf16.json", "train-synthetic-tiny-fp32.json",
    ]  # fmt: skip
    for name, precision, compiled in (
        ("bf16", "bf16", False),
        ("fp32", "fp32", False),
        ("bf16-compiled", "bf16", True),
    ):
        figures = json.loads((out / f"train-synthetic-tiny-{name}.json").read_text())["results"]
        assert (figures["device"].split()[0], figures["precision"], figures["compiled"]) == ("cpu", precision, compiled)
        assert (figures["users"], figures["items"], figures["batch_size"]) == (60, 200, 1024)
    for precision in ("bf16", "fp32"):
        logged = {key for record in read_log(out / f"inference-{precision}.json") for key in record.get("data", {})}
        assert {"batch_1_mean_throughput", "batch_1024_mean_throughput"} <= logged
    accuracy = json.loads((out / "accuracy.json").read_text())["results"]
    assert sorted(accuracy) == ["ml-100k reference", "ml-1m reference"]
    assert all(run["epochs"] == 1 for runs in accuracy.values() for run in runs)


def benchmark_set_commands(script, tmp_path, **env):
    """The command lines a benchmarks/run_*.sh runs, and its stdout, with `python` and `nvidia-smi` stand-ins."""
    shims, log = tmp_path / "bin", tmp_path / "commands.txt"
    shims.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    for name in ("python", "nvidia-smi"):
        (shims / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (shims / name).chmod(0o755)
    env = os.environ | {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "WORK": str(tmp_path / "w")} | env
    result = subprocess.run(["bash", f"benchmarks/{script}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return [line.split() for line in log.read_text().splitlines()], result.stdout


@pytest.mark.parametrize("script", ["run_cpu.sh", "run_gpu.sh"])
def test_benchmark_sets_pass_flags_their_scripts_accept(tmp_path, monkeypatch, script):
    (tmp_path / "movielens").mkdir()
    commands, _ = benchmark_set_commands(script, tmp_path, OUT=str(tmp_path / "out"), NCF_SHARED_DATA=str(tmp_path))
    assert len(commands) > 5
    for program, path, *argv in commands:
        if program == "python":
            spec = importlib.util.spec_from_file_location(f"run_sh_{Path(path).stem}", ROOT / path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            monkeypatch.setattr(sys, "argv", [path, *argv])
            try:
                module.parse_args()
            except SystemExit:
                pytest.fail(f"{script}: {path} refuses {shlex.join(argv)}")


def test_run_gpu_dry_run_runs_the_flags_of_the_gpu_run(tmp_path):
    data = {"NCF_SHARED_DATA": str(tmp_path / "movielens")}
    (tmp_path / "movielens").mkdir()
    gpu, _ = benchmark_set_commands("run_gpu.sh", tmp_path, OUT=str(tmp_path / "gpu"), **data)
    dry, _ = benchmark_set_commands("run_gpu.sh", tmp_path, OUT=str(tmp_path / "dry"), DRY_RUN="1", **data)
    assert gpu[0][0] == "nvidia-smi" and all(command[0] == "python" for command in gpu[1:] + dry)

    def flags(commands):
        return {(command[1], word) for command in commands for word in command if word.startswith("--")}

    def devices(commands):
        return {command[command.index("--device") + 1] for command in commands if "--device" in command}

    # what the dry run does not run: the ML-20m shape and fp16, which needs CUDA
    assert flags(gpu[1:]) - flags(dry) == {("synthetic.py", "--preset"), ("inference.py", "--fp16")}
    assert {command[1] for command in gpu[1:]} == {command[1] for command in dry}
    assert devices(gpu) == {"cuda"} and devices(dry) == {"cpu"}


@pytest.mark.parametrize("script", ["run_cpu.sh", "run_gpu.sh"])
def test_benchmark_sets_skip_the_real_data_steps_without_movielens_files(tmp_path, script):
    out, missing = str(tmp_path / "out"), tmp_path / "none"
    commands, stdout = benchmark_set_commands(script, tmp_path, OUT=out, NCF_SHARED_DATA=str(missing))
    scripts = {command[1] for command in commands}
    assert "benchmarks/accuracy.py" not in scripts and "benchmarks/full_ranking_bench.py" not in scripts
    assert "benchmarks/train_bench.py" in scripts  # the rest runs
    assert f"{script}: no MovieLens files at {missing}: " in stdout and "skipped (set NCF_SHARED_DATA" in stdout


def test_stability_reports_the_spread_over_seeds(tiny_validation_cache, tmp_path):
    result = run(
        "benchmarks/stability.py", "--data", tiny_validation_cache, "--seeds", 2, "--workdir", tmp_path,
        "--json", tmp_path / "s.json", "--", "--model", "gmf", "-e", 3, "-b", 512,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header == ["metric", "mean", "std", "min", "max"]
    figures = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [r["seed"] for r in figures["runs"]] == [1, 2]
    for r in figures["runs"]:  # the validation-selected epoch of each run's own log
        log = (tmp_path / "logs" / f"seed{r['seed']}.json").read_text()
        records = [json.loads(line[5:]) for line in log.splitlines()]
        epochs = [rec["data"] for rec in records if isinstance(rec["step"], list) and len(rec["step"]) == 1]
        best = max(range(len(epochs)), key=lambda e: (epochs[e]["val_hr@10"], -e))
        assert (r["epoch"], r["val_hr@10"], r["hr@10"]) == (best, epochs[best]["val_hr@10"], epochs[best]["hr@10"])
    for row, key in zip(rows, ("val_hr@10", "hr@10", "epoch"), strict=True):
        values = [r[key] for r in figures["runs"]]
        expected = [sum(values) / 2, abs(values[0] - values[1]) / 2**0.5, min(values), max(values)]
        assert [float(cell) for cell in row[1:]] == pytest.approx(expected, abs=5e-5)
    assert (tmp_path / "best_hr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", 1], "--seeds must be at least 2"),
        (["--", "--seed", 3], "--seed is set by stability.py"),
        (["--", "--epochs", 0], "ncf.py failed with seed 1: ncf.py: error: --epochs must be at least 1"),
    ],
)
def test_stability_refuses_bad_input(tiny_validation_cache, flags, message):
    result = run("benchmarks/stability.py", "--data", tiny_validation_cache, *flags)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_stability_needs_a_validation_split(tiny_cache):
    result = run("benchmarks/stability.py", "--data", tiny_cache, "--seeds", 2)
    assert result.returncode == 2 and "has no validation split" in result.stderr


def test_tune_bench_runs_the_same_trials_with_and_without_pruning(tiny_validation_cache, tmp_path):
    result = run(
        "benchmarks/tune_bench.py", "--data", tiny_validation_cache, "--trials", 3, "--workdir", tmp_path,
        "--json", tmp_path / "t.json", "--", "--model", "gmf", "--epochs", 2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header[:4] == ["pruner", "trials", "pruned", "epochs trained"]
    assert [row[0] for row in rows] == ["none", "median"]
    figures = json.loads((tmp_path / "t.json").read_text())["results"]
    assert figures["none"]["epochs"] == 6 and figures["none"]["pruned"] == 0
    assert all(0 < figures[p]["overhead"] < 1 and figures[p]["trials"] == 3 for p in ("none", "median"))
    studies = [optuna.load_study(study_name=p, storage=f"sqlite:///{tmp_path / p}.db") for p in ("none", "median")]
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]  # the same trials


def test_benchmark_json_names_its_command_date_machine_and_versions(tiny_cache, tmp_path):
    result = run("benchmarks/train_bench.py", "--data", tiny_cache, "--batch_size", 1024, "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    provenance = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert provenance["command"].startswith("python benchmarks/train_bench.py --data ")
    assert provenance["command"].endswith(f"--batch_size 1024 --json {tmp_path / 'r.json'}")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", provenance["date"])
    assert provenance["machine"]["cores"] == os.cpu_count() and provenance["machine"]["gpus"] == []
    assert provenance["versions"]["torch"] == torch.__version__


def test_sharding_bench_halves_the_table_state_on_two_ranks(tmp_path):
    pytest.importorskip("torchrec", reason="the 'sharding' extra (TorchRec) is not installed")
    result = run(
        "benchmarks/sharding_bench.py", "--users", 400, "--items", 200, "--batch_size", 512, "--steps", 2,
        "--warmup", 1, "--json", tmp_path / "s.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    header, rows = table(result.stdout)
    assert header[0] == "tables" and [row[0] for row in rows] == ["replicated", "table_wise", "column_wise", "row_wise"]
    layouts = json.loads((tmp_path / "s.json").read_text())["results"]["layouts"]
    replicated = layouts["none"]
    # 400 + 200 rows of 32 + 32 floats, and Adagrad's sums of the same size (its step counts aside)
    assert replicated["table_bytes"] == (400 + 200) * 64 * 4
    assert replicated["optimizer_bytes"] >= replicated["table_bytes"]
    for kind in ("column_wise", "row_wise"):  # even splits: each of 2 ranks holds half of every table
        assert layouts[kind]["table_bytes"] == replicated["table_bytes"] // 2
        assert layouts[kind]["optimizer_bytes"] == replicated["table_bytes"] // 2
        assert layouts[kind]["bytes_ratio"] == pytest.approx(0.5, abs=0.01)
    assert layouts["table_wise"]["table_bytes"] < replicated["table_bytes"]
