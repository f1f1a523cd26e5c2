"""benchmarks/baselines.py: each baseline against an independent computation, and its metric code
against ncf.py's evaluate."""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cache

import ncf
from benchmarks import baselines
from dataloading import load_cache, make_evaluator

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def run(*args):
    command = [sys.executable, *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("protocol", ["reference", "full"])
def test_popularity_hit_rate_is_a_count(tiny_validation_cache, protocol, split):
    data = load_cache(tiny_validation_cache)
    popularity = np.bincount(data.train[:, 1].numpy(), minlength=data.n_items)
    held_out, other = (data.valid, data.test) if split == "valid" else (data.test, data.valid)
    sampled = data.valid_negatives if split == "valid" else data.test_negatives
    hits = ndcg = 0.0
    for user, positive in held_out.tolist():
        if protocol == "reference":
            negatives = set(sampled[user].tolist()) - {positive}
        else:  # every item but the user's training items and its other held-out item
            known = set(data.train[data.train[:, 0] == user, 1].tolist()) | {other[user, 1].item()}
            negatives = set(range(data.n_items)) - known - {positive}
        rank = sum(popularity[item] >= popularity[positive] for item in negatives)  # ties go against it
        if rank < 10:
            hits, ndcg = hits + 1, ndcg + 1 / math.log2(rank + 2)
    score = baselines.popularity(baselines.interactions(data), {})
    hr, ndcg_at_10 = baselines.hit_rates(score, make_evaluator(data, split, protocol, 0, 1, CPU))
    assert hr == hits / data.n_users
    assert ndcg_at_10 == pytest.approx(ndcg / data.n_users, abs=1e-12)
    assert 0 < hr < 1  # neither all nor nothing: the count above was put to the test


def test_ease_is_its_closed_form():
    """Each column of B is the ridge regression of that item on the others (its own weight held at 0)."""
    rng = np.random.default_rng(0)
    x = (rng.random((12, 7)) < 0.4).astype(np.float32)
    l2 = 2.5
    expected = np.zeros((7, 7))
    for item in range(7):
        others = [j for j in range(7) if j != item]
        a = x[:, others].astype(np.float64)
        expected[others, item] = np.linalg.solve(a.T @ a + l2 * np.eye(6), a.T @ x[:, item])
    score = baselines.ease(baselines.scipy.sparse.csr_matrix(x), {"l2": l2})
    np.testing.assert_allclose(score(torch.arange(12)).numpy(), x @ expected, rtol=1e-4, atol=1e-5)


def evaluator(data):
    return make_evaluator(data, "test", "reference", 0, 1, CPU)


def test_ials_beats_popularity_on_latent_taste(tmp_path):
    """End to end: settings chosen on validation, scored on test, in the table and the JSON."""
    cache = make_cache(tmp_path, users=1000, items=300, ratings=40_000, convert_args=["--validation"])
    result = run(
        "benchmarks/baselines.py", "--data", cache, "--methods", "popularity", "ials", "--json", tmp_path / "b.json"
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["method", "popularity", "ials"]
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert set(results["ials"]) == {
        "hr@10", "ndcg@10", "val_hr@10", "val_ndcg@10", "refit_hr@10", "refit_ndcg@10", "settings", "fit_seconds",
        "seconds", "cpu_seconds",
    }  # fmt: skip
    assert results["ials"]["settings"] in baselines.GRIDS["ials"]
    assert results["ials"]["hr@10"] > results["popularity"]["hr@10"] + 0.05
    assert results["ials"]["ndcg@10"] > results["popularity"]["ndcg@10"]
    # the refit: popularity counted over training + validation items, scored on test
    data = load_cache(cache)
    counts = np.bincount(torch.cat([data.train, data.valid])[:, 1].numpy(), minlength=data.n_items)
    refit = baselines.hit_rates(lambda users: torch.from_numpy(counts).float().expand(len(users), -1), evaluator(data))
    assert (results["popularity"]["refit_hr@10"], results["popularity"]["refit_ndcg@10"]) == refit
    assert refit != (results["popularity"]["hr@10"], results["popularity"]["ndcg@10"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "ials", "knn"], "unknown method 'knn'; the methods are popularity, ials, bpr, ease"),
        (["--eval_protocol", "sampled"], "unknown --eval_protocol 'sampled'"),
        ([], "has no validation split"),
    ],
)
def test_bad_input_is_one_line(tiny_cache, flags, message):
    result = run("benchmarks/baselines.py", "--data", tiny_cache, *flags)
    assert result.returncode == 2
    assert result.stderr.startswith("baselines.py: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


class FixedScores(torch.nn.Module):
    """A "model" whose logits are a fixed [users, items] matrix, for ncf.evaluate."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def score_grid(self, users, items):
        rows = self.scores[users.long()]
        return rows[:, items.long()] if items.dim() == 1 else rows.gather(1, items.long())


@pytest.mark.parametrize("protocol", ["reference", "exact", "full"])
def test_metrics_agree_with_ncf_evaluate(tiny_validation_cache, protocol):
    data = load_cache(tiny_validation_cache)
    # few distinct values: many ties, which must go against the positive in both
    scores = torch.randint(0, 30, (data.n_users, data.n_items), generator=torch.Generator().manual_seed(0)).float()
    evaluator = make_evaluator(data, "test", protocol, 0, 1, CPU)
    args = argparse.Namespace(topk=10, valid_batch_size=5000)
    hr, ndcg, _, _ = ncf.evaluate(FixedScores(scores), evaluator, args, contextlib.nullcontext())
    assert baselines.hit_rates(lambda users: scores[users], evaluator) == (hr, ndcg)
    assert 0 < hr < 1
