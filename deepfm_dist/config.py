"""Run configuration: one dataclass per concern, a TOML preset, ``--section.key=value`` overrides.

Every field is documented under its definition and validated in ``__post_init__``; an invalid
value raises :class:`ConfigError` naming the key (``train.batch_size``), the value and what is
allowed. Values from the command line arrive as strings and are parsed by the field's type:
``int``, ``float``, ``bool`` (true/false/1/0/yes/no), ``str``, lists as comma-separated items
(``model.mlp=400,400,400``), ``dict[str, str]`` as ``key:value`` pairs
(``sharding.tables=C1:row_wise,C2:column_wise``) and optional values as ``none``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

SHARDING_TYPES = (
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "table_column_wise",
    "data_parallel",
)
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam")
CPU_EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
LR_DECAYS = ("none", "step", "linear", "cosine")
BATCH_SCALINGS = ("none", "sqrt", "linear")
PRECISIONS = ("fp32", "bf16", "auto")
COMM_PRECISIONS = ("fp32", "fp16", "bf16")
BEST_METRICS = ("auc", "logloss", "ne", "none")
HARDWARE_NAMES = ("auto", "a100-80g", "h100-80g", "h200-141g")  # distributed/planning.py: HARDWARE
INTRA_NODE_COMMS = ("auto", "gloo", "shm")
MAX_LR = 1e3
"""Largest learning rate accepted: far above any useful one, and far below fp32's range."""
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
LINEAR_KERNELS = ("auto", "onednn", "torch")
DEVICES = ("auto", "cpu", "cuda")
DENSE_TRANSFORMS = ("log1p", "none")
POOLINGS = ("sum", "mean")

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["data/generated/synthetic/train"])
    """Training Parquet: file(s), directories (every *.parquet below) or globs."""
    val: list[str] = field(default_factory=lambda: ["data/generated/synthetic/val"])
    """Validation Parquet, same forms as ``train``; scored in full at the end of each epoch."""
    label: str = "label"
    """Name of the 0/1 label column."""
    dense: list[str] = field(default_factory=lambda: list(CRITEO_DENSE))
    """Dense (numeric) columns; nulls become 0, then ``dense_transform``."""
    sparse: list[str] = field(default_factory=lambda: list(CRITEO_SPARSE))
    """Categorical columns, one embedding table each unless ``shared_tables`` says otherwise
    (int64 or string values; nulls allowed; list columns if named in ``multi_hot``)."""
    num_embeddings: int = 100_000
    """Rows per embedding table; raw ids are hashed into [1, num_embeddings), row 0 holds nulls."""
    num_embeddings_per_feature: list[int] = field(default_factory=list)
    """Optional per-column table sizes (same order as ``sparse``); overrides ``num_embeddings``."""
    hash_seed: int = 0
    """Salt of the id hash; changing it re-maps every id (and invalidates trained tables)."""
    vocab: str = ""
    """prepare-criteo's output directory (or its vocab/) built with --vocab-threshold: map each
    sparse column's raw ids through its frequency-threshold vocabulary instead of hashing (values
    seen fewer than the threshold times in train, and unseen ones, share row 0; nulls get the
    vocabulary's null row). Table sizes then come from its manifest, replacing
    ``num_embeddings_per_feature`` (which sizes hashed tables, e.g. a preset's). Integer
    (single-valued) columns only."""
    vocab_sha256: str = ""
    """Set by the run from ``vocab``'s files (leave it empty): checkpoints and exported models
    carry it, and prediction refuses a vocabulary whose content differs."""
    shuffle: bool = True
    """Training: shuffle the row-group order each epoch (by train.seed and the epoch) and the
    rows within the shuffle buffer; false reads the files in order. Evaluation never shuffles."""
    shuffle_buffer: int = 131_072
    """Rows shuffled together in memory (rounded up to whole batches; 0: only the row-group
    order is shuffled). Costs about 270 bytes per row with the Criteo columns (~35 MB)."""
    num_workers: int = -1
    """DataLoader worker processes per rank; 0 reads in the training process; -1 (auto): 0 on
    CPU, where the ranks already use every core and one loader process reads far more rows
    per second than a CPU step consumes, and up to 4 per GPU rank (within its share of the
    node's cores), so that Parquet decoding is never on the thread that launches the GPU's
    work. The batch order depends on the count: a mid-epoch resume under auto keeps the count
    the checkpoint was written with (a CPU-written checkpoint resumes on a GPU)."""
    prefetch: int = 2
    """Row groups read ahead by a background thread in each loader process (0: read when
    needed). Memory per loader process: about (prefetch + 1) row groups plus the shuffle buffer."""
    dense_transform: str = "log1p"
    """Dense columns after nulls/NaN/inf -> 0: log1p (``log1p(max(x, 0))``, for heavy-tailed
    counts such as Criteo's) or none (the values as float32)."""
    multi_hot: list[str] = field(default_factory=list)
    """Sparse columns of Parquet type list<int64> (or list<string>): a bag of ids per row, e.g.
    a click history; a null or empty list is an empty bag."""
    weighted: dict[str, str] = field(default_factory=dict)
    """Weighted features, sparse column -> its weights column (list<float> beside a
    list<int64> ids column with the same lengths; float beside a scalar id column)."""
    shared_tables: dict[str, str] = field(default_factory=dict)
    """Sparse column -> embedding table name; columns naming the same table share it (they
    must have the same size, pooling and weighting). A column not listed has its own table."""
    pooling: dict[str, str] = field(default_factory=dict)
    """Sparse column -> sum or mean over its ids in a row (default sum)."""
    skip_bad_row_groups: bool = False
    """Skip row groups that cannot be read or hold bad values (and empty files/row groups)
    instead of stopping; their rows become weight-0 padding so every rank keeps the same
    number of batches, and each skip is counted and reported."""

    def __post_init__(self) -> None:
        _require(len(self.train) > 0, "data.train", self.train, "at least one path, directory or glob")
        _require(len(self.val) > 0, "data.val", self.val, "at least one path, directory or glob")
        _require(bool(self.label), "data.label", self.label, "a column name")
        _require(len(self.sparse) > 0, "data.sparse", self.sparse, "at least one categorical column")
        cols = [self.label, *self.dense, *self.sparse, *self.weighted.values()]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        _require(not dup, "data.dense/data.sparse/data.weighted", dup, "each column named once (duplicates found)")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 0 (rows)")
        _require(self.num_workers >= -1, "data.num_workers", self.num_workers, "an integer >= 0, or -1 (auto)")
        _require(self.prefetch >= 0, "data.prefetch", self.prefetch, "an integer >= 0 (row groups)")
        _require(self.dense_transform in DENSE_TRANSFORMS, "data.dense_transform", self.dense_transform,
                 f"one of {', '.join(DENSE_TRANSFORMS)}")
        for key, names in (("data.multi_hot", self.multi_hot), ("data.weighted", list(self.weighted)),
                           ("data.shared_tables", list(self.shared_tables)), ("data.pooling", list(self.pooling))):
            unknown = [c for c in names if c not in self.sparse]
            _require(not unknown, key, unknown, f"names of sparse columns ({', '.join(self.sparse)})")
        for col, table in self.shared_tables.items():
            _require(bool(table), f"data.shared_tables.{col}", table, "a table name")
        for col, mode in self.pooling.items():
            _require(mode in POOLINGS, f"data.pooling.{col}", mode, f"one of {', '.join(POOLINGS)}")
            _require(
                not (mode == "mean" and col in self.weighted),
                f"data.pooling.{col}", mode,
                "sum for a weighted feature (FBGEMM's CPU kernel computes wrong gradients for weighted mean pooling)",
            )
        _require(self.num_embeddings >= 2, "data.num_embeddings", self.num_embeddings, "an integer >= 2")
        if self.num_embeddings_per_feature:
            n = len(self.num_embeddings_per_feature)
            _require(
                n == len(self.sparse),
                "data.num_embeddings_per_feature",
                self.num_embeddings_per_feature,
                f"one size per sparse column ({len(self.sparse)} values, got {n})",
            )
            _require(
                all(v >= 2 for v in self.num_embeddings_per_feature),
                "data.num_embeddings_per_feature",
                self.num_embeddings_per_feature,
                "sizes >= 2",
            )
        # torchrec pools per table and a table has one size: features sharing one must agree.
        sizes = self.table_sizes()
        tables: dict[str, list[str]] = {}
        for col in self.sparse:
            tables.setdefault(self.shared_tables.get(col, col), []).append(col)
        for table, group in tables.items():
            for what, per_col in (
                ("size", sizes),
                ("pooling", {c: self.pooling.get(c, "sum") for c in group}),
                ("weighting (data.weighted)", {c: c in self.weighted for c in group}),
            ):
                values = {c: per_col[c] for c in group}
                _require(
                    len(set(values.values())) == 1,
                    "data.shared_tables",
                    self.shared_tables,
                    f"one {what} per shared table; table {table!r} has {values}",
                )

    def table_sizes(self) -> dict[str, int]:
        """Rows of each sparse column's table, in ``sparse`` order."""
        sizes = self.num_embeddings_per_feature or [self.num_embeddings] * len(self.sparse)
        return dict(zip(self.sparse, sizes))


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    """D: size of each field vector shared by the FM term and the MLP."""
    mlp: list[int] = field(default_factory=lambda: [400, 400, 400])
    """Hidden widths of the deep tower (its input is the F*D concatenated field vectors);
    ``none`` on the command line (``[]`` in TOML) for a tower without hidden layers."""
    activation: str = "relu"
    """Hidden activation of the deep tower: relu, gelu, silu or tanh."""
    batch_norm: bool = True
    """BatchNorm1d after each hidden linear layer (before the activation)."""
    dropout: float = 0.0
    """Dropout probability after each hidden activation (0 disables it)."""
    init_std: float = 0.01
    """Std of the normal initialisation of embedding vectors (first-order weights start at 0)."""
    linear_kernel: str = "auto"
    """The MLP's Linear layers on CPU: auto or onednn (oneDNN's AVX-512 kernels where PyTorch
    has them; on AMD CPUs MKL runs its AVX2 code), or torch (nn.Linear, i.e. MKL). GPU tensors always use nn.Linear. Same parameters either way."""

    def __post_init__(self) -> None:
        _require(self.linear_kernel in LINEAR_KERNELS, "model.linear_kernel", self.linear_kernel,
                 f"one of {', '.join(LINEAR_KERNELS)}")
        _require(1 <= self.embedding_dim <= 1024, "model.embedding_dim", self.embedding_dim, "an integer in [1, 1024]")
        _require(all(w >= 1 for w in self.mlp), "model.mlp", self.mlp, "positive layer widths, e.g. 400,400,400")
        _require(self.activation in ACTIVATIONS, "model.activation", self.activation, f"one of {', '.join(ACTIVATIONS)}")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        _require(self.init_std > 0, "model.init_std", self.init_std, "a positive float")


@dataclass
class ShardingConfig:
    type: str = "auto"
    """Sharding of every table: auto (the planner chooses) or one of table_wise, row_wise,
    column_wise, table_row_wise, table_column_wise, data_parallel."""
    tables: dict[str, str] = field(default_factory=dict)
    """Per-column override of ``type``, e.g. ``{C1 = "row_wise"}``."""
    host_memory_gb: float = 0.0
    """CPU ranks: host memory budget per rank for the planner (0: available RAM / local ranks);
    the planner leaves 15% of it (and of each GPU's memory) for everything but the tables."""
    hbm_gb: float = 0.0
    """GPU ranks: GPU memory per rank the planner may plan with (0: the device's own), e.g. to
    leave room for something else on the GPU; the 15% reserve is taken off it too."""
    hardware: str = "auto"
    """GPU ranks: the planner's memory bandwidths and links (``deepfm-plan --hardware``): a100-80g,
    h100-80g, h200-141g, or auto (recognised from the GPU's name; TorchRec's defaults for any
    other GPU). Capacities are read from the device."""
    allow_uvm_caching: bool = False
    """GPU ranks: let the planner keep a table in host memory with a cache of its rows in HBM
    (TorchRec's ``fused_uvm_caching`` kernel) when the tables outgrow the GPUs' memory. No
    effect on CPU ranks."""
    cache_load_factor: float = 0.2
    """With ``allow_uvm_caching``: the fraction of a cached table's rows held in HBM."""
    comm_precision: str = "fp32"
    """Precision of the embedding all-to-all (TorchRec quantized comms): fp32, fp16 or bf16."""
    intra_node_comm: str = "auto"
    """CPU ranks on one node: ``auto`` sends DDP's dense-gradient all-reduce through shared memory
    (a DDP communication hook, distributed/ddp_hook.py) when every rank is a CPU rank on this node
    (x86-64) with room in /dev/shm, and uses gloo otherwise; ``shm`` insists on shared memory (an
    error where it cannot be had); ``gloo`` keeps gloo for everything. The sharded model, its
    checkpoints and its embedding all-to-alls stay on the stock group (gloo; NCCL on GPUs) unless
    ``shm_all_to_all`` is set."""
    shm_buffer_mb: float = 32.0
    """With shared-memory comms: MiB one rank can send in one operation; two such buffers per
    rank are reserved in /dev/shm (auto falls back to gloo, with a message, when /dev/shm is
    too small, as in containers with the 64 MiB default). A larger operation goes through gloo
    on every rank."""
    shm_all_to_all: bool = False
    """Opt-in, off by default: also the embedding all-to-alls through shared memory. DMP is then
    handed a process group of our own (backend ``deepfm_shm``, distributed/shm.py) in place of
    gloo, which torch and TorchRec do not know by name (checkpoints load through views of the
    sharded tensors on the default group). Needs shared memory (``intra_node_comm`` auto or shm)."""
    shm_fused_pooled: bool = True
    """With ``shm_all_to_all``: the pooled-embedding all-to-all (table- and column-wise sharding)
    moves the rows straight between the lookup output, shared memory and the MLP's input
    (distributed/pooled_shm.py; same values). This replaces TorchRec's ``alltoall_pooled`` by
    name; start-up checks that it is the function this was written for. false: TorchRec's own
    path over the same shared memory."""

    def __post_init__(self) -> None:
        allowed = ("auto", *SHARDING_TYPES)
        _require(self.type in allowed, "sharding.type", self.type, f"one of {', '.join(allowed)}")
        for name, kind in self.tables.items():
            _require(kind in allowed, f"sharding.tables.{name}", kind, f"one of {', '.join(allowed)}")
        _require(self.host_memory_gb >= 0, "sharding.host_memory_gb", self.host_memory_gb, "a float >= 0")
        _require(self.hbm_gb >= 0, "sharding.hbm_gb", self.hbm_gb, "a float >= 0")
        _require(self.hardware in HARDWARE_NAMES, "sharding.hardware", self.hardware, f"one of {', '.join(HARDWARE_NAMES)}")
        _require(0 < self.cache_load_factor <= 1, "sharding.cache_load_factor", self.cache_load_factor,
                 "a fraction in (0, 1]")
        _require(
            self.comm_precision in COMM_PRECISIONS,
            "sharding.comm_precision", self.comm_precision, f"one of {', '.join(COMM_PRECISIONS)}",
        )
        _require(
            self.intra_node_comm in INTRA_NODE_COMMS,
            "sharding.intra_node_comm", self.intra_node_comm, f"one of {', '.join(INTRA_NODE_COMMS)}",
        )
        _require(self.shm_buffer_mb > 0, "sharding.shm_buffer_mb", self.shm_buffer_mb, "a positive number of MiB")
        _require(not (self.shm_all_to_all and self.intra_node_comm == "gloo"), "sharding.shm_all_to_all",
                 self.shm_all_to_all, "false with sharding.intra_node_comm=gloo (it needs shared memory)")


@dataclass
class OptimizerConfig:
    embedding: str = "rowwise_adagrad"
    """Fused embedding optimizer (applied inside the backward kernel): sgd, adagrad,
    rowwise_adagrad (CPU and GPU); adam, partial_rowwise_adam (GPU only)."""
    embedding_lr: float = 0.02
    """Learning rate of the embedding tables. 0.02 (with row-wise Adagrad and batch norm) did best
    on average over genuine Criteo rows, the planted set and Criteo-shaped data, at global
    batches from 128 to 4096 (benchmarks/quality_cpu-2core_202612.md); 0.05 lost on all three."""
    embedding_eps: float = 1e-8
    """Epsilon of (row-wise) Adagrad / Adam for the tables."""
    embedding_weight_decay: float = 0.0
    """L2 regularisation of the table rows touched in a step (added to their gradient). GPU only:
    FBGEMM's CPU kernels ignore it, so CPU runs refuse a value above 0."""
    dense: str = "adam"
    """Optimizer of the dense parameters (MLP, dense-feature embeddings, bias): adam, adagrad, sgd."""
    dense_lr: float = 1e-3
    """Learning rate of the dense parameters."""
    weight_decay: float = 0.0
    """L2 weight decay of the dense parameters."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps (both tables and dense)."""
    decay: str = "none"
    """Learning-rate decay after warm-up: none, step (x decay_gamma every decay_steps),
    linear or cosine (to min_lr_ratio over decay_steps; 0: until the last step)."""
    decay_steps: int = 0
    """Period of step decay, or length of linear/cosine decay (0: the rest of the run)."""
    decay_gamma: float = 0.5
    """Factor applied every decay_steps by step decay."""
    min_lr_ratio: float = 0.0
    """Final learning rate of linear/cosine decay, as a fraction of the base rate."""
    batch_scaling: str = "none"
    """How both learning rates follow the global batch B (train.batch_size x world size): none (the
    rates as given at any B), sqrt (x sqrt(B / reference_batch): the square-root rule of adaptive
    optimizers such as Adam and Adagrad) or linear (x B / reference_batch). The run logs the rates
    it uses. none is the default because, with row-wise Adagrad tables and Adam, the best rates did
    not move with B between 128 and 4096, and the sqrt rule lost at 128
    (benchmarks/quality_cpu-2core_202612.md); larger batches are not measured."""
    reference_batch: int = 4096
    """The global batch at which ``embedding_lr`` and ``dense_lr`` are given, for ``batch_scaling``."""

    def __post_init__(self) -> None:
        _require(self.embedding in EMBEDDING_OPTIMIZERS, "optimizer.embedding", self.embedding, f"one of {', '.join(EMBEDDING_OPTIMIZERS)}")
        _require(self.dense in DENSE_OPTIMIZERS, "optimizer.dense", self.dense, f"one of {', '.join(DENSE_OPTIMIZERS)}")
        for key, lr in (("optimizer.embedding_lr", self.embedding_lr), ("optimizer.dense_lr", self.dense_lr)):
            # fp32 holds the rate inside the kernels and optimizers: 1e38 overflowed deep in torch.
            _require(math.isfinite(lr) and 0 < lr <= MAX_LR, key, lr, f"a positive float <= {MAX_LR:g}")
        _require(self.embedding_eps > 0, "optimizer.embedding_eps", self.embedding_eps, "a positive float")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a float >= 0")
        _require(self.embedding_weight_decay >= 0, "optimizer.embedding_weight_decay", self.embedding_weight_decay, "a float >= 0")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.decay in LR_DECAYS, "optimizer.decay", self.decay, f"one of {', '.join(LR_DECAYS)}")
        _require(self.decay_steps >= 0, "optimizer.decay_steps", self.decay_steps, "an integer >= 0")
        _require(
            self.decay != "step" or self.decay_steps > 0,
            "optimizer.decay_steps", self.decay_steps, "a positive period when optimizer.decay='step'",
        )
        _require(0 < self.decay_gamma <= 1, "optimizer.decay_gamma", self.decay_gamma, "a factor in (0, 1]")
        _require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")
        _require(self.batch_scaling in BATCH_SCALINGS, "optimizer.batch_scaling", self.batch_scaling,
                 f"one of {', '.join(BATCH_SCALINGS)}")
        _require(self.reference_batch >= 1, "optimizer.reference_batch", self.reference_batch, "a positive integer")


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training data."""
    batch_size: int = 2048
    """Per-rank batch size; the global batch is batch_size * world_size."""
    global_batch_size: int = 0
    """The global batch instead (0: unset): each rank then takes global_batch_size / world_size
    rows (it must divide), replacing ``batch_size``, whatever the number of ranks; the run
    records the per-rank size it used. Published settings (e.g. FuxiCTR's batch_size) are global."""
    val_batch_size: int = 0
    """Per-rank validation batch size (0: same as batch_size)."""
    max_steps: int = 0
    """Stop after this many steps in total (0: no cap)."""
    log_every: int = 20
    """Print loss and throughput every N steps (each print is a host sync)."""
    eval_every: int = 0
    """Also validate every N steps (0: only at the end of each epoch)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations in a row without improving ``checkpoint.best_metric``
    (0: never); the best checkpoint is kept and named at the end."""
    seed: int = 0
    """Seed of the model initialisation; the same seed gives the same model at any world size."""
    device: str = "auto"
    """auto (CUDA with NCCL when GPUs are visible, else CPU with gloo), cpu or cuda."""
    threads: int = 0
    """Intra-op threads per rank on CPU (0: cores / local ranks)."""
    pin_cpus: bool = True
    """CPU ranks: pin each local rank to its own ``threads`` cores (when they fit), so that one
    rank's gloo and loader threads do not run on another rank's core. Turn off on nodes that
    several jobs share without cgroup CPU sets (they would pin to the same cores)."""
    huge_pages: bool = True
    """CPU ranks: keep the embedding tables and their fused optimizer state on 2 MiB transparent
    huge pages (``deepfm_dist/hugepages.py``): random row lookups and updates then miss the TLB
    far less. Needs Linux THP set to ``madvise`` or ``always`` (it is ignored where unavailable)."""
    progress: bool = True
    """tqdm progress bar on rank 0 when attached to a terminal; plain lines otherwise."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <run_dir>/tb (rank 0)."""
    pipeline: bool = True
    """TrainPipelineSparseDist: the next batch's input all-to-all overlaps this step's compute.
    false: a plain forward/backward/step loop (same numbers, no overlap)."""
    grad_clip: float = 0.0
    """Clip the global L2 norm of the dense gradients to this value (0: no clipping)."""
    precision: str = "auto"
    """Dense compute precision. auto: bf16 where it is native (GPUs from Ampere on, CPUs with
    AVX512-BF16 or AMX: Zen 4/5, Sapphire Rapids and later), else fp32; the run records what it
    chose (summary.json's config, the first log line). bf16: autocast of the forward's dense
    compute (MLP matmuls in bf16 with fp32 accumulation; weights, optimizer state, embeddings,
    FM term and loss stay fp32); where bf16 is not native the run stops at start-up naming this
    key, since it would be slower than fp32. fp32: no autocast. auto is the default because
    bf16's validation AUC, logloss, NE and calibration stayed within the spread of 3 seeds
    (``python -m benchmarks precision``; figures in the benchmark reports)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "a positive integer")
        _require(self.global_batch_size >= 0, "train.global_batch_size", self.global_batch_size,
                 "an integer >= 0 (0: use train.batch_size per rank)")
        _require(self.val_batch_size >= 0, "train.val_batch_size", self.val_batch_size, "an integer >= 0")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "an integer >= 0")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "a positive integer")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "an integer >= 0")
        _require(self.early_stop_patience >= 0, "train.early_stop_patience", self.early_stop_patience,
                 "an integer >= 0 (evaluations)")
        _require(self.device in DEVICES, "train.device", self.device, f"one of {', '.join(DEVICES)}")
        _require(self.threads >= 0, "train.threads", self.threads, "an integer >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a float >= 0 (0 disables clipping)")
        _require(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go (default: <run_dir>/checkpoints)."""
    every_steps: int = 0
    """Save every N steps (0: only by time and at the end)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (checked on log steps)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""
    at_end: bool = True
    """Save when training finishes."""
    best_metric: str = "auc"
    """Keep the best checkpoint by this validation metric: auc (higher is better), logloss or ne
    (lower is better); each evaluation that improves on it saves a checkpoint, which pruning never
    deletes, and ``best.json`` in the checkpoint folder names it. deepfm-predict, deepfm-export and
    ``--init_from`` given the folder take the best; ``--resume`` takes the latest. "none": off."""

    def __post_init__(self) -> None:
        _require(self.best_metric in BEST_METRICS, "checkpoint.best_metric", self.best_metric,
                 f"one of {', '.join(BEST_METRICS)}")
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "an integer >= 0")
        _require(self.every_minutes >= 0, "checkpoint.every_minutes", self.every_minutes, "a number >= 0")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = "runs/default"
    """Where summary.json, plan.json and (by default) checkpoints go."""
    resume: bool = False
    """Continue from the latest complete checkpoint in checkpoint.dir (--resume); start fresh
    when there is none."""
    init_from: str = ""
    """Warm start (--init_from=PATH): a new run (step 0, its own data and schedule) from the model
    weights of a checkpoint, or of a checkpoint folder's best (else latest) one; resharded to this
    run's plan like a resume. The tables must have the names and widths of this config's. A
    ``--resume`` that finds a checkpoint of this run wins over it."""
    init_optimizer: bool = False
    """With ``init_from``: also load the fused and dense optimizers' state."""

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir", self.run_dir, "a directory path")
        _require(not self.init_optimizer or bool(self.init_from), "init_optimizer", self.init_optimizer,
                 "false unless init_from names a checkpoint")
        _require(not self.train.early_stop_patience or self.checkpoint.best_metric != "none",
                 "train.early_stop_patience", self.train.early_stop_patience,
                 "0 when checkpoint.best_metric is none (it counts evaluations without improving that metric)")
        names = [*self.data.sparse, *sorted(set(self.data.shared_tables.values()))]
        unknown = sorted(set(self.sharding.tables) - set(names))
        _require(not unknown, "sharding.tables", unknown, f"names of sparse columns or shared tables ({', '.join(names)})")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "sharding": ShardingConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}
TOP_LEVEL = ("run_dir", "resume", "init_from", "init_optimizer")
FLAGS = ("resume", "init_optimizer")
"""Top-level booleans that may be given without a value (``--resume``)."""


def default_config_path() -> str:
    """The embedded default preset (``deepfm_dist/configs/default.toml``)."""
    return os.path.join(os.path.dirname(__file__), "configs", "default.toml")


# ---------------------------------------------------------------------------------------------
# Parsing values by type


def _parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")


def _coerce(key: str, tp: Any, raw: Any) -> Any:
    """Turn ``raw`` (a TOML value or a command-line string) into a value of type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return _parse_bool(key, raw)
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}={raw!r}: expected a string")
        return raw
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(raw, str) and key == "model.mlp" and raw.strip().lower() == "none":
            items = []  # no hidden layers, asked for explicitly
        elif isinstance(raw, str):
            items = [s.strip() for s in raw.split(",") if s.strip()]
            if not items and key == "model.mlp":
                raise ConfigError(f"{key}={raw!r}: empty; give the hidden widths (e.g. 400,400,400), or 'none' "
                                  f"for a deep tower without hidden layers")
        elif isinstance(raw, list):
            items = raw
        else:
            raise ConfigError(f"{key}={raw!r}: expected a list (comma-separated on the command line)")
        return [_coerce(key, item_tp, item) for item in items]
    if origin is dict:
        if isinstance(raw, dict):
            return {str(k): _coerce(f"{key}.{k}", str, v) for k, v in raw.items()}
        if isinstance(raw, str):
            out: dict[str, str] = {}
            for pair in (p.strip() for p in raw.split(",") if p.strip()):
                name, sep, value = pair.partition(":")
                if not sep or not name or not value:
                    raise ConfigError(f"{key}={raw!r}: expected name:value pairs, e.g. C1:row_wise,C2:table_wise")
                out[name.strip()] = value.strip()
            return out
        raise ConfigError(f"{key}={raw!r}: expected a table of name = value")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not user input


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    types = _field_types(cls)
    kwargs = {}
    for key, raw in values.items():
        if key not in types:
            raise ConfigError(f"unknown key {name}.{key}; {name} has: {', '.join(types)}")
        kwargs[key] = _coerce(f"{name}.{key}", types[key], raw)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k in SECTIONS else v
    return out


def preset_names() -> list[str]:
    """The presets shipped in ``deepfm_dist/configs`` (``--config NAME``)."""
    folder = os.path.dirname(default_config_path())
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".toml"))


def resolve_config_path(path: str) -> str:
    """``--config``: a TOML file, or the name of a shipped preset (``criteo_1tb``)."""
    if not os.path.exists(path) and os.sep not in path and not path.endswith(".toml"):
        if path in preset_names():
            return os.path.join(os.path.dirname(default_config_path()), f"{path}.toml")
        raise ConfigError(f"--config={path!r}: no such file, nor a preset ({', '.join(preset_names())})")
    return path


def read_toml(path: str) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config={path!r}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config={path!r}: not valid TOML ({e})") from None


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config PATH`` and ``--section.key=value`` / ``--section.key value`` arguments.

    Returns the config path (or None) and a nested dict of raw string overrides.
    """
    config_path: str | None = None
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: expected --section.key=value or --config PATH")
        name, sep, value = arg[2:].partition("=")
        if not sep and name in FLAGS and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            value, sep = "true", "="
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"--{name}: missing value")
            value = args[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_path = value
            continue
        section, dot, key = name.partition(".")
        if not dot:
            if section not in TOP_LEVEL:
                raise ConfigError(
                    f"unknown option --{name}; expected --config, --run_dir or --SECTION.KEY with SECTION in "
                    f"{', '.join(SECTIONS)}"
                )
            tree[section] = value
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section in --{name}; sections are {', '.join(SECTIONS)}")
        if section == "sharding" and key.startswith("tables."):
            tree.setdefault(section, {}).setdefault("tables", {})[key.split(".", 1)[1]] = value
            continue
        tree.setdefault(section, {})[key] = value
    return config_path, tree


def build_config(tree: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (TOML layout)."""
    for name, value in tree.items():
        if name not in SECTIONS and name not in TOP_LEVEL:
            raise ConfigError(f"unknown config section or key {name!r}; expected {', '.join([*SECTIONS, *TOP_LEVEL])}")
        if name in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a table [{name}]")
    sections = {name: _build_section(name, cls, tree.get(name, {})) for name, cls in SECTIONS.items()}
    run_dir = _coerce("run_dir", str, tree.get("run_dir", Config.run_dir))
    resume = _coerce("resume", bool, tree.get("resume", False))
    init_from = _coerce("init_from", str, tree.get("init_from", ""))
    init_optimizer = _coerce("init_optimizer", bool, tree.get("init_optimizer", False))
    return Config(**sections, run_dir=run_dir, resume=resume, init_from=init_from, init_optimizer=init_optimizer)


def load_config(argv: list[str]) -> Config:
    """``--config FILE`` (default: the embedded preset) plus ``--section.key=value`` overrides."""
    path, overrides = parse_overrides(argv)
    base = read_toml(path or default_config_path())
    return build_config(_merge(base, overrides))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")  # a bug in this module: config values are the above


def to_toml(cfg: Config) -> str:
    """The whole configuration as a TOML file that ``--config`` reads back to an equal Config
    (every key written, so it does not depend on the defaults of a later version)."""
    tree = cfg.to_dict()
    lines = [f"{k} = {_toml_value(tree[k])}" for k in TOP_LEVEL]
    for name in SECTIONS:
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in tree[name].items()]
    return "\n".join(lines) + "\n"
