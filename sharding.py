"""Embedding tables sharded across ranks with TorchRec: ncf.py --embedding_sharding.

Each of NeuMF's tables becomes a one-table TorchRec EmbeddingCollection behind a TableLookup (called
with ids as an nn.Embedding is), built on the meta device; TorchRec's planner places its shards,
DistributedModelParallel allocates each rank's shards on its device and wraps the MLP and the final
layer in DDP, and each rank copies its slices of the model ncf.py built on the CPU into its shards.
The tables train with fbgemm's fused optimizers (they update the rows in the backward pass); the
dense layers keep torch.optim.

No rank keeps a full table. What ncf.py's evaluation and checkpoints see is a ShardedNeuMF: it scores
through the sharded lookups (collectives, which the ranks run in step), its state dicts have a
replicated run's keys and shapes with the tables as ShardedTensors of this rank's shards, gathered()
sends the shards to rank 0, which writes a replicated run's checkpoint, and loading one copies each
rank's slices out of the (memory-mapped) full tensors. torchrec is imported only when a run asks for
sharding: it adds seconds to start-up.
"""

import copy
import math
import os
import warnings

import torch
from torch import nn

from utils import CliError, all_reduce_sum

KINDS = ("none", "auto", "table_wise", "column_wise", "row_wise")
CPU_TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")  # fbgemm's CPU kernels have no Adam
# TorchRec 1.8's sharded state dicts are ShardedTensors, which torch deprecates (each use warns)
warnings.filterwarnings("ignore", "Please use DTensor instead", FutureWarning)
SEND_BYTES = 2**26  # the largest block of a shard that gathered() sends at once: rank 0's device holds it
INSTALL = (
    'pip install -e ".[sharding]" && pip install --no-deps torchrec==1.8.0 (or source ./setup_env.sh ".[sharding]")'
)


def check_args(args):
    """One-line refusals of what sharded tables cannot do, before anything starts."""
    if args.embedding_sharding == "none":
        if args.optimizer in ("adagrad", "rowwise_adagrad"):
            raise CliError(
                f"--optimizer {args.optimizer} is a fused optimizer of sharded tables: it needs --embedding_sharding"
            )
        return
    if args.mode != "train":
        return  # --mode test evaluates a full model.pth, as a replicated run's
    try:
        import torchrec  # noqa: F401
    except ImportError as error:
        raise CliError(f"--embedding_sharding needs TorchRec ({error}); {INSTALL}") from None
    cuda = torch.cuda.is_available()
    if args.optimizer not in CPU_TABLE_OPTIMIZERS and not cuda:
        raise CliError(
            f"--optimizer {args.optimizer} with --embedding_sharding on CPU: fbgemm's CPU table optimizers are "
            f"{', '.join(CPU_TABLE_OPTIMIZERS)}"
        )
    if args.grads_accumulated > 1:
        raise CliError("--grads_accumulated with --embedding_sharding: the fused table optimizers step every batch")
    if args.loss == "softmax":
        raise CliError(
            "--loss softmax with --embedding_sharding: it looks up the whole item table for every block of users; "
            "use --loss sampled_softmax or bce"
        )
    if args.optimizer != "sgd" and (args.loss == "sampled_softmax" or args.l2_regularization):
        # each lookup's backward runs its own fused update; only SGD's updates add up to the combined one
        raise CliError(
            f"--optimizer {args.optimizer} with --embedding_sharding and --loss sampled_softmax or "
            "--l2_regularization: these look a table up twice a step, and the fused optimizer would update its "
            "rows once per lookup; use --optimizer sgd"
        )
    if args.amp and cuda:
        raise CliError("--amp with --embedding_sharding on CUDA: fp16 loss scaling would scale the fused table updates")
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise CliError("--embedding_sharding needs several processes (torchrun --nproc_per_node N)")


class TableLookup(nn.Module):
    """One table as a TorchRec EmbeddingCollection, looked up with a 1-D tensor of ids as nn.Embedding.

    Built on the meta device: DistributedModelParallel allocates only this rank's shards."""

    def __init__(self, name, num_embeddings, embedding_dim):
        from torchrec import EmbeddingCollection, EmbeddingConfig

        super().__init__()
        self.name, self.embedding_dim = name, embedding_dim
        config = EmbeddingConfig(
            name=name, embedding_dim=embedding_dim, num_embeddings=num_embeddings, feature_names=[name]
        )
        self.collection = EmbeddingCollection(tables=[config], device=torch.device("meta"))

    def forward(self, ids):
        from torchrec import KeyedJaggedTensor

        lengths = torch.ones_like(ids, dtype=torch.int32)
        values = ids.long().contiguous()  # fbgemm reads the raw buffer: a column of (user, item) pairs is strided
        features = KeyedJaggedTensor.from_lengths_sync(keys=[self.name], values=values, lengths=lengths)
        return self.collection(features)[self.name].values()


def table_names(model):
    return [name for name, module in model.named_children() if isinstance(module, nn.Embedding)]


def full_name(key):
    """A DMP state-dict key -> the NeuMF one: 'model.mf_user_embed.collection.embeddings.mf_user_embed.weight'
    -> 'mf_user_embed.weight' (the Loss holds the model as .model)."""
    key = key.removeprefix("model.")
    head, _, rest = key.partition(".collection.embeddings.")
    return f"{head}.weight" if rest else key


def column_partition(dim, world_size):
    """The smallest column block that splits `dim` into at most world_size equal parts: without
    min_partition the planner keeps a small table in one piece."""
    block = -(-dim // world_size)
    while dim % block:
        block += 1
    return block


def plan(loss_module, sharder, kind, world_size, device):
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, PlannerError, TopologyFactory, TrainerConfig
    from torchrec.distributed.types import ShardingType

    # auto: the planner's choice among the kinds that shard (data-parallel tables would skip the fused optimizers)
    kinds = [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.ROW_WISE]
    if device.type == "cuda":
        kinds.append(ShardingType.TABLE_ROW_WISE)
    allowed = [k.value for k in kinds] if kind == "auto" else [kind]
    constraints = {
        name: ParameterConstraints(
            sharding_types=allowed,
            compute_kernels=["fused"],
            min_partition=column_partition(table.embedding_dim, world_size),
        )
        for name, table in loss_module.model.named_children()
        if isinstance(table, TableLookup)
    }
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    try:
        return planner.collective_plan(loss_module, [sharder], torch.distributed.GroupMember.WORLD)
    except PlannerError as error:
        reason = str(error).splitlines()[0]
        raise CliError(f"--embedding_sharding {kind}: TorchRec's planner found no plan ({reason})") from None


def fused_params(args):
    """fbgemm's table optimizer for --optimizer, with the run's learning rate (and eps, betas)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    optimizers = {
        "sgd": EmbOptimType.EXACT_SGD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adam": EmbOptimType.ADAM,
    }
    params = {"optimizer": optimizers[args.optimizer], "learning_rate": args.learning_rate, "eps": args.eps}
    if args.optimizer == "adam":
        params |= {"beta1": args.beta1, "beta2": args.beta2}
    return params


def shard(loss_module, args, device, world_size, make_optimizer):
    """(ShardedNeuMF for evaluation and checkpoints, the DMP to train through, the optimizer).

    loss_module's model, built on the CPU, trains with TableLookups in place of its tables (the loss is
    the one ncf.py starts each epoch of): its initial values are copied into each rank's shards, and its
    tables are dropped when this returns. make_optimizer(module, args, device) is ncf.py's: the dense
    layers' optimizer."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel

    model = loss_module.model
    initial = model.state_dict()  # once the TableLookups replace the tables, the only reference to them
    parameter_names = [name for name, _ in model.named_parameters()]
    for name in table_names(model):
        table = getattr(model, name)
        setattr(model, name, TableLookup(name, table.num_embeddings, table.embedding_dim))
    sharder = EmbeddingCollectionSharder(fused_params=fused_params(args))
    placement = plan(loss_module, sharder, args.embedding_sharding, world_size, device)
    dmp = DistributedModelParallel(loss_module, device=device, plan=placement, sharders=[sharder])
    sharded = ShardedNeuMF(dmp, list(initial))
    sharded.load_state_dict(initial)
    optimizer = ShardedOptimizer(dmp, parameter_names, lambda dense: make_optimizer(dense, args, device))
    return sharded, dmp, optimizer


def local_slices(sharded):
    """(slices of the full tensor, local tensor) of each shard of a ShardedTensor this rank holds."""
    for shard in sharded.local_shards():
        offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        yield tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True)), shard.tensor


@torch.no_grad()
def scatter(full, sharded):
    """Copy this rank's slices of `full` (a CPU tensor, maybe memory-mapped: only those pages are read)
    into its shards of a ShardedTensor."""
    for slices, local in local_slices(sharded):
        local.copy_(full[slices])


def sharded_leaves(state, path=()):
    """(path of keys, ShardedTensor) of each ShardedTensor in nested dicts."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from sharded_leaves(value, (*path, key))
        elif hasattr(value, "local_shards"):
            yield (*path, key), value


def copy_dicts(state):
    return {key: copy_dicts(value) if isinstance(value, dict) else value for key, value in state.items()}


def row_blocks(sizes, dtype):
    """Slices of a shard's first dimension of at most SEND_BYTES each: what gathered() sends at once."""
    row_bytes = math.prod(sizes[1:]) * dtype.itemsize
    rows = max(1, SEND_BYTES // max(1, row_bytes))
    return [slice(start, min(start + rows, sizes[0])) for start in range(0, sizes[0], rows)]


@torch.no_grad()
def gathered(state):
    """A checkpoint's `state` (nested dicts) to write on rank 0: there, each ShardedTensor replaced by its
    full tensor on the CPU; None on the other ranks; `state` itself without several processes.

    Every rank calls it together. The ranks first agree on which ShardedTensors there are (a table-wise
    table's optimizer state is only on its rank), then the shards go to rank 0, one table after the other,
    in blocks of rows of at most SEND_BYTES: rank 0's device receives one block at a time and no other rank
    receives anything. Rank 0 keeps the full tensors on the CPU until it has written them.
    """
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return state
    rank = torch.distributed.get_rank()
    nccl = torch.distributed.get_backend() == "nccl"  # it sends CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    local = dict(sharded_leaves(state))
    layout = {
        path: (
            value.size(),
            value.dtype,
            [(s.metadata.shard_offsets, s.metadata.shard_sizes) for s in value.local_shards()],
        )
        for path, value in local.items()
    }
    layouts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(layouts, layout)
    full = {}
    for path in sorted(set().union(*layouts), key=repr):
        size, dtype = next(layout[path][:2] for layout in layouts if path in layout)
        whole = torch.empty(size, dtype=dtype) if rank == 0 else None
        for owner, layout in enumerate(layouts):
            if owner == rank and path in local:
                for slices, part in local_slices(local[path]):
                    if rank == 0:
                        whole[slices].copy_(part)
                    else:
                        for rows in row_blocks(part.shape, dtype):
                            torch.distributed.send(part[rows].contiguous(), dst=0)
            elif rank == 0 and path in layout:
                for offsets, sizes in layout[path][2]:
                    shard = whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
                    for rows in row_blocks(sizes, dtype):
                        block = torch.empty(shard[rows].shape, dtype=dtype, device=device)
                        torch.distributed.recv(block, src=owner)
                        shard[rows].copy_(block)
        full[path] = whole
    if rank != 0:
        return None
    result = copy_dicts(state)
    for path, whole in full.items():
        node = result
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = whole
    return result


class ShardedNeuMF:
    """What ncf.py's evaluation and checkpoints use in a sharded run, in place of the NeuMF. It scores through
    the sharded lookups, and its state dict has a replicated run's keys, order and shapes, with each table
    a ShardedTensor of this rank's shards (gathered() makes them full tensors on rank 0 for a checkpoint)."""

    def __init__(self, dmp, names):
        self.dmp, self.names, self.device = dmp, names, dmp.device  # names: the NeuMF's state-dict keys
        self.model = dmp.module.model  # the NeuMF, its tables TableLookups over the shards
        self.kind = self.model.kind
        if {full_name(key) for key in dmp.state_dict()} != set(names):
            raise RuntimeError(f"the sharded model's {sorted(dmp.state_dict())} are not NeuMF's {names}")

    def eval(self):
        self.dmp.eval()
        return self

    def lookups(self, users, items):
        """{table name: nn.Embedding of the rows looked up}: `users` in the user tables, `items` in the item
        tables; one lookup of each table, in the same order on every rank (each one is a collective)."""
        rows = {}
        with torch.inference_mode(False), torch.no_grad():  # fbgemm's CPU lookups exist only behind autograd
            for user_table, item_table in self.model.embeddings():
                rows[user_table.name] = nn.Embedding.from_pretrained(user_table(users))
                rows[item_table.name] = nn.Embedding.from_pretrained(item_table(items))
        return rows

    def score_grid(self, users, items):
        """NeuMF.score_grid through the shards: the rows of `users` and of the distinct `items` are looked
        up, then scored by the NeuMF's own score_grid on a shallow copy of it whose tables hold just those
        rows (the same values: a row of the item half of the first MLP layer does not depend on the other
        rows of its product). The full protocol's items are the whole catalogue: each rank then holds the
        item tables, whole, while it scores a block of users."""
        ids, positions = items.unique(return_inverse=True)
        scorer = copy.copy(self.model)
        scorer._modules = self.model._modules | self.lookups(users, ids)  # its own tables, the model's layers
        return scorer.score_grid(torch.arange(len(users), device=users.device), positions)

    def in_step(self, blocks):
        """Yield from `blocks` (an iterator that scores one block with score_grid for each item drawn) in step
        with the other ranks, which may have more blocks: a rank that has run out looks its tables up with
        one id for as long as another still scores."""
        blocks, pad = iter(blocks), torch.zeros(1, dtype=torch.long, device=self.device)
        while True:
            block = next(blocks, None)
            if block is None:
                self.lookups(pad, pad)
            if not all_reduce_sum(torch.tensor([float(block is not None)], device=self.device)).item():
                return
            if block is not None:
                yield block

    def state_dict(self):
        own = {full_name(key): value for key, value in self.dmp.state_dict().items()}
        return {name: own[name] for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Copy this rank's slices of a replicated run's state dict into its shards, and the dense layers."""
        for key, value in self.dmp.state_dict().items():
            if hasattr(value, "local_shards"):
                scatter(state[full_name(key)], value)
            else:
                value.copy_(state[full_name(key)])


class ShardedOptimizer:
    """The dense layers' torch.optim optimizer, with the state dict of one optimizer over the NeuMF's
    parameters (a replicated run's layout, so plain SGD resumes across layouts) plus the fused table
    optimizers' state under "tables" ({param name: {state name: ShardedTensor}}, this rank's shards:
    gathered() makes them full tensors on rank 0 for last.pth)."""

    def __init__(self, dmp, parameter_names, make_dense_optimizer):
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        self.dmp = dmp
        dense = list(in_backward_optimizer_filter(dmp.named_parameters()))
        self.dense = make_dense_optimizer(nn.ParameterList(parameter for _, parameter in dense))
        self.defaults = self.dense.defaults
        self.index = {name: i for i, name in enumerate(parameter_names)}  # the replicated layout
        self.dense_index = [self.index[full_name(name)] for name, _ in dense]

    def step(self):
        self.dense.step()  # the tables stepped in the backward pass

    def zero_grad(self):
        self.dense.zero_grad()

    def local_table_state(self):
        """{param name: {state name: ShardedTensor}} of the tables with shards on this rank."""
        state = self.dmp.fused_optimizer.state_dict()["state"]
        return {
            full_name(key): {name.rpartition(".")[2]: value for name, value in states.items()}
            for key, states in state.items()
        }

    def state_dict(self):
        dense = self.dense.state_dict()
        state = {self.dense_index[i]: value for i, value in dense["state"].items()}
        group = dense["param_groups"][0] | {"params": list(range(len(self.index)))}
        return {"state": state, "param_groups": [group], "tables": self.local_table_state()}

    def load_state_dict(self, saved):
        (group,) = saved["param_groups"]  # ValueError (an unusable state) when there are several
        if len(group["params"]) != len(self.index):
            raise ValueError(f"{len(group['params'])} parameters, not {len(self.index)}")
        tables = set(range(len(self.index))) - set(self.dense_index)
        if tables & set(saved["state"]):
            raise CliError(
                "last.pth holds a replicated run's optimizer state for the tables, which fbgemm's fused "
                "optimizers cannot take: resume it without --embedding_sharding"
            )
        dense_state = {i: saved["state"][index] for i, index in enumerate(self.dense_index) if index in saved["state"]}
        dense_group = group | {"params": list(range(len(self.dense_index)))}
        self.dense.load_state_dict({"state": dense_state, "param_groups": [dense_group]})
        for key, states in self.local_table_state().items():
            for name, value in states.items():
                if key not in saved.get("tables", {}) or name not in saved["tables"][key]:
                    raise ValueError(f"no {name} state of {key}")
                if saved["tables"][key][name].shape != value.size():  # row-wise Adagrad's, per column block
                    raise CliError(
                        f"last.pth's {name} of {key} is {list(saved['tables'][key][name].shape)}, this layout's "
                        f"{list(value.size())}: resume it with the run's --embedding_sharding and number of processes"
                    )
                scatter(saved["tables"][key][name], value)


def check_replicated_resume(saved_optimizer, path):
    """A replicated run cannot take a sharded run's fused table state (only SGD has none)."""
    if any(saved_optimizer.get("tables", {}).values()):
        raise CliError(
            f"{path} holds a sharded run's table optimizer state, which a replicated run cannot take: "
            "resume it with --embedding_sharding"
        )
