"""The sharding plan: one planning path for training and for ``deepfm-plan``.

A plan is TorchRec's ``EmbeddingShardingPlanner`` run on a described cluster (``Cluster``:
world size, ranks per node, device, memory per rank, bandwidths) with our constraints, our
storage reservation and the embedding optimizer's state counted. Training describes the cluster
it runs on (``cluster_of_run``); ``deepfm-plan`` describes one from flags and hardware presets,
on any machine: the tables stay on ``meta`` and no process group is needed. The same function,
``plan_tables``, makes both plans, so the plan printed before a job is the plan the job gets.

Memory, one source of truth (``plannable``): the planner reserves ``RESERVED`` of each GPU's
HBM for activations, the dense part and the CUDA context (TorchRec's
``FixedPercentageStorageReservation``) but nothing of host memory; on CPU ranks the same
fraction is taken off the host-memory budget here, so the constraint checks, the planner and
the error messages all use the same usable bytes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.constants import MIN_CW_DIM
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    Stats,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ShardingPlan

from deepfm_dist.config import SHARDING_TYPES, Config
from deepfm_dist.data.schema import feature_specs
from deepfm_dist.model import TABLE_WEIGHT_KEY, table_dim, table_name

RESERVED = 0.15
"""Fraction of each rank's memory the planner leaves for everything but the tables."""
GIB = 1024**3
MAX_SEARCH_WORLD = 1024
"""``min_world_size`` is searched up to this many ranks (planning time grows with the world)."""
MAX_SEARCH_SECONDS = 30.0
"""... and for at most this long: a failed start should say so in a minute, not plan for ten."""
MODEL_PARALLEL_TYPES = [t for t in SHARDING_TYPES if t != "data_parallel"]

# The classes TorchRec's planner knows for counting optimizer state per weight (shard_estimators:
# SGD 0, Adam 2, RowWiseAdagrad 1/width, any other 1). The planner reads them from the table
# parameters' ``_optimizer_classes``; the sharder's fused_params alone count nothing.
OPTIMIZER_CLASSES = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
    # FBGEMM keeps a full-width first moment and a row-wise second: counted as 1 per weight
    # (the planner's "other"), short by 1/width.
    "partial_rowwise_adam": trec_optim.PartialRowWiseAdam,
}
STATE_PER_WEIGHT = {"sgd": 0.0, "adagrad": 1.0, "adam": 2.0, "partial_rowwise_adam": 1.0}


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """A kind of rank: its memory and the planner's bandwidths, in GB and GB/s (TorchRec's
    convention: GB/s x 1024^3 / 1000 bytes per ms). None: TorchRec's default. Sources and the
    reasoning per figure: docs/planning.md."""

    name: str
    device: str
    hbm_gib: float
    ddr_gib: float
    """Host memory per rank."""
    ranks_per_node: int
    hbm_mem_bw: float | None = None
    hbm_to_ddr_mem_bw: float | None = None
    """PCIe, one direction: what UVM caching reads tables through."""
    intra_host_bw: float | None = None
    """NVLink, NVIDIA's bidirectional headline (as TorchRec's own default, the A100's 600)."""
    inter_host_bw: float | None = None
    """The network per GPU (one NIC per GPU), one direction."""


HARDWARE = {
    # 80 GB HBM2e at 2,039 GB/s, NVLink 3 600 GB/s, PCIe Gen4 x16, HDR 200 Gb/s per GPU (DGX A100).
    "a100-80g": Hardware("a100-80g", "cuda", 80, 256, 8, 2039, 32, 600, 25),
    # 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s, PCIe Gen5 x16, NDR 400 Gb/s per GPU (DGX H100).
    "h100-80g": Hardware("h100-80g", "cuda", 80, 256, 8, 3350, 64, 900, 50),
    # 141 GB HBM3e at 4.8 TB/s (140 GiB visible), NVLink 4 900 GB/s, PCIe Gen5, NDR 400 Gb/s (DGX H200).
    "h200-141g": Hardware("h200-141g", "cuda", 140, 256, 8, 4800, 64, 900, 50),
    # CPU ranks: TorchRec's default bandwidths; host memory per rank given by the run.
    "cpu": Hardware("cpu", "cpu", 0, 128, 2),
}


def detect_hardware(device_name: str, total_bytes: int) -> Hardware | None:
    """The preset of the GPU this process sees (``sharding.hardware=auto`` on a GPU), or None."""
    name = device_name.upper()
    for key, marker in (("h200-141g", "H200"), ("h100-80g", "H100"), ("a100-80g", "A100")):
        if marker in name and (key != "a100-80g" or total_bytes > 60 * GIB):
            return HARDWARE[key]
    return None


@dataclass
class Cluster:
    """What the planner plans for: ``world_size`` ranks, ``local_world_size`` per node."""

    world_size: int
    local_world_size: int
    device: str
    hbm_bytes: int
    """GPU memory per rank (0 on CPU)."""
    ddr_bytes: int
    """Host memory per rank."""
    hardware: Hardware | None = None
    """The bandwidths (None: TorchRec's defaults)."""

    def plannable(self) -> dict[str, int]:
        """Bytes per rank the tables may use: HBM less ``RESERVED`` on a GPU (host memory too
        with UVM caching), host memory less ``RESERVED`` on CPU."""
        if self.device == "cuda":
            return {"hbm": int(self.hbm_bytes * (1 - RESERVED)), "ddr": self.ddr_bytes}
        return {"hbm": 0, "ddr": int(self.ddr_bytes * (1 - RESERVED))}

    def table_budget(self, uvm_caching: bool) -> tuple[str, int]:
        """(memory, bytes per rank) that bounds the tables: HBM on a GPU, host memory on CPU or
        with UVM caching (a cached table lives in host memory)."""
        usable = self.plannable()
        if self.device == "cuda" and not uvm_caching:
            return "HBM", usable["hbm"]
        return "host memory", usable["ddr"]

    def resized(self, world_size: int) -> Cluster:
        return Cluster(world_size, min(self.local_world_size, world_size), self.device, self.hbm_bytes,
                       self.ddr_bytes, self.hardware)

    def describe(self) -> str:
        nodes = math.ceil(self.world_size / self.local_world_size)
        mem = (f"{self.hbm_bytes / GIB:.0f} GiB HBM + {self.ddr_bytes / GIB:.0f} GiB host memory per rank"
               if self.device == "cuda" else f"{self.ddr_bytes / GIB:.1f} GiB host memory per rank")
        hw = self.hardware.name if self.hardware else "TorchRec's default bandwidths"
        return f"{self.world_size} {self.device} rank(s) ({nodes} node(s) x {self.local_world_size}), {mem}, {hw}"


def size(n: float) -> str:
    """Bytes for a message: GiB, or MiB below one GiB."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def available_host_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int:
    """Host memory this node can still give: Linux's MemAvailable (free memory plus the page cache
    it can reclaim), capped by this cgroup's limit (cgroup v2). Not the free pages alone: after
    reading or writing a data set of several GB the page cache holds nearly all of memory, free
    pages shrink to a few GB, and the Kaggle tables were refused on a host with 23 GB available.
    Elsewhere than Linux, the free pages."""
    available = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open(os.path.join(cgroup, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(cgroup, "memory.current")) as f:
            used = int(f.read().strip())
        with open(os.path.join(cgroup, "memory.stat")) as f:  # its page cache is reclaimable too
            stat = dict(line.split() for line in f if line.strip())
        used -= int(stat.get("file", 0))
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def host_share(ranks_on_node: int) -> int:
    """This node's available memory shared by its ranks."""
    return available_host_bytes() // max(1, ranks_on_node)


def cpu_budget_bytes(cfg: Config, ranks_on_node: int) -> int:
    """A CPU rank's host memory: ``sharding.host_memory_gb``, else its share of free memory."""
    if cfg.sharding.host_memory_gb:
        return int(cfg.sharding.host_memory_gb * GIB)
    return host_share(ranks_on_node)


def cluster_of_run(cfg: Config, world_size: int, local_world_size: int, device: torch.device) -> Cluster:
    """The cluster a training run (or prediction) is on: this process's GPU and its preset
    (``sharding.hardware``, auto: recognised by name), or CPU ranks with their budget."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if cfg.sharding.hardware == "auto":
            hw = detect_hardware(props.name, props.total_memory)
        else:
            hw = HARDWARE[cfg.sharding.hardware]
        hbm = int(cfg.sharding.hbm_gb * GIB) if cfg.sharding.hbm_gb else props.total_memory
        return Cluster(world_size, local_world_size, "cuda", hbm, host_share(local_world_size), hw)
    return Cluster(world_size, local_world_size, "cpu", 0, cpu_budget_bytes(cfg, local_world_size), None)


def make_topology(cluster: Cluster):
    usable = cluster.plannable()
    trainer = TrainerConfig(
        world_size=cluster.world_size,
        local_world_size=cluster.local_world_size,
        hbm_cap_bytes=cluster.hbm_bytes if cluster.device == "cuda" else 0,
        ddr_cap_bytes=usable["ddr"],
    )
    hw = cluster.hardware
    bandwidths = {}
    if hw is not None:
        bandwidths = {k: getattr(hw, k) * GIB / 1000 for k in ("hbm_mem_bw", "hbm_to_ddr_mem_bw", "intra_host_bw",
                                                                 "inter_host_bw") if getattr(hw, k) is not None}
    # Without use_hardware_based_bandwidth the factory drops HardwareConfig's bandwidths.
    kernel = KernelConfig(compute_device=cluster.device, use_hardware_based_bandwidth=bool(bandwidths))
    return TopologyFactory.create_topology(trainer_config=trainer, hardware_config=HardwareConfig(**bandwidths),
                                           kernel_config=kernel)


# --------------------------------------------------------------------------- constraints


def table_kinds(cfg: Config) -> dict[str, tuple[str, str]]:
    """Table -> (sharding type or "auto", the config key that set it).

    ``sharding.tables`` may name a table or any column that looks it up (the same thing for
    tables that are not shared)."""
    out: dict[str, tuple[str, str]] = {}
    for f in feature_specs(cfg.data):
        for key in (f.table, f.name):
            if key in cfg.sharding.tables:
                out[f.table] = (cfg.sharding.tables[key], f"sharding.tables.{key}")
                break
        out.setdefault(f.table, (cfg.sharding.type, "sharding.type"))
    return out


def table_rows(cfg: Config) -> dict[str, int]:
    return {f.table: f.num_embeddings for f in feature_specs(cfg.data)}


def table_bytes(cfg: Config, table: str) -> int:
    """fp32 weights plus fused optimizer state of one table."""
    rows, dim = table_rows(cfg)[table], table_dim(cfg.model.embedding_dim)
    if cfg.optimizer.embedding == "rowwise_adagrad":
        return rows * (dim + 1) * 4
    return int(rows * dim * 4 * (1 + STATE_PER_WEIGHT[cfg.optimizer.embedding]))


def uvm_caching(cfg: Config, cluster: Cluster) -> bool:
    return cfg.sharding.allow_uvm_caching and cluster.device == "cuda"


def table_constraints(cfg: Config, cluster: Cluster) -> dict[str, ParameterConstraints]:
    """Per-table allowed sharding types and kernels from ``sharding.type`` / ``sharding.tables``.

    ``auto`` lets the planner choose among the model-parallel types with the fused kernel, so
    that every table is updated by the configured fused optimizer; data_parallel must be asked
    for explicitly (its tables are then updated by the dense optimizer, replicated on every rank).
    Column-wise types are left out of ``auto`` for tables narrower than two column shards
    (2 x 128 columns, TorchRec's smallest column shard): such a table gets one column shard,
    the placement of table-wise plus a permute and a second output all-to-all, yet the CPU
    planner often picks it, though table-wise is faster. With ``sharding.allow_uvm_caching`` on
    a GPU the planner may also keep a table in host memory with a cache of its hottest rows in
    HBM (``fused_uvm_caching``, ``sharding.cache_load_factor`` of the rows)."""
    out = {}
    width = table_dim(cfg.model.embedding_dim)
    auto_types = [t for t in MODEL_PARALLEL_TYPES if "column" not in t or width >= 2 * MIN_CW_DIM]
    kernels = [EmbeddingComputeKernel.FUSED.value]
    cache = None
    if uvm_caching(cfg, cluster):
        kernels.append(EmbeddingComputeKernel.FUSED_UVM_CACHING.value)
        cache = CacheParams(load_factor=cfg.sharding.cache_load_factor)
    for table, (kind, _) in table_kinds(cfg).items():
        types = auto_types if kind == "auto" else [kind]
        table_kernels = [EmbeddingComputeKernel.DENSE.value] if kind == "data_parallel" else kernels
        out[table_name(table)] = ParameterConstraints(sharding_types=types, compute_kernels=table_kernels,
                                                      cache_params=cache if kind != "data_parallel" else None)
    return out


def check_constraints_fit(cfg: Config, cluster: Cluster) -> None:
    """Name the table and the constraint when a table cannot fit, before the planner runs.

    A table constrained to one rank (table_wise, data_parallel) must fit a rank's plannable
    memory; a split table (row/column-wise) must fit across the ranks. The planner would only
    say "insufficient storage"."""
    _, per_rank = cluster.table_budget(uvm_caching(cfg, cluster))
    for table, (kind, key) in table_kinds(cfg).items():
        need = table_bytes(cfg, table)
        ranks = 1 if kind in ("table_wise", "data_parallel") else cluster.world_size
        if need > per_rank * ranks:
            where = "one rank" if ranks == 1 else f"{ranks} ranks"
            raise TableTooLarge(ranks > 1,
                f"table {table_name(table)} ({table_rows(cfg)[table]:,} rows, {size(need)} with "
                f"{cfg.optimizer.embedding} state) does not fit {where} under {key}={kind!r}: "
                f"{size(per_rank)} usable per rank. Use row_wise/table_row_wise, more ranks"
                + (", sharding.allow_uvm_caching" if cluster.device == "cuda" and not uvm_caching(cfg, cluster) else "")
                + (", or a larger sharding.host_memory_gb." if cluster.device == "cpu" else ".")
            )


# --------------------------------------------------------------------------- planning


class PlanFailed(RuntimeError):
    """The tables do not fit the cluster; the message says what they need and what there is."""

    def __init__(self, message: str, report: PlanReport | None = None):
        super().__init__(message)
        self.report = report


class TableTooLarge(PlanFailed):
    """One table cannot fit under its constraint; ``more_ranks_help`` when it is split over all."""

    def __init__(self, more_ranks_help: bool, message: str):
        super().__init__(message)
        self.more_ranks_help = more_ranks_help


@dataclass
class TableReport:
    name: str
    rows: int
    width: int
    sharding: str
    kernel: str
    ranks: list[int]
    hbm_bytes: int
    """Planner-counted bytes over all shards: weights, optimizer state, IO buffers (and the
    HBM cache of a UVM-cached table)."""
    ddr_bytes: int


@dataclass
class RankReport:
    rank: int
    hbm_bytes: int
    ddr_bytes: int
    perf_ms: float
    """The planner's estimate of this rank's embedding time per step (forward, backward,
    comms of its shards)."""


@dataclass
class PlanReport:
    fits: bool
    world_size: int
    local_world_size: int
    device: str
    hardware: str | None
    hbm_bytes_per_rank: int
    ddr_bytes_per_rank: int
    plannable_bytes_per_rank: dict[str, int]
    need_bytes: int
    """Weights plus optimizer state of every table (no IO buffers)."""
    embedding_optimizer: str
    tables: list[TableReport] = field(default_factory=list)
    ranks: list[RankReport] = field(default_factory=list)
    min_world_size: int | None = None
    """When the tables do not fit: the smallest world size that fits on the same hardware
    (None: none up to MAX_SEARCH_WORLD, or one table cannot fit under its constraint)."""
    message: str = ""
    planning_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class DeterministicEnumerator(EmbeddingEnumerator):
    """TorchRec's enumerator with its options in a fixed order. It builds each table's sharding
    types and kernels from set intersections, so their order, which breaks ties between equally
    good proposals, follows Python's string hashing and changes from process to process: two
    processes could print different (equivalent) plans. Sorted, every process plans alike."""

    def enumerate(self, module: nn.Module, sharders: list) -> list[ShardingOption]:
        options = super().enumerate(module, sharders)
        return sorted(options, key=lambda so: (so.fqn, so.sharding_type, so.compute_kernel,
                                               [tuple(s.size) + tuple(s.offset) for s in so.shards]))


class _BestPlan(Stats):
    """Receives the planner's chosen sharding options (in place of its INFO-level stats table)."""

    def __init__(self):
        self.options: list[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time,
            best_plan, *args, **kwargs) -> None:
        self.options = list(best_plan)


def tables_of(module: nn.Module) -> dict[str, nn.Parameter]:
    """The embedding tables' weight parameters by table name."""
    return {m.group(1): p for name, p in module.named_parameters() if (m := TABLE_WEIGHT_KEY.search(name))}


def need_bytes(cfg: Config) -> int:
    return sum(table_bytes(cfg, t) for t in table_rows(cfg))


def _plan_once(module: nn.Module, cfg: Config, cluster: Cluster, sharder) -> tuple[ShardingPlan, list[ShardingOption]]:
    best = _BestPlan()
    topology, constraints = make_topology(cluster), table_constraints(cfg, cluster)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=cfg.train.batch_size,
        enumerator=DeterministicEnumerator(topology=topology, batch_size=cfg.train.batch_size, constraints=constraints),
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=RESERVED),
        stats=[best],
        debug=False,
    )
    # Count the fused optimizer's state (the planner reads it off the parameters), for the
    # planning only: DMP derives its optimizer from the same attribute when it is set.
    params = tables_of(module)
    for p in params.values():
        p._optimizer_classes = [OPTIMIZER_CLASSES[cfg.optimizer.embedding]]
    try:
        plan = planner.plan(module, [sharder])
    finally:
        for p in params.values():
            del p._optimizer_classes
    return plan, best.options


def _insufficient(e: Exception) -> bool:
    """The planner found no placement: too little memory, or none that its partitioner could
    pack (reported as "strict constraints" when the total would fit)."""
    return isinstance(e, PlannerError) and e.error_type in (PlannerErrorType.INSUFFICIENT_STORAGE,
                                                             PlannerErrorType.STRICT_CONSTRAINTS,
                                                             PlannerErrorType.PARTITION)


def min_world_size(module: nn.Module, cfg: Config, cluster: Cluster, sharder) -> int | None:
    """The smallest world size above ``cluster.world_size`` whose plan fits, by planning: from
    the lower bound the tables' size gives, doubling, then bisecting."""
    _, per_rank = cluster.table_budget(uvm_caching(cfg, cluster))
    fits_cache: dict[int, bool] = {}
    deadline = time.monotonic() + MAX_SEARCH_SECONDS

    def fits(world: int) -> bool:
        if world not in fits_cache:
            if time.monotonic() > deadline:
                raise TimeoutError
            try:
                check_constraints_fit(cfg, cluster.resized(world))
                _plan_once(module, cfg, cluster.resized(world), sharder)
                fits_cache[world] = True
            except PlanFailed:
                fits_cache[world] = False
            except Exception as e:  # noqa: BLE001 - only "does not fit" means try more ranks
                if not _insufficient(e):
                    raise
                fits_cache[world] = False
        return fits_cache[world]

    low = max(cluster.world_size + 1, math.ceil(need_bytes(cfg) / max(per_rank, 1)))
    if low > MAX_SEARCH_WORLD:
        return None
    high = low
    try:
        while not fits(high):
            if high >= MAX_SEARCH_WORLD:
                return None
            low, high = high + 1, min(2 * high, MAX_SEARCH_WORLD)
        while low < high:  # fits(high); low - 1 does not fit (or is the lower bound)
            mid = (low + high) // 2
            if fits(mid):
                high = mid
            else:
                low = mid + 1
    except TimeoutError:  # out of search time: the smallest world known to fit, if any
        found = [w for w, ok in fits_cache.items() if ok]
        return min(found) if found else None
    return high


def plan_tables(module: nn.Module, cfg: Config, cluster: Cluster, sharder, search: bool = True) -> tuple[ShardingPlan, PlanReport]:
    """Plan the module's tables on ``cluster``: the plan and its report. Raises PlanFailed
    (with the report, ``min_world_size`` searched when ``search``) when the tables do not fit."""
    t0 = time.perf_counter()
    usable = cluster.plannable()
    report = PlanReport(
        fits=False, world_size=cluster.world_size, local_world_size=cluster.local_world_size, device=cluster.device,
        hardware=cluster.hardware.name if cluster.hardware else None, hbm_bytes_per_rank=cluster.hbm_bytes,
        ddr_bytes_per_rank=cluster.ddr_bytes, plannable_bytes_per_rank=usable, need_bytes=need_bytes(cfg),
        embedding_optimizer=cfg.optimizer.embedding,
    )
    try:
        check_constraints_fit(cfg, cluster)
        plan, options = _plan_once(module, cfg, cluster, sharder)
    except Exception as e:
        if not isinstance(e, PlanFailed) and not _insufficient(e):
            raise
        where, per_rank = cluster.table_budget(uvm_caching(cfg, cluster))
        if isinstance(e, PlanFailed):
            message = str(e)
        else:
            message = (f"the tables do not fit: they need {size(report.need_bytes)} (weights and "
                       f"{cfg.optimizer.embedding} state, {len(table_rows(cfg))} tables), and {cluster.world_size} "
                       f"rank(s) have {size(per_rank)} of {where} each for tables "
                       f"({size(cluster.world_size * per_rank)} in all, after the {RESERVED:.0%} reserve)")
        if search and not (isinstance(e, TableTooLarge) and not e.more_ranks_help):
            report.min_world_size = min_world_size(module, cfg, cluster, sharder)
            message += (f"; the smallest world size that fits on this hardware is {report.min_world_size}"
                        if report.min_world_size else
                        f"; no world size up to {MAX_SEARCH_WORLD} (or found within {MAX_SEARCH_SECONDS:.0f} s of "
                        f"planning) fits on this hardware: the tables' other costs (IO buffers) outgrow each rank")
        if cluster.device == "cuda" and not uvm_caching(cfg, cluster):
            message += " (or set sharding.allow_uvm_caching=true to keep large tables in host memory)"
        report.message, report.planning_seconds = message, time.perf_counter() - t0
        raise PlanFailed(message, report) from None
    report.fits = True
    report.planning_seconds = time.perf_counter() - t0
    fill_report(report, options, cluster.world_size, [table_name(t) for t in table_rows(cfg)])
    return plan, report


def fill_report(report: PlanReport, options: list[ShardingOption], world_size: int, order: list[str]) -> None:
    """Per table and per rank, from the planner's chosen options (the numbers of its own stats table)."""
    ranks = {r: RankReport(r, 0, 0, 0.0) for r in range(world_size)}
    tables = []
    for so in options:
        t = TableReport(so.name, int(so.tensor.shape[0]), int(so.tensor.shape[1]), so.sharding_type, so.compute_kernel,
                        sorted({s.rank for s in so.shards if s.rank is not None}), 0, 0)
        for s in so.shards:
            t.hbm_bytes += s.storage.hbm
            t.ddr_bytes += s.storage.ddr
            r = ranks[s.rank]
            r.hbm_bytes += s.storage.hbm
            r.ddr_bytes += s.storage.ddr
            r.perf_ms += s.perf.total
        tables.append(t)
    position = {name: i for i, name in enumerate(order)}
    report.tables = sorted(tables, key=lambda t: (position.get(t.name, len(position)), t.name))
    report.ranks = [ranks[r] for r in sorted(ranks)]


def format_report(report: PlanReport) -> str:
    """The plan as a person reads it: per table, per rank, then the planning time."""
    def mib(b: int) -> str:
        return f"{b / 2**20:,.1f}"

    lines = [f"{'table':<12} {'rows':>12} {'width':>5} {'sharding':<17} {'kernel':<17} {'ranks':<12} "
             f"{'HBM MiB':>10} {'DDR MiB':>10}"]
    for t in report.tables:
        ranks = ",".join(map(str, t.ranks)) if len(t.ranks) <= 4 else f"{t.ranks[0]}..{t.ranks[-1]} ({len(t.ranks)})"
        lines.append(f"{t.name:<12} {t.rows:>12,} {t.width:>5} {t.sharding:<17} {t.kernel:<17} {ranks:<12} "
                     f"{mib(t.hbm_bytes):>10} {mib(t.ddr_bytes):>10}")
    lines.append(f"{'rank':<6} {'HBM MiB':>10} {'DDR MiB':>10} {'perf ms':>9}")
    for r in report.ranks:
        lines.append(f"{r.rank:<6} {mib(r.hbm_bytes):>10} {mib(r.ddr_bytes):>10} {r.perf_ms:>9.3f}")
    lines.append(f"(tables and {report.embedding_optimizer} state counted; planned in {report.planning_seconds:.2f} s)")
    return "\n".join(lines)
