"""Write a synthetic MovieLens-like ratings file: the suite's default dataset, needing no download.

The file has the ml-20m layout (`userId,movieId,rating,timestamp`, sorted by user then movie), so
`convert.py --format ml-20m` reads it. It is fully determined by the arguments (sizes, --seed and the
shape options below).

How it is made:
  * items have Zipf-like popularity, weight ~ rank^-popularity_exponent, ranks shuffled over ids;
  * each user rates at least --min_ratings items; the rest of its activity follows a Pareto
    (power-law) tail scaled so that the file has about --ratings rows (at most half the items);
  * taste is latent: every item has a random vector in R^dim, every user belongs to one of
    --clusters taste groups with a vector of its own, and a group rates item i with probability
    ~ popularity_i * exp(taste_strength * <group, item_i>). A user draws --taste_share of its items
    from its group's distribution and the rest from plain popularity, so a model that learns the
    groups beats a popularity ranking;
  * a user's ratings are spread over its own active period (timestamps in seconds, ties happen),
    rating values follow MovieLens' half-star histogram (they carry no signal: NCF ignores them).
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from utils import CliError, run_main

PRESETS = {  # the shapes of the MovieLens releases: users, items, ratings
    "ml-100k": (943, 1_682, 100_000),
    "ml-1m": (6_040, 3_706, 1_000_209),
    "ml-20m": (138_493, 26_744, 20_000_263),
}
RATING_VALUES = np.array(["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"])
RATING_SHARES = np.array([1.1, 3.4, 1.2, 7.2, 4.4, 21.3, 10.5, 27.8, 7.7, 14.5])  # % of ML-20m ratings
FIRST_TIMESTAMP, LAST_TIMESTAMP = 789_652_009, 1_427_784_002  # the span of ML-20m


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output", required=True, help="ratings CSV to write")
    parser.add_argument("--preset", choices=PRESETS, default="ml-1m", help="shape of a MovieLens release")
    parser.add_argument("--users", type=int, help="number of users (overrides the preset)")
    parser.add_argument("--items", type=int, help="number of items (overrides the preset)")
    parser.add_argument("--ratings", type=int, help="about this many ratings (overrides the preset)")
    parser.add_argument("--min_ratings", type=int, default=20, help="ratings every user has at least")
    parser.add_argument("--clusters", type=int, default=32, help="number of latent taste groups")
    parser.add_argument("--dim", type=int, default=16, help="dimension of the latent taste vectors")
    parser.add_argument("--taste_strength", type=float, default=2.0, help="how sharply groups prefer items")
    parser.add_argument("--taste_share", type=float, default=0.8, help="share of a user's items drawn by taste")
    parser.add_argument("--popularity_exponent", type=float, default=0.8, help="Zipf exponent of popularity")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def activity(rng, n_users, n_ratings, min_ratings, cap):
    """Ratings per user: min_ratings plus a Pareto tail, scaled to total about n_ratings."""
    tail = rng.pareto(1.5, n_users)
    extra_total = n_ratings - n_users * min_ratings
    scale = extra_total / tail.sum()
    for _ in range(20):  # the cap removes mass; rescale until the total settles
        counts = np.minimum(min_ratings + np.rint(scale * tail), cap)
        missing = n_ratings - counts.sum()
        if abs(missing) <= max(1, n_ratings // 10_000):
            break
        scale *= 1 + missing / max(1.0, (counts - min_ratings).sum())
    return counts.astype(np.int64)


def item_distributions(rng, n_items, args):
    """Row 0: popularity. Rows 1..clusters: each taste group's item distribution. As CDFs."""
    popularity = rng.permutation(np.arange(1, n_items + 1, dtype=np.float64) ** -args.popularity_exponent)
    item_vectors = rng.normal(size=(n_items, args.dim)) / np.sqrt(args.dim)
    group_vectors = rng.normal(size=(args.clusters, args.dim))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, in one line
        logits = args.taste_strength * group_vectors @ item_vectors.T
    if not np.isfinite(logits).all():
        raise CliError(f"--taste_strength {args.taste_strength} is too large: the items' weights overflow")
    weights = np.vstack([popularity, popularity * np.exp(logits - logits.max(axis=1, keepdims=True))])
    cdfs = np.cumsum(weights, axis=1)
    cdfs /= cdfs[:, -1:]
    cdfs[:, -1] = 1.0
    return cdfs


def draw(rng, cdfs, rows):
    """One item for each entry of `rows` (a row of `cdfs`), all at once.

    Row r's CDF is shifted by r, so the rows laid end to end are increasing and one
    searchsorted answers draws from every row.
    """
    n_items = cdfs.shape[1]
    flat = (cdfs + np.arange(len(cdfs))[:, None]).ravel()
    found = np.searchsorted(flat, rows + rng.random(len(rows)), side="right")
    return np.minimum(found - rows * n_items, n_items - 1)


def sample_interactions(rng, counts, group, cdfs, taste_share):
    """Distinct (user, item) pairs, counts[u] of them for user u, sorted by user then item.

    Draws repeat items, so each round tops up the users still short of their count; from the
    fourth round on they draw uniformly, so that heavy users of a narrow taste finish quickly.
    """
    n_users, n_items = len(counts), cdfs.shape[1]
    uniform_row = len(cdfs)
    cdfs = np.vstack([cdfs, np.arange(1, n_items + 1) / n_items])
    finished = []
    keys = np.empty(0, np.int64)  # pairs of users still short of their count
    have = np.zeros(n_users, np.int64)
    for round_number in range(1_000):
        deficit = counts - have
        if not deficit.any():
            break
        new_users = np.repeat(np.arange(n_users), deficit + (deficit + 7) // 8)
        if round_number < 3:
            by_taste = rng.random(len(new_users)) < taste_share
            rows = np.where(by_taste, group[new_users] + 1, 0)
        else:
            rows = np.full(len(new_users), uniform_row)
        new_keys = new_users * n_items + draw(rng, cdfs, rows)
        keys, first = np.unique(np.concatenate([keys, new_keys]), return_index=True)
        # keep what a user already had, then new draws in the order drawn, up to its count
        order = np.lexsort((first, keys // n_items))
        key_users = keys[order] // n_items
        starts = np.r_[0, np.cumsum(np.bincount(key_users, minlength=n_users))[:-1]]
        keys = np.sort(keys[order][np.arange(len(order)) - starts[key_users] < counts[key_users]])
        have = np.bincount(keys // n_items, minlength=n_users)
        done = (have == counts)[keys // n_items]
        finished.append(keys[done])
        keys = keys[~done]
        have[have == counts] = 0
        counts = np.where(np.bincount(finished[-1] // n_items, minlength=n_users) > 0, 0, counts)
    keys = np.sort(np.concatenate(finished))
    return np.divmod(keys, n_items)


def timestamps(rng, users, n_users):
    """Each user rates within its own active period, inside the span of ML-20m."""
    span = LAST_TIMESTAMP - FIRST_TIMESTAMP
    length = np.minimum(rng.lognormal(np.log(30 * 86_400), 2.0, n_users), span).astype(np.int64)
    start = FIRST_TIMESTAMP + (rng.random(n_users) * (span - length)).astype(np.int64)
    return start[users] + (rng.random(len(users)) * length[users]).astype(np.int64)


def generate(n_users, n_items, n_ratings, args):
    rng = np.random.default_rng(args.seed)
    cap = max(args.min_ratings, n_items // 2)
    counts = activity(rng, n_users, n_ratings, args.min_ratings, cap)
    group = rng.integers(0, args.clusters, n_users)
    cdfs = item_distributions(rng, n_items, args)
    users, items = sample_interactions(rng, counts, group, cdfs, args.taste_share)
    movie_ids = np.sort(rng.choice(np.arange(1, 5 * n_items + 1), n_items, replace=False))
    return pa.table(
        {
            "userId": users + 1,
            "movieId": movie_ids[items],
            "rating": pa.array(RATING_VALUES).take(
                rng.choice(len(RATING_VALUES), len(users), p=RATING_SHARES / RATING_SHARES.sum())
            ),
            "timestamp": timestamps(rng, users, n_users),
        }
    )


def main():
    args = parse_args()
    n_users, n_items, n_ratings = PRESETS[args.preset]
    n_users = n_users if args.users is None else args.users  # an explicit 0 is an error, not "use the preset"
    n_items = n_items if args.items is None else args.items
    n_ratings = n_ratings if args.ratings is None else args.ratings
    if min(n_users, n_items, args.min_ratings, args.clusters, args.dim) < 1:
        raise CliError("--users, --items, --min_ratings, --clusters and --dim must be positive")
    if args.seed < 0:
        raise CliError("--seed must be non-negative")
    if not math.isfinite(args.taste_strength):
        raise CliError(f"--taste_strength must be finite, got {args.taste_strength}")
    if not 0 <= args.taste_share <= 1:  # NaN too
        raise CliError(f"--taste_share must be in [0, 1], got {args.taste_share}")
    if not 0 <= args.popularity_exponent < math.inf:
        raise CliError(f"--popularity_exponent must be finite and >= 0, got {args.popularity_exponent}")
    if n_items < 2 * args.min_ratings:
        raise CliError(f"--items must be at least twice --min_ratings ({2 * args.min_ratings})")
    if n_ratings < n_users * args.min_ratings:
        raise CliError(f"--ratings must be at least users x min_ratings ({n_users * args.min_ratings:,})")
    if n_ratings > n_users * (n_items // 2):
        raise CliError(f"--ratings must be at most users x items / 2 ({n_users * (n_items // 2):,})")
    output = Path(args.output)
    if output.is_dir():
        raise CliError(f"--output {output} is a directory; give the path of the CSV file to write")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot write to {output.parent}: {error.strerror}") from None
    table = generate(n_users, n_items, n_ratings, args)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(b"userId,movieId,rating,timestamp\n")
            pacsv.write_csv(table, file, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        tmp.replace(output)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CliError(f"cannot write {output}: {error.strerror}") from None
        raise
    print(f"{output}: {n_users:,} users, {n_items:,} items, {table.num_rows:,} ratings")


if __name__ == "__main__":
    run_main(main)
