"""Embedding tables sharded across ranks with TorchRec: ncf.py --embedding_sharding.

Each of NeuMF's tables becomes a one-table TorchRec EmbeddingCollection behind a TableLookup (called
with ids as an nn.Embedding is), TorchRec's planner places its shards, DistributedModelParallel shards
the tables and wraps the MLP and the final layer in DDP. The tables train with fbgemm's fused
optimizers (they update the rows in the backward pass); the dense layers keep torch.optim.

What ncf.py's evaluation and checkpoints see is a ShardedNeuMF: a full NeuMF on every rank, refreshed
from the shards when evaluation starts (eval()), whose state dicts are those of a replicated run;
loading one copies each rank's shards out of the full tensors. torchrec is imported only when a run
asks for sharding: it adds seconds to start-up.
"""

import copy
import os
import warnings

import torch
from torch import nn

from utils import CliError

KINDS = ("none", "auto", "table_wise", "column_wise", "row_wise")
CPU_TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")  # fbgemm's CPU kernels have no Adam
# TorchRec 1.8's sharded state dicts are ShardedTensors, which torch deprecates (each use warns)
warnings.filterwarnings("ignore", "Please use DTensor instead", FutureWarning)
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
    """One table as a TorchRec EmbeddingCollection, looked up with a 1-D tensor of ids as nn.Embedding."""

    def __init__(self, name, table):
        from torchrec import EmbeddingCollection, EmbeddingConfig

        super().__init__()
        self.name, self.embedding_dim = name, table.embedding_dim
        config = EmbeddingConfig(
            name=name, embedding_dim=table.embedding_dim, num_embeddings=table.num_embeddings, feature_names=[name]
        )
        self.collection = EmbeddingCollection(tables=[config], device=table.weight.device)
        with torch.no_grad():
            self.collection.embeddings[name].weight.copy_(table.weight)

    def forward(self, ids):
        from torchrec import KeyedJaggedTensor

        lengths = torch.ones_like(ids, dtype=torch.int32)
        features = KeyedJaggedTensor.from_lengths_sync(keys=[self.name], values=ids.long(), lengths=lengths)
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

    loss_module's model trains with TableLookups in place of its tables (the loss is the one ncf.py
    starts each epoch of); a copy of it, full, is what evaluation and checkpoints see.
    make_optimizer(module, args, device) is ncf.py's: the dense layers' optimizer."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel

    full, training = copy.deepcopy(loss_module.model), loss_module.model
    for name in table_names(training):
        setattr(training, name, TableLookup(name, getattr(training, name)))
    sharder = EmbeddingCollectionSharder(fused_params=fused_params(args))
    placement = plan(loss_module, sharder, args.embedding_sharding, world_size, device)
    dmp = DistributedModelParallel(loss_module, device=device, plan=placement, sharders=[sharder])
    optimizer = ShardedOptimizer(dmp, full, lambda dense: make_optimizer(dense, args, device))
    return ShardedNeuMF(dmp, full, optimizer), dmp, optimizer


def local_slices(sharded):
    """(slices of the full tensor, local tensor) of each shard of a ShardedTensor this rank holds."""
    for shard in sharded.local_shards():
        offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        yield tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True)), shard.tensor


def gather_into(full, sharded):
    """Fill `full` (the run's device: NCCL reduces CUDA tensors only) with a ShardedTensor on every rank:
    each rank writes its shards into zeros, a sum adds them up."""
    full.zero_()
    for slices, local in local_slices(sharded):
        full[slices] = local.detach()
    torch.distributed.all_reduce(full)


@torch.no_grad()
def scatter(full, sharded):
    for slices, local in local_slices(sharded):
        local.copy_(full[slices])


class ShardedNeuMF:
    """What ncf.py's evaluation and checkpoints use in a sharded run, in place of the NeuMF: the full
    model (`full`, on every rank), refreshed from the shards by eval(), with a replicated run's state dicts."""

    def __init__(self, dmp, full, optimizer):
        self.dmp, self.full, self.optimizer, self.kind = dmp, full, optimizer, full.kind

    @torch.no_grad()
    def eval(self):
        """Gather the shards into the full model (every rank together: evaluation starts on all of them),
        and the table optimizers' state for last.pth, unless nothing has stepped since the last time
        (the test split after the validation one)."""
        if not self.optimizer.stepped:
            return self.full.eval()
        self.optimizer.stepped = False
        # in place, one table at a time: the full model is the only full copy of the tables on a rank
        own, shards = self.full.state_dict(), self.dmp.state_dict()
        if own.keys() != {full_name(key) for key in shards}:
            raise RuntimeError(f"the sharded model's {sorted(shards)} are not NeuMF's {sorted(own)}")
        for key, value in shards.items():
            if hasattr(value, "local_shards"):
                gather_into(own[full_name(key)], value)
            else:
                own[full_name(key)].copy_(value)
        self.optimizer.gather_tables()
        return self.full.eval()

    def score_grid(self, *args, **kwargs):
        return self.full.score_grid(*args, **kwargs)

    def state_dict(self):
        return self.full.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state):
        self.full.load_state_dict(state)
        for key, value in self.dmp.state_dict().items():
            if hasattr(value, "local_shards"):
                scatter(state[full_name(key)], value)
            else:
                value.copy_(state[full_name(key)])


class ShardedOptimizer:
    """The dense layers' torch.optim optimizer, with the state dict of one optimizer over the full
    NeuMF's parameters (a replicated run's layout, so plain SGD resumes across layouts) plus the
    fused table optimizers' state as full tensors under "tables" ({param name: {state name: tensor}}, the
    tensors on rank 0 only)."""

    def __init__(self, dmp, full, make_dense_optimizer):
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        self.dmp = dmp
        dense = list(in_backward_optimizer_filter(dmp.named_parameters()))
        self.dense = make_dense_optimizer(nn.ParameterList(parameter for _, parameter in dense))
        self.defaults = self.dense.defaults
        self.index = {name: i for i, (name, _) in enumerate(full.named_parameters())}  # the replicated layout
        self.dense_index = [self.index[full_name(name)] for name, _ in dense]
        self.tables, self.stepped = {}, True

    def step(self):
        self.dense.step()
        self.stepped = True  # and so have the tables, in the backward pass

    def zero_grad(self):
        self.dense.zero_grad()

    def local_table_state(self):
        """{param name: {state name: ShardedTensor}} of the tables with shards on this rank."""
        state = self.dmp.fused_optimizer.state_dict()["state"]
        return {
            full_name(key): {name.rpartition(".")[2]: value for name, value in states.items()}
            for key, states in state.items()
        }

    def gather_tables(self):
        """Every table's fused optimizer state, full, on rank 0, which writes last.pth (a table-wise shard's
        state is only on its rank: the ranks first agree on what there is). The other ranks keep none of it:
        with Adam it is twice the tables."""
        local = self.local_table_state()
        shapes = {
            key: {name: (value.size(), value.dtype) for name, value in states.items()} for key, states in local.items()
        }
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, shapes)
        self.tables = {}
        for key in sorted({key for shapes in everyone for key in shapes}):
            names = sorted({name for shapes in everyone for name in shapes.get(key, {})})
            self.tables[key] = {}
            for name in names:
                size, dtype = next(shapes[key][name] for shapes in everyone if name in shapes.get(key, {}))
                full = torch.zeros(size, dtype=dtype, device=self.dmp.device)
                for slices, part in local_slices(local[key][name]) if key in local else ():
                    full[slices] = part.detach()
                torch.distributed.reduce(full, dst=0)
                if torch.distributed.get_rank() == 0:
                    self.tables[key][name] = full.cpu()

    def state_dict(self):
        dense = self.dense.state_dict()
        state = {self.dense_index[i]: value for i, value in dense["state"].items()}
        group = dense["param_groups"][0] | {"params": list(range(len(self.index)))}
        return {"state": state, "param_groups": [group], "tables": self.tables}

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
