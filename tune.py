"""Hyperparameter search for ncf.py with Optuna, on the validation split: never on the test set.

    python tune.py --data data/cache/ml-1m-valid --model gmf --trials 50 --study_name ml-1m-gmf
    python tune.py --data CACHE --trials 30 --study_name x --fix learning_rate=0.002 --range factors=16:64

Each trial trains in this process with ncf.py's own code (the cache is loaded once) and reports
its validation HR@10 after every epoch, so that the pruner can stop a trial that trails the
others. The study lives in --storage: run the command again, after a crash or on other machines
pointing at the same database, and the processes share one study until it holds --trials
finished trials. At the end (or on Ctrl-C) the best trial is printed as a ready-to-run ncf.py
command and written to --output.
"""

import argparse
import math
import shlex
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import ncf
from utils import (
    CliError,
    JsonLineLogger,
    load_state_dict_file,
    model_config,
    needs_extra,
    require_torch,
    run_main,
    write_json,
)

with needs_extra("tune"):
    import optuna
    import sqlalchemy
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVES = {"hr": "val_hr@10", "ndcg": "val_ndcg@10"}  # --objective: the trial's figure it maximizes
POLL_SECONDS = 2  # how often a process whose share is done looks whether the others' trials ended


def parse_args():
    parser = argparse.ArgumentParser(
        description="Hyperparameter search for ncf.py (Optuna), selecting on the validation split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data", required=True, help="cache with a validation split (convert.py --validation)")
    parser.add_argument("--model", choices=["neumf", "gmf", "mlp"], default="neumf")
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    parser.add_argument("--storage", default="sqlite:///study.db", help="SQLAlchemy URL of the study's database")
    parser.add_argument("--study_name", required=True)
    parser.add_argument("-e", "--epochs", type=int, default=20, help="epochs per trial")
    parser.add_argument("--patience", type=int, help="ncf.py --patience of every trial")
    parser.add_argument("--amp", action="store_true", help="ncf.py --amp in every trial")
    parser.add_argument("-s", "--seed", type=int, default=1, help="ncf.py --seed of every trial")
    parser.add_argument("--objective", choices=OBJECTIVES, default="hr", help="validation HR@10 or NDCG@10")
    parser.add_argument("--pruner", choices=["median", "none"], default="median")
    parser.add_argument(
        "--fix", nargs="+", action="extend", default=[], metavar="NAME=VALUE", help="take a parameter out of the search"
    )
    parser.add_argument(
        "--range", nargs="+", action="extend", default=[], metavar="NAME=LOW:HIGH", help="search a parameter there"
    )
    parser.add_argument(
        "--enqueue", action="append", default=[], metavar="NAME=VALUE,...", help="try these parameters first"
    )
    parser.add_argument("--pretrained_gmf", help="NeuMF only: start every trial from this GMF (and --pretrained_mlp)")
    parser.add_argument("--pretrained_mlp", help="NeuMF only: start every trial from this MLP (and --pretrained_gmf)")
    parser.add_argument(
        "--heartbeat", type=int, default=30, help="seconds between a trial's signs of life; one silent for twice "
        "as long (its process was killed) is failed and run again"
    )  # fmt: skip
    parser.add_argument("--output", default="best.json", help="where the best trial is written as JSON")
    args = parser.parse_args()
    if args.trials < 1:
        raise CliError(f"--trials must be at least 1, got {args.trials}")
    if args.timeout is not None and not args.timeout > 0:
        raise CliError(f"--timeout must be positive, got {args.timeout}")
    if args.heartbeat < 1:
        raise CliError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    if not args.study_name:
        raise CliError("--study_name must not be empty")
    if bool(args.pretrained_gmf) != bool(args.pretrained_mlp):
        raise CliError("pre-training needs both --pretrained_gmf and --pretrained_mlp")
    if args.pretrained_gmf and args.model != "neumf":
        raise CliError(f"--pretrained_gmf/--pretrained_mlp initialise NeuMF: they need --model neumf, not {args.model}")
    return args


# --- the search space -------------------------------------------------------------------------


def default_space(model, n_train, pretrained):
    """{parameter: distribution} searched by default; sensible from ~100k to ~20M interactions."""
    negatives = IntDistribution(1, 10)
    # Batches from about 20 steps an epoch down to 256 times smaller: a small dataset learns nothing
    # from a few huge steps, a large one learns too slowly from tiny ones. An epoch is n_train * (1 +
    # negatives) samples under BCE and n_train under a softmax loss (positives only): the largest batch
    # is sized at the smallest epoch, so that no trial takes fewer steps whatever loss and negatives it draws.
    top = 2 ** min(20, max(10, round(math.log2(n_train / 20))))
    space = {"optimizer": CategoricalDistribution(["adam", "sgd"])} if pretrained else {}
    space |= {
        "loss": CategoricalDistribution(list(ncf.LOSSES)),  # before its parameters: they depend on it
        "softmax_negatives": IntDistribution(64, 4096, log=True),
        "learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
        "beta1": FloatDistribution(0.1, 0.99),
        "beta2": FloatDistribution(0.5, 0.9999),
        "batch_size": IntDistribution(max(256, top // 256), top, log=True),
        "negative_samples": negatives,
        "l2_regularization": FloatDistribution(1e-6, 1e-1, log=True),
    }
    if pretrained:  # the branches' sizes are the checkpoints'
        return space | {"dropout": FloatDistribution(0.0, 0.5), "pretrain_alpha": FloatDistribution(0.0, 1.0)}
    if model != "mlp":
        space["factors"] = IntDistribution(8, 128, log=True)
    if model != "gmf":  # layers: 2 * mlp_factors, then halving, mlp_layers of them
        space |= {
            "mlp_factors": IntDistribution(8, 128, log=True),
            "mlp_layers": IntDistribution(1, 4),
            "dropout": FloatDistribution(0.0, 0.5),
        }
    return space


def parse_value(name, distribution, text, flag):
    """A parameter's value from the command line, of its distribution's type."""
    if isinstance(distribution, CategoricalDistribution):
        if text not in distribution.choices:
            raise CliError(f"{flag} {name} must be one of {', '.join(distribution.choices)}, got {text!r}")
        return text
    kind = int if isinstance(distribution, IntDistribution) else float
    try:
        value = kind(text)
    except ValueError:
        raise CliError(f"{flag} {name} needs {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):
        raise CliError(f"{flag} {name} must be finite, got {text!r}")
    return value


def split_assignment(text, flag, space):
    """(name, value text) of NAME=VALUE, the name one of the search space's."""
    name, equals, value = text.partition("=")
    if not equals:
        raise CliError(f"{flag} takes NAME=VALUE, got {text!r}")
    if name not in space:
        raise CliError(f"{flag}: unknown parameter {name!r}; this search has {', '.join(space)}")
    return name, value


def narrowed_space(space, fixes, ranges):
    """(searched {name: distribution}, fixed {name: value}) after --fix and --range."""
    names = [split_assignment(text, "--fix", space)[0] for text in fixes]
    names += [split_assignment(text, "--range", space)[0] for text in ranges]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise CliError(f"{twice[0]} is given more than once in --fix and --range")
    space, fixed = dict(space), {}
    for text in fixes:
        name, value = split_assignment(text, "--fix", space)
        fixed[name] = parse_value(name, space.pop(name), value, "--fix")
    for text in ranges:
        name, bounds = split_assignment(text, "--range", space)
        distribution = space[name]
        if isinstance(distribution, CategoricalDistribution):
            raise CliError(f"--range: {name} is a choice of {', '.join(distribution.choices)}; use --fix to pick one")
        low, colon, high = bounds.partition(":")
        if not colon:
            raise CliError(f"--range takes NAME=LOW:HIGH, got {text!r}")
        low, high = (parse_value(name, distribution, end, "--range") for end in (low, high))
        if low > high:
            raise CliError(f"--range {text} is empty (low > high)")
        if distribution.log and low <= 0:
            raise CliError(f"--range: {name} is searched on a log scale; its low end must be positive, got {low}")
        space[name] = type(distribution)(low, high, log=distribution.log)
    for name in unused_parameters(fixed):
        space.pop(name, None)
    return space, fixed


def unused_parameters(values):
    """The parameters these values leave without a meaning: plain SGD's betas, -n under a softmax
    loss (its batches hold positives only), --softmax_negatives under another loss than sampled_softmax.
    A loss the values lack is searched: the parameters of every loss keep their meaning."""
    unused = ["beta1", "beta2"] if values.get("optimizer") == "sgd" else []
    loss = values.get("loss")
    if loss not in (None, "bce"):
        unused.append("negative_samples")
    if loss not in (None, "sampled_softmax"):
        unused.append("softmax_negatives")
    return unused


def describe(space, fixed):
    """{name: its range or value} in words: what the study stores and compares."""
    words = {name: f"fixed {value!r}" for name, value in fixed.items()}
    for name, distribution in space.items():
        if isinstance(distribution, CategoricalDistribution):
            words[name] = "one of " + ", ".join(distribution.choices)
        else:
            words[name] = f"{distribution.low!r}..{distribution.high!r}" + (" (log)" if distribution.log else "")
    return words


# --- trials -----------------------------------------------------------------------------------


def ncf_flags(values, settings):
    """ncf.py's flags (all but --data) of a trial with these parameter values."""
    flags = ["--model", settings["model"], "--seed", settings["seed"], "--epochs", settings["epochs"]]
    flags += ["--patience", settings["patience"]] if settings["patience"] is not None else []
    flags += ["--amp"] if settings["amp"] else []
    values = {name: value for name, value in values.items() if name not in unused_parameters(values)}
    names = ("optimizer", "learning_rate", "beta1", "beta2", "batch_size", "loss", "negative_samples")
    for name in (*names, "softmax_negatives", "factors"):
        flags += [f"--{name}", values[name]] if name in values else []
    if "mlp_factors" in values:
        flags += ["--layers", *(2 * values["mlp_factors"] >> layer for layer in range(values["mlp_layers"]))]
    for name in ("dropout", "l2_regularization", "pretrain_alpha"):
        flags += [f"--{name}", values[name]] if name in values else []
    if settings["pretrained_gmf"]:
        flags += ["--factors", settings["factors"], "--layers", *settings["layers"]]
        flags += ["--pretrained_gmf", settings["pretrained_gmf"], "--pretrained_mlp", settings["pretrained_mlp"]]
    return [str(flag) for flag in flags]


def check_corners(space, fixed, settings, data_path):
    """Refuse a search whose ends ncf.py would refuse (a --fix dropout=1, a --range beta1=0.5:1)."""
    for end in ("low", "high"):
        values = dict(fixed)
        for name, distribution in space.items():
            choices = getattr(distribution, "choices", None)
            values[name] = (choices[0] if end == "low" else choices[-1]) if choices else getattr(distribution, end)
        try:
            ncf.parse_args(["--data", data_path, *ncf_flags(values, settings)])
        except CliError as error:
            raise CliError(f"a trial would run ncf.py with settings it refuses: {error}") from None


def suggest(trial, name, distribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def make_objective(args, data, space, fixed, settings, device):
    evaluators = ncf.make_evaluators(ncf.parse_args(["--data", args.data]), data, 0, 1, device)
    metric = OBJECTIVES[args.objective]

    def objective(trial):
        values = dict(fixed)
        for name, distribution in space.items():
            if name not in unused_parameters(values):
                values[name] = suggest(trial, name, distribution)
        flags = ncf_flags(values, settings)
        trial.set_user_attr("ncf_flags", flags)
        bookkeeping = 0.0

        def report(epoch, metrics):
            nonlocal bookkeeping
            start = time.time()
            trial.report(metrics[metric], epoch)
            prune = trial.should_prune()
            bookkeeping += time.time() - start
            if prune:
                raise optuna.TrialPruned(f"{metric} {metrics[metric]:.4f} after epoch {epoch}")

        with tempfile.TemporaryDirectory(prefix="tune-trial-") as checkpoints:
            trial_args = ncf.parse_args(["--data", args.data, *flags, "--checkpoint_dir", checkpoints])
            torch.manual_seed(settings["seed"])  # as ncf.py, so that the printed command reproduces the trial
            model = ncf.make_model(trial_args, data, device)
            start = time.time()
            try:
                best = ncf.train(
                    model, evaluators, data, settings["seed"], trial_args, device, 0, 1, JsonLineLogger(None),
                    lambda *_, **__: None, on_epoch=report,
                )  # fmt: skip
            except CliError as error:  # a fresh one-process run only raises it when the loss diverges
                raise optuna.TrialPruned(str(error)) from None
            except torch.OutOfMemoryError:  # parameters too large for the device: a bad point, not the end
                raise optuna.TrialPruned("out of memory") from None
            finally:
                trial.set_user_attr("training_seconds", time.time() - start - bookkeeping)
        figures = {"val_hr@10": best["val_hr"], "val_ndcg@10": best["val_ndcg"], "epoch": best["epoch"]}
        for name, value in figures.items():
            trial.set_user_attr(name, value)
        return figures[metric]

    return objective


def print_trial(study, trial):
    params = " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                      for name, value in trial.params.items())  # fmt: skip
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    if trial.state == TrialState.COMPLETE:
        outcome = f"{trial.value:.4f} (epoch {trial.user_attrs['epoch']})"
    elif trial.state == TrialState.PRUNED:
        epochs = trial.intermediate_values
        outcome = f"pruned after epoch {max(epochs)}" if epochs else "pruned"
    else:
        outcome = trial.state.name.lower()
    print(f"trial {trial.number}: {outcome}  {seconds:.1f} s  {params}", flush=True)


def pretrained_sizes(args, data):
    """(factors, layers) of the GMF and MLP checkpoints, checked against --data."""
    sizes = {}
    for kind, path in (("gmf", args.pretrained_gmf), ("mlp", args.pretrained_mlp)):
        found, n_users, n_items, factors, layers = model_config(load_state_dict_file(path), path)
        if found != kind:
            raise CliError(f"--pretrained_{kind} {path} holds a {found.upper()} model, not a {kind.upper()}")
        if (n_users, n_items) != (data.n_users, data.n_items):
            raise CliError(f"--pretrained_{kind} {path} was trained on another dataset than --data")
        sizes[kind] = factors if kind == "gmf" else layers
    return sizes["gmf"], sizes["mlp"]


def parse_enqueued(text, space):
    """{name: value} of an --enqueue NAME=VALUE,... list, each value inside its range."""
    params = {}
    for assignment in text.split(","):
        name, value = split_assignment(assignment, "--enqueue", space)
        distribution = space[name]
        params[name] = parse_value(name, distribution, value, "--enqueue")
        if not isinstance(distribution, CategoricalDistribution) and not (
            distribution.low <= params[name] <= distribution.high
        ):
            raise CliError(f"--enqueue {name}={value} is outside its range {distribution.low}..{distribution.high}")
    return params


# --- the study --------------------------------------------------------------------------------


def check_output(path):
    """Refuse an --output that cannot be written now, not once the study is over."""
    path = Path(path)
    if path.is_dir():
        raise CliError(f"--output {path} is a directory; give the path of the JSON file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise CliError(f"cannot write --output {path}: {error.strerror}") from None


def make_storage(args, url):
    def connect():
        return optuna.storages.RDBStorage(
            args.storage,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.get_backend_name() == "sqlite" else None,
            heartbeat_interval=args.heartbeat,
            # a process killed for good (kill -9, a lost machine) has its trial run again, once: a trial
            # that kills its process every time (out of memory) is given up after that
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )

    for attempt in range(3):
        try:
            return connect()
        except sqlalchemy.exc.SQLAlchemyError:
            # processes that start together on a new database all make its tables: one wins, the others
            # fail ("already exists", "UNIQUE constraint failed") and find the tables when they try again
            if attempt == 2:
                raise
            time.sleep(1)


def open_study(args, description):
    """The study in --storage, made if new; refused when it exists for another search or dataset."""
    try:
        url = sqlalchemy.engine.make_url(args.storage) if "://" in args.storage else None
    except sqlalchemy.exc.ArgumentError:
        url = None
    if url is None or (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")):
        raise CliError(f"--storage must be a database URL, e.g. sqlite:///study.db, got {args.storage!r}")
    try:
        storage = make_storage(args, url)
        # from the second epoch on (the first says little), once three complete trials give a median
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        study = optuna.create_study(
            storage=storage,
            study_name=args.study_name,
            direction="maximize",
            load_if_exists=True,
            # the constant liar counts other processes' running trials as bad: they do not all sample one point
            sampler=optuna.samplers.TPESampler(constant_liar=True),
            pruner=pruner if args.pruner == "median" else optuna.pruners.NopPruner(),
        )
        stored = study.user_attrs.get("tune")
        if stored is None:  # one attribute, written at once: a process starting beside this one sees all or none
            study.set_user_attr("tune", description)
            return study
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CliError(f"cannot use the storage {args.storage}: {first_line}") from None
    differences = []
    for key, here in description.items():
        there = stored.get(key, {})
        for name in sorted(here.keys() | there.keys()):
            if here.get(name) != there.get(name):
                differences.append(f"{key} {name}: {there.get(name, 'absent')} there, {here.get(name, 'absent')} here")
    if differences:
        raise CliError(
            f"study {args.study_name!r} in {args.storage} was made for another search or dataset "
            f"({'; '.join(differences)}); use its settings or another --study_name"
        )
    return study


def run_trials(study, objective, args):
    """Run trials until the study holds --trials finished ones, whichever process ran them."""
    deadline = time.time() + (args.timeout or math.inf)
    while time.time() < deadline:
        optuna.storages.fail_stale_trials(study)  # a killed process's trial: failed, then queued again
        states = Counter(trial.state for trial in study.get_trials(deepcopy=False))
        finished = sum(states[state] for state in FINISHED)
        if finished >= args.trials:
            return
        if finished + states[TrialState.RUNNING] >= args.trials:
            time.sleep(POLL_SECONDS)  # the last trials run elsewhere: wait for them, or for them to go stale
            continue
        study.optimize(objective, n_trials=1, callbacks=[print_trial])


def report_best(study, args):
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    print(f"study {args.study_name!r}: {len(trials)} finished trials, {len(trials) - len(complete)} of them pruned")
    if not complete:
        print("no trial has completed yet")
        return
    best = study.best_trial
    command = shlex.join(["python", "ncf.py", "--data", args.data, *best.user_attrs["ncf_flags"]])
    objective = OBJECTIVES[args.objective]
    print(
        f"best: trial {best.number}, validation HR@10 {best.user_attrs['val_hr@10']:.4f} "
        f"NDCG@10 {best.user_attrs['val_ndcg@10']:.4f} at epoch {best.user_attrs['epoch']}\n{command}"
    )
    result = {
        "study_name": args.study_name,
        "trial": best.number,
        "objective": objective,
        "value": best.value,
        **{key: best.user_attrs[key] for key in ("val_hr@10", "val_ndcg@10", "epoch")},
        "params": best.params,
        "command": command,
        "finished_trials": len(trials),
        "pruned_trials": len(trials) - len(complete),
    }
    try:
        write_json(args.output, result)
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {error.strerror}") from None
    print(f"written to {args.output}")


def main():
    require_torch()
    args = parse_args()
    check_output(args.output)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours (Ctrl-C included)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    data = ncf.load_cache(args.data)
    if data.valid is None:
        raise CliError(
            f"{args.data} has no validation split: tuning selects on it, never on the test set; "
            "make the cache with convert.py --validation"
        )
    settings = {
        "model": args.model, "epochs": args.epochs, "patience": args.patience, "amp": args.amp, "seed": args.seed,
        "pretrained_gmf": args.pretrained_gmf, "pretrained_mlp": args.pretrained_mlp,
    }  # fmt: skip
    if args.pretrained_gmf:
        settings["factors"], settings["layers"] = pretrained_sizes(args, data)
    space, fixed = narrowed_space(default_space(args.model, len(data.train), args.pretrained_gmf), args.fix, args.range)
    check_corners(space, fixed, settings, args.data)
    enqueued = [parse_enqueued(text, space) for text in args.enqueue]
    description = {
        "dataset": {key: data.meta[key] for key in ("source_sha256", "n_users", "n_items")},
        "search_space": describe(space, fixed),
        "settings": settings | {"objective": args.objective},
    }
    study = open_study(args, description)
    for params in enqueued:
        study.enqueue_trial(params, skip_if_exists=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    objective = make_objective(args, data, space, fixed, settings, device)
    try:
        run_trials(study, objective, args)
    finally:  # also on Ctrl-C: the best so far
        report_best(study, args)


if __name__ == "__main__":
    run_main(main)
