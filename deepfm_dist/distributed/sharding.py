"""Sharding the embedding tables across ranks with TorchRec's planner and DMP.

The DeepFM module arrives with its tables on ``meta``; here we choose a plan (per-table
sharding type, ranks), let ``DistributedModelParallel`` materialise only each rank's shards
and wrap the dense rest in DDP, then give every shard its world-size-independent initial
values.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType

from deepfm_dist.config import Config
from deepfm_dist.distributed import pooled_shm, shm
from deepfm_dist.distributed.ddp_hook import DeepFMDataParallelWrapper, ShmAllReduceState
from deepfm_dist.distributed.env import DistEnv, broadcast_result
from deepfm_dist.distributed.planning import PlanReport, cluster_of_run, plan_tables, table_rows
from deepfm_dist.hugepages import advise_huge_pages
from deepfm_dist.model import TABLE_WEIGHT_KEY, init_table_block, table_dim, table_name
from deepfm_dist.model.init import BLOCK_ROWS

FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
}


class DeepFMSharder(EmbeddingBagCollectionSharder):
    """The stock sharder, plus row-wise and table-row-wise on CPU.

    TorchRec's CPU allow-list omits them, but the fused CPU kernel runs them exactly
    (tested: identical losses to the single-process model), and they are the only way to
    split one table larger than a rank's memory.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def make_sharder(cfg: Config) -> DeepFMSharder:
    """The sharder with the fused optimizer and, if asked, quantized all-to-all comms."""
    opt = cfg.optimizer
    fused_params = {
        "optimizer": FUSED_OPTIMIZERS[opt.embedding],
        "learning_rate": opt.embedding_lr,
        "eps": opt.embedding_eps,
    }
    if opt.embedding_weight_decay > 0:
        fused_params["weight_decay"] = opt.embedding_weight_decay
        fused_params["weight_decay_mode"] = WeightDecayMode.L2
    qcomm = None
    if cfg.sharding.comm_precision != "fp32":
        comm = {"fp16": CommType.FP16, "bf16": CommType.BF16}[cfg.sharding.comm_precision]
        qcomm = get_qcomm_codecs_registry(QCommsConfig(forward_precision=comm, backward_precision=comm))
    return DeepFMSharder(fused_params=fused_params, qcomm_codecs_registry=qcomm)


def plan_sharding(module: nn.Module, cfg: Config, env: DistEnv, sharder: DeepFMSharder) -> tuple[ShardingPlan, PlanReport | None]:
    """Plan on rank 0 (``planning.plan_tables``, as ``deepfm-plan`` does) and broadcast the
    plan, or the planner's error, to every rank; rank 0 also gets the plan's report.

    If rank 0 raised while the others waited in TorchRec's own plan broadcast, they would hang
    until the collective timeout; here every rank receives either the plan or the message and
    all fail together before any training collective.
    """
    result: ShardingPlan | str
    report = None
    if env.is_main:
        try:
            cluster = cluster_of_run(cfg, env.world_size, env.local_world_size, env.device)
            result, report = plan_tables(module, cfg, cluster, sharder)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result = f"sharding plan failed: {e}" if isinstance(e, RuntimeError) else f"sharding plan failed: {type(e).__name__}: {e}"
    else:
        result = ""
    result = broadcast_result(env, result)
    if isinstance(result, str):
        raise RuntimeError(result)
    return result, report


@torch.no_grad()
def init_sharded_tables(model: nn.Module, cfg: Config) -> int:
    """Overwrite every local shard with its world-size-independent initial values.

    Works on ShardedTensor (table/row/column-wise shards), DTensor and plain (replicated)
    tensors; writes in place into the tensors the kernels use. Returns the number of tables
    touched on this rank.
    """
    d = cfg.model.embedding_dim
    features = {table_name(t) for t in table_rows(cfg)}
    touched = 0
    for key, value in model.state_dict().items():
        m = TABLE_WEIGHT_KEY.search(key)
        if not m or m.group(1) not in features:
            continue
        name = m.group(1)
        kwargs = dict(seed=cfg.train.seed, table=name, vector_dim=d, table_dim=table_dim(d), std=cfg.model.init_std)
        pieces: list[tuple[torch.Tensor, int, int]] = []
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                pieces.append((shard.tensor, r0, c0))
        elif isinstance(value, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = value.to_local()
            _, (r0, c0) = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
            pieces.append((local, r0, c0))
        else:
            pieces.append((value, 0, 0))
        for tensor, r0, c0 in pieces:
            if tensor.numel() == 0:
                continue
            rows, cols = tensor.shape
            # One RNG block at a time: a temporary the size of the whole shard would add the
            # largest shard to peak memory.
            lo = r0
            while lo < r0 + rows:
                hi = min(r0 + rows, (lo // BLOCK_ROWS + 1) * BLOCK_ROWS)
                block = init_table_block(rows=(lo, hi), cols=(c0, c0 + cols), **kwargs)
                tensor[lo - r0 : hi - r0].copy_(block.to(tensor.device, tensor.dtype))
                lo = hi
        touched += 1
    return touched


def use_shared_memory(cfg: Config, env: DistEnv) -> bool:
    """Whether this run's ranks exchange through shared memory (``sharding.intra_node_comm``):
    CPU ranks all on this node (x86-64) with room in /dev/shm on every rank. Collective: every
    rank calls it and all get the same answer."""
    available = (env.device.type == "cpu" and env.world_size > 1 and env.world_size == env.local_world_size
                 and shm.supported())
    mode = cfg.sharding.intra_node_comm
    if mode == "shm" and not available:
        raise ValueError(
            f"sharding.intra_node_comm='shm' needs CPU ranks all on one x86-64 node; here: {env.world_size} "
            f"rank(s), {env.local_world_size} on this node, device {env.device.type}, {platform.machine()}"
        )
    if mode == "gloo" or not available:
        return False
    room, found = shm.room_on_every_rank(cfg.sharding.shm_buffer_mb, env.local_world_size)
    if room:
        return True
    if mode == "shm":
        raise ValueError(f"sharding.intra_node_comm='shm': not enough shared memory on every node ({found}); "
                         f"lower sharding.shm_buffer_mb or use gloo")
    if env.is_main:
        print(f"deepfm: sharding.intra_node_comm=auto: using gloo, not shared memory ({found}; "
              f"see sharding.shm_buffer_mb)", flush=True)
    return False


@dataclass
class Transport:
    """How the sharded model's collectives travel (``transport``)."""

    group: torch.distributed.ProcessGroup
    """The group DMP, DCP and the sharded tensors get: the stock default group, unless
    ``sharding.shm_all_to_all`` (opt-in) asked for the shared-memory group."""
    wrapper: DeepFMDataParallelWrapper
    """DMP's DDP wrapper of the dense part, with the shared-memory all-reduce hook when used."""
    description: str


def transport(cfg: Config, env: DistEnv) -> Transport:
    """The process group for DMP and the DDP wrapper of the dense part. Every rank calls it.

    Default: the stock group (gloo / NCCL) everywhere; on CPU ranks of one node DDP's gradient
    all-reduce goes through shared memory by a DDP communication hook (``distributed/ddp_hook.py``).
    ``sharding.shm_all_to_all`` (opt-in) hands DMP the shared-memory group itself, so that the
    embedding all-to-alls go through shared memory too, and with ``sharding.shm_fused_pooled``
    replaces TorchRec's ``alltoall_pooled`` (checked at start-up to be the function it was
    written for)."""
    stock = torch.distributed.GroupMember.WORLD
    if not use_shared_memory(cfg, env):
        return Transport(stock, DeepFMDataParallelWrapper(), env.backend)
    if cfg.sharding.shm_all_to_all:
        if cfg.sharding.shm_fused_pooled:
            pooled_shm.install()
        return Transport(shm.new_shm_group(cfg.sharding.shm_buffer_mb), DeepFMDataParallelWrapper(),
                         "shared memory for all-to-alls and all-reduce (sharding.shm_all_to_all)"
                         + (", fused pooled all-to-all" if cfg.sharding.shm_fused_pooled else ""))
    state = ShmAllReduceState.create(cfg.sharding.shm_buffer_mb)
    return Transport(stock, DeepFMDataParallelWrapper(state),
                     f"{env.backend}, dense gradient all-reduce through shared memory")


def shard_model(module: nn.Module, cfg: Config, env: DistEnv) -> tuple[DistributedModelParallel, ShardingPlan, PlanReport | None]:
    """Plan, shard with DMP (dense part under DDP), and initialise the tables. Returns the
    model, the plan and (rank 0) the plan's report."""
    sharder = make_sharder(cfg)
    plan, report = plan_sharding(module, cfg, env, sharder)
    comm = transport(cfg, env)
    dmp = DistributedModelParallel(
        module=module,
        env=ShardingEnv.from_process_group(comm.group),
        device=env.device,
        plan=plan,
        sharders=[sharder],
        data_parallel_wrapper=comm.wrapper,
    )
    if env.is_main and env.world_size > 1:
        print(f"deepfm: transport: {comm.description} (sharding.intra_node_comm={cfg.sharding.intra_node_comm})",
              flush=True)
    init_sharded_tables(dmp, cfg)
    if cfg.train.huge_pages and env.device.type == "cpu":
        # After the tables are written: their pages are moved, not faulted in afresh.
        result = advise_huge_pages(embedding_kernel_tensors(dmp))
        if env.is_main:
            print(f"deepfm: {result.line()} (rank 0; train.huge_pages)", flush=True)
    return dmp, plan, report


def embedding_kernel_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of the sharded modules' embedding kernels on this rank: the
    fused tables' flat weights and optimizer state (FBGEMM's ``weights_host``,
    ``momentum1_host``, ...). TorchRec keeps the kernels in each sharded module's ``_lookups``,
    outside the module tree that ``named_parameters`` walks."""
    out: list[torch.Tensor] = []
    for module in model.modules():
        for lookup in getattr(module, "_lookups", None) or []:
            if isinstance(lookup, nn.Module):
                out.extend(lookup.parameters())
                out.extend(lookup.buffers())
    return out
