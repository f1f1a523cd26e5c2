"""Classic baselines on a cache, under ncf.py's metrics and protocols: popularity, iALS, BPR, EASE.

    python benchmarks/baselines.py --data data/cache/ml-1m
    python benchmarks/baselines.py --data data/cache/ml-1m --methods ials ease --eval_protocol full --json b.json

Every method trains on the cache's training set, as ncf.py does (it holds neither the validation
nor the test item of a user). Each setting of a method's small grid is scored on the validation split; the
best one (validation HR@10, then NDCG@10) is then scored on the test split: the test set chooses
nothing. iALS and BPR are the `implicit` package's; EASE is its closed form; popularity scores an
item by its number of training interactions. Scores are ranked exactly as ncf.py ranks its
logits (the same candidates, masks and tie rule), so the figures compare with ncf.py's.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dataloading import FullRanking, load_cache, make_evaluator, metrics_from_histogram, rank_histogram
from utils import CliError, needs_extra, run_main, write_results

with needs_extra("baselines"):
    import scipy.sparse
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from threadpoolctl import threadpool_limits

TOPK = 10
PROTOCOLS = ("reference", "exact", "full")
SEED = 1  # of iALS's and BPR's initial factors
USERS_PER_BLOCK = 1024  # users scored at once: a block's scores over all items stay small

# Small grids, around the settings that did best on the validation splits of ML-100k and ML-1m
# users 1-2999, so that ML-1m users 1-2999 runs every method in about a minute on 2 cores.
GRIDS = {
    "popularity": [{}],
    "ials": [
        {"factors": factors, "regularization": regularization, "alpha": alpha, "iterations": 15}
        for factors in (32, 64)
        for regularization in (1.0, 10.0)
        for alpha in (1.0, 4.0)
    ],
    "bpr": [
        {"factors": 64, "learning_rate": 0.01, "regularization": regularization, "iterations": 100}
        for regularization in (0.001, 0.01)
    ],
    "ease": [{"l2": l2} for l2 in (30.0, 100.0, 300.0, 1000.0, 3000.0)],
}


def interactions(data, pairs=None):
    """The training set (or other (user, item) pairs) as a users x items CSR matrix of ones: what
    `implicit` and EASE take."""
    pairs = data.train if pairs is None else pairs
    users, items = pairs[:, 0].numpy(), pairs[:, 1].numpy()
    ones = np.ones(len(users), dtype=np.float32)
    return scipy.sparse.csr_matrix((ones, (users, items)), shape=(data.n_users, data.n_items))


def popularity(train, settings):
    counts = torch.from_numpy(np.asarray(train.sum(axis=0), dtype=np.float32).ravel())
    return lambda users: counts.expand(len(users), -1)


def implicit_model(model_class):
    def fit(train, settings):
        with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads would oversubscribe
            model = model_class(**settings, random_state=SEED, num_threads=torch.get_num_threads())
            model.fit(train, show_progress=False)
        user_factors, item_factors = torch.from_numpy(model.user_factors), torch.from_numpy(model.item_factors)
        return lambda users: user_factors[users] @ item_factors.T

    return fit


def ease(train, settings):
    """EASE (Steck, 2019): B = I - P diag(1/diag(P)) with P = (X^T X + l2 I)^-1; scores X B."""
    gram = torch.from_numpy((train.T @ train).toarray())
    inverse = torch.linalg.inv(gram + settings["l2"] * torch.eye(len(gram)))
    weights = (-inverse / inverse.diagonal()).fill_diagonal_(0.0).numpy()
    return lambda users: torch.from_numpy(train[users.numpy()] @ weights)


FITTERS = {
    "popularity": popularity,
    "ials": implicit_model(AlternatingLeastSquares),
    "bpr": implicit_model(BayesianPersonalizedRanking),
    "ease": ease,
}


def hit_rates(score, evaluator, k=TOPK):
    """(HR@k, NDCG@k) of score(users) -> [len(users), n_items] scores, by ncf.py's evaluate rules:
    the same candidates and masks per protocol, the positive last, and a tie not a win for it."""
    histogram = torch.zeros(k + 1, dtype=torch.int64)
    for start in range(0, evaluator.n_users, USERS_PER_BLOCK):
        stop = min(start + USERS_PER_BLOCK, evaluator.n_users)
        scores = score(evaluator.users[start:stop].long())
        if isinstance(evaluator, FullRanking):
            positives = evaluator.positives[start:stop, None]
            counted = ~evaluator.seen(start, stop)
            counted.scatter_(1, positives, False)
            logits = torch.cat([scores, scores.gather(1, positives)], dim=1)
        else:
            logits = scores.gather(1, evaluator.items[start:stop].long())
            counted = evaluator.counted[start:stop]
        histogram += rank_histogram(logits, counted, k)
    hits, ndcg = metrics_from_histogram(histogram)
    return hits.item() / evaluator.n_users_total, ndcg.item() / evaluator.n_users_total


def run_method(fit, grid, train, refit_train, evaluators, log):
    """Fit every setting, keep the best on validation and score that model on test; then fit the chosen
    setting again on training + validation items (refit_train) and score that on test too, as
    benchmarks/accuracy.py's refit does for the NCF models."""
    start, cpu_start = time.time(), time.process_time()
    best = None
    for settings in grid:
        fit_start = time.time()
        score = fit(train, settings)
        fit_seconds = time.time() - fit_start
        valid = hit_rates(score, evaluators["valid"])
        log(
            f"  {format_settings(settings)}: validation HR@{TOPK} {valid[0]:.4f} NDCG@{TOPK} {valid[1]:.4f} "
            f"(fit {fit_seconds:.1f} s)"
        )
        if best is None or valid > best["valid"]:
            best = {"settings": settings, "score": score, "valid": valid, "fit_seconds": fit_seconds}
    test = hit_rates(best["score"], evaluators["test"])
    refit = hit_rates(fit(refit_train, best["settings"]), evaluators["test"])
    return {
        f"hr@{TOPK}": test[0],
        f"ndcg@{TOPK}": test[1],
        f"refit_hr@{TOPK}": refit[0],
        f"refit_ndcg@{TOPK}": refit[1],
        f"val_hr@{TOPK}": best["valid"][0],
        f"val_ndcg@{TOPK}": best["valid"][1],
        "settings": best["settings"],
        "fit_seconds": best["fit_seconds"],
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # of all threads: what a busy machine barely inflates
    }


def format_settings(settings):
    return " ".join(f"{key}={value:g}" for key, value in settings.items()) or "-"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", required=True, help="cache directory written by convert.py --validation")
    parser.add_argument("--methods", nargs="+", default=list(GRIDS), help=f"any of {', '.join(GRIDS)}")
    parser.add_argument("--eval_protocol", default="reference", help=f"{', '.join(PROTOCOLS)}, as in ncf.py")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = [method for method in args.methods if method not in GRIDS]
    if unknown:
        raise CliError(f"unknown method {unknown[0]!r}; the methods are {', '.join(GRIDS)}")
    if args.eval_protocol not in PROTOCOLS:
        raise CliError(f"unknown --eval_protocol {args.eval_protocol!r}; choose {', '.join(PROTOCOLS)}")
    return args


def main():
    start, cpu_start = time.time(), time.process_time()
    args = parse_args()
    data = load_cache(args.data)
    if data.valid is None:
        raise CliError(
            f"{args.data} has no validation split, on which the baselines' settings are chosen; "
            "make the cache with convert.py --validation"
        )
    cpu = torch.device("cpu")
    evaluators = {split: make_evaluator(data, split, args.eval_protocol, 0, 1, cpu) for split in ("valid", "test")}
    train = interactions(data)
    refit_train = interactions(data, torch.cat([data.train, data.valid]))
    print(f"{data.n_users:,} users, {data.n_items:,} items, {len(data.train):,} training interactions")
    results = {}
    for method in args.methods:
        print(f"{method}:")
        results[method] = run_method(FITTERS[method], GRIDS[method], train, refit_train, evaluators, print)
    print(
        f"\n| method | settings (chosen on validation) | val HR@{TOPK} | val NDCG@{TOPK} | "
        f"test HR@{TOPK} | test NDCG@{TOPK} | refit: test HR@{TOPK} | refit: test NDCG@{TOPK} | fit [s] | "
        "all settings [s] | all settings [CPU s] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, result in results.items():
        print(
            f"| {method} | {format_settings(result['settings'])} | {result[f'val_hr@{TOPK}']:.4f} | "
            f"{result[f'val_ndcg@{TOPK}']:.4f} | {result[f'hr@{TOPK}']:.4f} | {result[f'ndcg@{TOPK}']:.4f} | "
            f"{result[f'refit_hr@{TOPK}']:.4f} | {result[f'refit_ndcg@{TOPK}']:.4f} | "
            f"{result['fit_seconds']:.1f} | {result['seconds']:.1f} | {result['cpu_seconds']:.1f} |"
        )
    elapsed, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    print(f"\nin all, with loading the cache and making the evaluators: {elapsed:.1f} s, {cpu_seconds:.1f} CPU s")
    if args.json is not None:
        try:
            write_results(args.json, results)
        except OSError as error:
            raise CliError(f"cannot write {args.json}: {error.strerror}") from None


if __name__ == "__main__":
    run_main(main)
