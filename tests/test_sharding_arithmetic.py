"""benchmarks/sharding_arithmetic.py: the bytes and capacities it prints are the formulas of docs/sharding.md."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sharding_arithmetic as arithmetic
from neumf import NeuMF

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    command = [sys.executable, "benchmarks/sharding_arithmetic.py", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def tiny(**overrides):
    """GMF of 2 floats per row, 3 users and 1 item, a global batch of 4 on 2 GPUs, 1000 bytes per GPU."""
    flags = ["--catalogues", "3x1", "--gpus", "2", "--model", "gmf", "-f", "2", "-b", "4"]
    flags += ["--device_memory_gb", "1e-6", "--headroom", "0"]
    for flag, value in overrides.items():
        flags += [f"--{flag}", str(value)]
    return arithmetic.parse_args(flags)


def test_a_hand_checked_case():
    args = tiny()
    figures = arithmetic.traffic(args, users=3, items=1, gpus=2)
    assert figures["embedding_parameters"] == 8  # (3 + 1) rows x 2 floats
    assert figures["dense_parameters"] == 3  # final Linear(2 -> 1)
    assert figures["allreduce_bytes"] == 32  # 2 (N-1)/N x 8 floats x 4 bytes
    # half of a local batch of 2 samples lives on the other GPU: 1 sample x 2 rows x 2 floats x 4 bytes,
    # forward and backward, plus its 2 ids of 8 bytes
    assert figures["alltoall_bytes"] == 2 * 16 + 16
    # pooled row-wise reduce-scatters the global batch (4 samples x 4 floats x 4 bytes), all-gathers it back
    assert figures["row_wise_pooled_bytes"] == 2 * (1 / 2) * 64 + 16
    assert figures["dense_allreduce_bytes"] == 12
    assert figures["break_even_local_batch"] == 32 / 24  # all-reduce bytes / all-to-all bytes per local sample
    # 1000 bytes less the dense part (3 x 20), in rows of 2 x 20 (replicated) or 2 x 12 bytes (sharded)
    assert arithmetic.capacity(args, 2) == {"gpus": 2, "replicated_rows": 23, "sharded_rows": 2 * 39}
    assert figures["fits_replicated"] and figures["fits_sharded"]


def test_one_gpu_moves_nothing():
    figures = arithmetic.traffic(tiny(), users=3, items=1, gpus=1)
    assert figures["allreduce_bytes"] == figures["alltoall_bytes"] == figures["row_wise_pooled_bytes"] == 0
    assert figures["allreduce_over_alltoall"] is None and figures["break_even_local_batch"] is None


def test_the_reference_model_has_the_reference_parameter_count():
    args = arithmetic.parse_args([])
    figures = arithmetic.traffic(args, users=138493, items=26744, gpus=8)
    assert figures["embedding_parameters"] + figures["dense_parameters"] == 31_832_577


@pytest.mark.parametrize("kind", ["neumf", "gmf", "mlp"])
def test_the_parameters_counted_are_those_of_the_model(kind):
    layers = [16, 8, 4]
    model = NeuMF(7, 5, mf_dim=6, mlp_layer_sizes=layers, kind=kind)
    widths = arithmetic.table_widths(kind, 6, layers)
    counted = (7 + 5) * sum(widths) + arithmetic.dense_parameters(kind, 6, layers)
    assert counted == sum(parameter.numel() for parameter in model.parameters())
    embeddings = [user.weight.shape[1] for user, _ in model.embeddings()]
    assert widths == embeddings


def test_pooled_row_wise_moves_n_times_the_embedding_bytes_of_the_all_to_all():
    for gpus in (2, 8, 64):
        pooled = arithmetic.row_wise_pooled_bytes(1024, 384, 0, gpus, 4)
        assert pooled == pytest.approx(gpus * arithmetic.alltoall_bytes(1024, 384, 0, gpus, 4))


def test_sharding_moves_fewer_bytes_exactly_below_the_break_even_local_batch():
    args = arithmetic.parse_args(["-b", "163840"])
    above = arithmetic.traffic(args, users=138493, items=26744, gpus=2)  # local batch 81,920
    assert above["local_batch"] > above["break_even_local_batch"] and above["allreduce_over_alltoall"] < 1
    args = arithmetic.parse_args(["-b", "163200"])
    below = arithmetic.traffic(args, users=138493, items=26744, gpus=2)  # local batch 81,600
    assert below["local_batch"] < below["break_even_local_batch"] and below["allreduce_over_alltoall"] > 1


def test_the_script_prints_its_tables_and_writes_json_with_provenance(tmp_path):
    result = run("--catalogues", "1000x100", "--gpus", "2", "4", "-b", "64", "--json", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    assert "DDP all-reduce" in result.stdout and "largest catalogue" in result.stdout
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data["provenance"]) >= {"command", "date", "machine", "versions"}
    assert data["provenance"]["command"].startswith("python benchmarks/sharding_arithmetic.py --catalogues 1000x100")
    assert [row["gpus"] for row in data["results"]["traffic"]] == [2, 4]
    assert data["results"]["traffic"][0]["allreduce_bytes"] == 2 * (1 / 2) * 1100 * 192 * 4


def test_help_works():
    result = run("--help")
    assert result.returncode == 0 and "--catalogues" in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--catalogues", "100"], "--catalogues takes USERSxITEMS"),
        (["--gpus", "3"], "does not split evenly over 3 GPUs"),
        (["--headroom", "1"], "--headroom must be at least 0 and below 1"),
        (["--layers", "7", "4"], "the first MLP layer must be even"),
        (["--gpus", "0"], "--gpus must be positive"),
    ],
)
def test_bad_input_is_one_line(flags, message):
    result = run(*flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert result.stderr.startswith("sharding_arithmetic.py: error: ")


def test_the_json_renders_as_its_tables(tmp_path):
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    render_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_results)
    result = run("--catalogues", "138493x26744", "--gpus", "8", "--json", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    page = render_results.render_page([tmp_path / "s.json"])
    assert "## Sharding arithmetic: `s.json`" in page
    assert "| 138,493 x 26,744 | 8 | 131,072 | 222.1 | 356.0 | 2,822.2 | 0.7 | 0.6238 | 81,767 | yes | yes |" in page
    assert "| 8 | 33,046,317 | 440,617,560 |" in page
