"""Figures (PNG) from ncf.py's DLLogger logs, or from a tune.py study.

    python plot.py runs/*.json --output figures
    python plot.py --study sqlite:///study.db --study_name ml-1m --output figures

From logs it writes hr.png and ndcg.png (per-epoch HR@K / NDCG@K, one colour per run: solid the
test split, dashed the validation split where the log has one), loss.png (training loss),
throughput.png (training samples/s) and, when several runs share a configuration, best_hr.png (a
box plot of each configuration's best HR@K). From a study: history.png and importances.png,
Optuna's own matplotlib figures.
"""

import argparse
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from utils import CliError, atomic_file, needs_extra, run_main

with needs_extra("plots"):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

# PARAMETER entries that name files, or say where and how fast a run ran, rather than what it
# trains: runs that differ only in these (and the seed) share a configuration in best_hr.png.
NOT_CONFIGURATION = {
    "seed", "log_path", "checkpoint_dir", "local_rank", "resume", "valid_batch_size", "world_size", "device",
}  # fmt: skip
MAX_LEGEND = 10  # more runs than this: the legend would hide the curves


@dataclass
class Run:
    label: str
    params: dict
    epochs: dict = field(default_factory=dict)  # epoch -> that epoch's record

    def series(self, key):
        """(epochs, values) of a per-epoch metric, for the epochs that logged it."""
        points = [(epoch, data[key]) for epoch, data in sorted(self.epochs.items()) if key in data]
        for epoch, value in points:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CliError(f"{self.label}: epoch {epoch}: {key} is {value!r}, not a number")
        return [p[0] for p in points], [p[1] for p in points]


def read_runs(path):
    """The runs in one log: ncf.py appends, so a file holds one run per PARAMETER record, except
    that a --resume run continues the run before it."""
    path = Path(path)
    if path.is_dir():
        raise CliError(f"{path} is a directory, not a log")
    if not path.is_file():
        raise CliError(f"{path} does not exist")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise CliError(f"{path} is empty")
    runs = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.removeprefix("DLLL ")) if line.startswith("DLLL ") else None
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "type" not in record:
            raise CliError(f"{path}: line {number} is not a DLLogger record ('DLLL {{json}}'); is it an ncf.py log?")
        if record["type"] != "LOG":
            continue  # METADATA records describe units, not values
        step, data = record.get("step"), record.get("data", {})
        if not isinstance(data, dict):
            raise CliError(f"{path}: line {number}: its data is not a JSON object; is it an ncf.py log?")
        if isinstance(step, list) and len(step) == 1 and (isinstance(step[0], bool) or not isinstance(step[0], int)):
            raise CliError(f"{path}: line {number}: step {step} is not [epoch]; is it an ncf.py log?")
        if step == "PARAMETER" and not (data.get("resume") and runs):
            runs.append(Run(path.stem, data))
        elif isinstance(step, list) and len(step) == 1:
            if not runs:  # a log whose PARAMETER record was lost: still one run
                runs.append(Run(path.stem, {}))
            runs[-1].epochs[step[0]] = data
    runs = [run for run in runs if run.epochs]
    if not runs:
        raise CliError(f"{path} holds no epoch records (a --mode test log, or a run stopped before its first epoch?)")
    if len(runs) > 1:
        for index, run in enumerate(runs):
            run.label = f"{path.stem}#{index}"
    return runs


def topk(runs):
    """The K of HR@K that every run logs."""
    keys = {key for run in runs for data in run.epochs.values() for key in data}
    ks = {int(match[1]) for key in keys if (match := re.fullmatch(r"hr@(\d+)", key))}
    if not ks:
        raise CliError("the logs have no hr@K per epoch; are they ncf.py logs?")
    if len(ks) > 1:
        raise CliError(f"the logs report HR@K for K in {sorted(ks)}; plot the logs of one K together")
    return ks.pop()


def best_hr(run, k):
    """Test HR@K at the epoch of the best validation HR@K (the first such epoch, as ncf.py), or the
    best test HR@K when the run had no validation split."""
    epochs, test = run.series(f"hr@{k}")
    valid_epochs, valid = run.series(f"val_hr@{k}")
    if not valid:
        return max(test)
    best_epoch = valid_epochs[valid.index(max(valid))]
    return dict(zip(epochs, test, strict=True))[best_epoch]


def configurations(runs):
    """{label: runs} of the runs grouped by configuration; a label names what its group sets
    differently from the others (empty when there is one group)."""
    groups = {}
    for run in runs:
        shape = {key: value for key, value in run.params.items() if key not in NOT_CONFIGURATION}
        groups.setdefault(json.dumps(shape, sort_keys=True), []).append((shape, run))
    shapes = [members[0][0] for members in groups.values()]
    differing = sorted({key for shape in shapes for key in shape if any(s.get(key) != shape[key] for s in shapes)})
    return {
        " ".join(f"{key}={members[0][0].get(key)}" for key in differing): [run for _, run in members]
        for members in groups.values()
    }


def curve_figure(runs, key, title, ylabel, valid_key=None):
    """One line per run of a per-epoch metric; with valid_key, a dashed line of the same colour too."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        axes.plot(*run.series(key), color=colour, label=run.label)
        if valid_key is not None and run.series(valid_key)[0]:
            axes.plot(*run.series(valid_key), color=colour, linestyle="--")
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(runs) <= MAX_LEGEND:
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def box_figure(groups, k):
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    labels = [f"{label}\n({len(runs)} runs)".strip() for label, runs in groups.items()]
    values = [[best_hr(run, k) for run in runs] for runs in groups.values()]
    axes.boxplot(values, tick_labels=labels)
    for position, group in enumerate(values, 1):  # the runs themselves: a box of three runs hides them
        axes.scatter([position] * len(group), group, color="C0", alpha=0.6, zorder=3)
    axes.set(title=f"best HR@{k} per configuration", ylabel=f"test HR@{k} at the best epoch")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def log_figures(runs):
    """{file name: figure} for the runs; best_hr.png only when some configuration has several runs."""
    k = topk(runs)
    validation = any(run.series(f"val_hr@{k}")[0] for run in runs)
    split = " (solid: test, dashed: validation)" if validation else " (test)"
    figures = {
        "hr.png": curve_figure(runs, f"hr@{k}", f"HR@{k}{split}", f"HR@{k}", f"val_hr@{k}"),
        "ndcg.png": curve_figure(runs, f"ndcg@{k}", f"NDCG@{k}{split}", f"NDCG@{k}", f"val_ndcg@{k}"),
        "loss.png": curve_figure(runs, "train_loss", "training loss", "binary cross-entropy"),
        "throughput.png": curve_figure(runs, "train_throughput", "training throughput", "samples/s"),
    }
    groups = configurations(runs)
    if any(len(members) > 1 for members in groups.values()):
        figures["best_hr.png"] = box_figure(groups, k)
    return figures


def study_figures(storage, study_name):
    """{file name: figure} of a study: its optimization history and, given two complete trials,
    its parameter importances."""
    with needs_extra("tune"):
        import optuna

    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise CliError(f"{storage}: no such SQLite file")  # opening it would create an empty one
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        names = optuna.study.get_all_study_names(storage)
    except Exception as error:  # SQLAlchemy and Optuna raise many kinds for a bad URL or database
        raise CliError(f"cannot open the storage {storage}: {type(error).__name__}: {error}") from None
    if study_name not in names:
        raise CliError(f"{storage} has no study {study_name!r} (it has: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise CliError(f"study {study_name!r} has no complete trial yet")
    figures = {"history.png": optuna.visualization.matplotlib.plot_optimization_history(study).figure}
    if len(complete) > 1 and complete[0].params:
        figures["importances.png"] = optuna.visualization.matplotlib.plot_param_importances(study).figure
    for figure in figures.values():
        figure.set_size_inches(6.4, 4.0)
        figure.tight_layout()
    return figures


def save_atomically(figure, path):
    """A PNG that is never seen half written (utils.atomic_file)."""
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=100)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Figures (PNG) from ncf.py logs or a tune.py study.", allow_abbrev=False
    )
    parser.add_argument("logs", nargs="*", type=Path, help="DLLogger logs of ncf.py (one or more runs each)")
    parser.add_argument("--study", help="storage URL of a tune.py study, e.g. sqlite:///study.db")
    parser.add_argument("--study_name", help="the study's name in --study")
    parser.add_argument("--output", type=Path, required=True, help="directory for the PNG files")
    args = parser.parse_args()
    if bool(args.logs) == bool(args.study):
        raise CliError("give either logs or --study (not both)")
    if args.study and not args.study_name:
        raise CliError("--study needs --study_name")
    return args


def main():
    args = parse_args()
    if args.study:
        figures = study_figures(args.study, args.study_name)
    else:
        figures = log_figures([run for path in args.logs for run in read_runs(path)])
    for name, figure in figures.items():
        try:
            save_atomically(figure, args.output / name)
        except OSError as error:
            raise CliError(f"cannot write {args.output / name}: {error.strerror}") from None
        plt.close(figure)
        print(args.output / name)


if __name__ == "__main__":
    run_main(main)
