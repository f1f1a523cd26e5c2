"""Helpers shared by the scripts: user-facing errors, atomic writes, distributed set-up, logging, progress.

torch is imported inside the functions that use it: the data tools (convert.py, synthetic.py)
import this module too and never need torch.
"""

import contextlib
import datetime
import gc
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path


class CliError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


def run_main(main):
    """Run a script's main(), turning CliError into a one-line message and exit code 2."""
    try:
        main()
    except CliError as error:
        prog = Path(sys.argv[0]).name
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        leave_process_group()  # on every path: test mode returns early; errors


def leave_process_group():
    """Leave the process group, if any, while the interpreter is whole. Left to the exit, gloo's worker
    threads may free tensors (and take the GIL) during finalization: "terminate called without an active
    exception", SIGABRT. gc.collect() first: a DDP or TorchRec model sits in a reference cycle that holds
    the group alive."""
    distributed = sys.modules.get("torch.distributed")  # None where torch is not (fully) loaded
    if getattr(distributed, "is_initialized", lambda: False)():
        gc.collect()
        distributed.destroy_process_group()


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now: the rendezvous of a run's local gloo processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A file opened in a temporary file beside `path` (its directory made first), renamed to `path` once
    the block ends: `path` is never seen half written, and a failure leaves no temporary file. ncf.py
    deletes the `.NAME.*.tmp` files of a run killed while it wrote a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path, text):
    with atomic_file(path) as file:
        file.write(text)


def write_json(path, data):
    """Write data as indented JSON, atomically."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def provenance():
    """What a measurement needs beside its figures to be reproduced: command, date, machine, versions."""
    import platform
    import subprocess

    import numpy
    import torch

    root = Path(__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True
    ).stdout.strip()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(root).as_posix() if script.is_relative_to(root) else sys.argv[0]
    return {
        "command": shlex.join(["python", script, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": numpy.__version__,
            "commit": commit or None,
        },
    }


def _read_lines(path):
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def write_results(path, results):
    """A benchmark's --json: its results beside their provenance, for docs/results.md (render_results.py)."""
    write_json(path, {"provenance": provenance(), "results": results})


def atomic_save(obj, path):
    """torch.save into a temporary file beside `path`, then rename: readers never see half a file.

    A write that fails (a full disk, a directory that cannot be made) is a CliError naming the file,
    and leaves no temporary file.
    """
    import torch

    try:
        with atomic_file(path, "wb") as file:  # a file object: torch.save on a path reports ENOSPC as a RuntimeError
            torch.save(obj, file)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None


def read_checkpoint(path, mmap=False):
    """torch.load of a checkpoint file, with one-line errors for a missing or corrupt file.

    With several processes only global rank 0 reads the file and sends what it holds (or its error,
    which every rank then raises) to the others: rank 0 wrote it, and other nodes need not share
    its filesystem. Every rank must call this together. With mmap, every rank maps the file itself (so
    it must see it) and reads only the parts it uses: a sharded run copies its shards out of the tables.
    """
    import torch

    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return _load_checkpoint(path, mmap)
    if mmap:  # a rank that cannot read it (another node's disk) must not leave the others waiting
        state, error = None, None
        try:
            state = _load_checkpoint(path, mmap)
        except CliError as failure:
            error = f"{failure} (on rank {torch.distributed.get_rank()}: every rank reads it)"
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        if any(errors):
            raise CliError(next(filter(None, errors)))
        return state
    state_and_error = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            state_and_error[0] = _load_checkpoint(path)
        except CliError as error:
            state_and_error[1] = str(error)
    torch.distributed.broadcast_object_list(state_and_error, src=0)
    if state_and_error[1] is not None:
        raise CliError(state_and_error[1])
    return state_and_error[0]


def _load_checkpoint(path, mmap=False):
    import torch

    path = Path(path)
    if not path.is_file():
        raise CliError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise CliError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(error).__name__})") from None


def model_state(checkpoint, path):
    """The model state dict in a checkpoint of this suite or of the reference, without `module.`."""
    import torch

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]  # a training-state checkpoint (last.pth)
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CliError(f"checkpoint {path} does not hold a model state dict")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_state_dict_file(path, mmap=False):
    """Load a checkpoint saved by this suite or by the reference (a plain state dict, maybe DDP-prefixed)."""
    return model_state(read_checkpoint(path, mmap), path)


def model_config(state, path):
    """(kind, n_users, n_items, factors, layers) of the NCF model a state dict holds.

    The kind follows from the branches present: NeuMF has both, GMF only `mf_*`, MLP only `mlp_*`;
    factors is None for an MLP and layers None for a GMF.
    """
    has_mf, has_mlp = "mf_user_embed.weight" in state, "mlp_user_embed.weight" in state
    if not (has_mf or has_mlp):
        raise CliError(f"checkpoint {path} has no mf_user_embed.weight nor mlp_user_embed.weight; it is no NCF model")
    tables = ["mf_user_embed.weight", "mf_item_embed.weight"] if has_mf else []
    tables += ["mlp_user_embed.weight", "mlp_item_embed.weight"] if has_mlp else []
    for name in tables:
        if name not in state or state[name].dim() != 2:
            raise CliError(f"checkpoint {path} has no 2-D tensor {name}; it is not an NCF checkpoint")
    layers = None
    if has_mlp:
        layers = [2 * state["mlp_user_embed.weight"].shape[1]]
        while f"mlp.{len(layers) - 1}.weight" in state:
            layers.append(state[f"mlp.{len(layers) - 1}.weight"].shape[0])
    kind = "neumf" if has_mf and has_mlp else "gmf" if has_mf else "mlp"
    factors = state["mf_user_embed.weight"].shape[1] if has_mf else None
    return kind, state[tables[0]].shape[0], state[tables[1]].shape[0], factors, layers


def load_model_weights(model, path, state=None):
    """Load a checkpoint into `model`, naming the model kind or the first tensor that does not fit.

    `state` is the checkpoint's model state when the caller has read the file already.
    """
    state = load_state_dict_file(path) if state is None else state
    kind = model_config(state, path)[0]
    if kind != model.kind:
        raise CliError(f"checkpoint {path} holds a {kind.upper()} model, not a {model.kind.upper()} (--model)")
    own = model.state_dict()
    for name in own.keys() - state.keys():
        raise CliError(f"checkpoint {path} has no tensor {name}; it is not a {kind.upper()} checkpoint of this layout")
    for name in state.keys() - own.keys():
        raise CliError(
            f"checkpoint {path} has an unexpected tensor {name}; it is not a {kind.upper()} checkpoint of this layout"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CliError(
                f"checkpoint {path} does not fit: {name} is {list(tensor.shape)} there but {list(own[name].shape)} "
                "here (a checkpoint of another dataset, or other --factors/--layers?)"
            )
    model.load_state_dict(state)


# --- distributed ------------------------------------------------------------------------------


def init_distributed(local_rank_flag=None):
    """Join the process group when launched by torchrun / torch.distributed.launch.

    Returns (rank, world_size, device). Rank and world size come from the environment, so a
    plain `python ncf.py` is a world of one and multi-node launches shard by global rank. On CUDA
    each process takes the GPU numbered by its local rank among those it sees; a local rank without
    a GPU is an error, not a GPU shared with another process.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag is not None else 0))
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:  # two processes on one GPU: NCCL would fail later ("Duplicate GPU"), or crawl
            raise CliError(
                f"local rank {local_rank} has no GPU of its own: this process sees {gpus} GPUs; start at most "
                f"{gpus} processes per node (torchrun --nproc_per_node), one per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def all_reduce_sum(tensor):
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_int(value, device):
    """Rank 0's value of an integer, on every rank."""
    import torch

    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return int(tensor.item())


def enable_tf32(device):
    """TF32 matrix products and convolutions on CUDA (Ampere and later), as the reference trains in fp32.

    Returns whether TF32 is on: never on a CPU, where it does not exist.
    """
    import torch

    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


# --- logging ----------------------------------------------------------------------------------


def read_log(path):
    """The records of a log in DLLogger's JSON-lines format (JsonLineLogger's, or dllogger's)."""
    return [json.loads(line.removeprefix("DLLL ")) for line in Path(path).read_text().splitlines()]


def run_summary(records):
    """The summary ncf.py logs when a training run ends (best_accuracy, best_epoch, ...)."""
    return next(r["data"] for r in records if r["step"] == [] and "best_accuracy" in r["data"])


class JsonLineLogger:
    """Writes DLLogger's JSON-lines format (`DLLL {...}`) without needing the dllogger package."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1) if path else None
        self.start = time.time()

    def log(self, step, data):
        if self.file is None:
            return
        now = time.time()
        record = {
            "timestamp": str(now),
            "datetime": datetime.datetime.fromtimestamp(now).isoformat(),
            "elapsedtime": str(now - self.start),
            "type": "LOG",
            "step": step,
            "data": data,
        }
        self.file.write("DLLL " + json.dumps(record) + "\n")

    def metadata(self, name, meta):
        if self.file is not None:
            self.file.write("DLLL " + json.dumps({"type": "METADATA", "metric": name, "metadata": meta}) + "\n")

    def close(self):
        if self.file is not None:
            self.file.close()


def make_logger(path, enabled):
    """DLLogger when it is installed (NVIDIA's containers), else the local writer of the same format;
    either appends to the log."""
    if not enabled:
        return JsonLineLogger(None)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).open("a").close()
    except OSError as error:
        raise CliError(f"cannot write the log {path}: {error.strerror}") from None
    try:
        import dllogger
    except ImportError:
        return JsonLineLogger(path)

    class _DLLoggerAdapter:
        def __init__(self):
            # append, as the local writer: its default ("w") would wipe a resumed run's earlier epochs
            backend = dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, path, append=True)
            dllogger.init(backends=[backend])

        def log(self, step, data):  # flushed, as the local writer's lines: a killed run keeps every record
            dllogger.log(step=step, data=data)
            dllogger.flush()

        def metadata(self, name, meta):
            dllogger.metadata(name, meta)
            dllogger.flush()

        def close(self):
            dllogger.flush()

    return _DLLoggerAdapter()


# --- progress ---------------------------------------------------------------------------------

PROGRESS_INTERVAL_VARIABLE = "NCF_PROGRESS_INTERVAL"  # seconds between progress lines in logs
DEFAULT_PROGRESS_INTERVAL = 20.0


def progress_interval():
    text = os.environ.get(PROGRESS_INTERVAL_VARIABLE, str(DEFAULT_PROGRESS_INTERVAL))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise CliError(f"{PROGRESS_INTERVAL_VARIABLE} must be a number of seconds >= 0, not {text!r}")
    return seconds


class Progress:
    """Progress through the steps of a long loop (an epoch), for whoever watches it.

    On a terminal: tqdm's bar. Otherwise (a log file, CI, nohup, a notebook): a line at most every
    NCF_PROGRESS_INTERVAL seconds (default 20) with the step, samples/s and the time left, so a loop
    shorter than that prints nothing. Silent when not enabled (every rank but 0).
    """

    def __init__(self, total_steps, total_samples, label, enabled=True):
        self.total_steps, self.total_samples, self.label = total_steps, total_samples, label
        self.enabled, self.interval, self.step = enabled, progress_interval(), 0
        self.bar = None
        if enabled and sys.stdout.isatty():
            import tqdm

            self.bar = tqdm.tqdm(total=total_steps, leave=False)
        self.start = self.last_line = time.perf_counter()

    def update(self):
        self.step += 1
        if self.bar is not None:
            self.bar.update()
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last_line < self.interval or self.step >= self.total_steps:
            return
        self.last_line = now
        steps_per_second = self.step / (now - self.start)
        samples_per_second = steps_per_second * self.total_samples / self.total_steps
        seconds_left = (self.total_steps - self.step) / steps_per_second
        print(
            f"{self.label}: step {self.step:,}/{self.total_steps:,}  {samples_per_second:,.0f} samples/s  "
            f"{seconds_left:,.0f}s left",
            flush=True,
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --- what the installation must hold --------------------------------------------------------------

MIN_TORCH = "2.4"  # fused Adam and SGD on CPU, torch.OutOfMemoryError; pyproject.toml declares the same


def require_torch():
    """Stop with one line when the installed torch is older than the code needs (else an AttributeError
    or a "fused=True requires..." RuntimeError would surface mid-run). Major and minor only: NVIDIA's
    containers ship pre-release builds such as 2.4.0a0+nv24.05, which have what 2.4 has."""
    import torch

    found = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if found < tuple(int(part) for part in MIN_TORCH.split(".")):
        raise CliError(f'needs torch >= {MIN_TORCH} (found {torch.__version__}); pip install "torch>={MIN_TORCH}"')


class needs_extra:  # lower case, as contextlib.suppress: read as a with statement
    """`with needs_extra("tune"): import optuna`: run without that optional extra, a script stops with
    one line naming the extra to install instead of a ModuleNotFoundError traceback."""

    def __init__(self, extra):
        self.extra = extra

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, ImportError):
            prog = Path(sys.argv[0]).name
            print(
                f"{prog}: error: needs the '{self.extra}' extra ({error}); pip install -e \".[{self.extra}]\"",
                file=sys.stderr,
            )
            sys.exit(2)
