"""The sharded 2-rank model against a plain single-process model on the same global batches.

With identical initial weights (world-size-independent init), SGD for tables and dense layers,
and no batch norm (its statistics are per rank under DDP), the two must produce the same loss
at every step and the same weights after training, for every sharding type.
"""

from __future__ import annotations

import re

import pytest
import torch
from torchrec import KeyedJaggedTensor

from deepfm_dist.data.batch import Batch

from deepfm_dist.config import Config, DataConfig, ModelConfig, OptimizerConfig, ShardingConfig, TrainConfig
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.data.schema import feature_specs
from deepfm_dist.model import DeepFM, init_table_block, table_dim
from tests.distributed_helpers import launch

FEATURES = ["C1", "C2", "C3", "C4"]
SIZES = [50, 30, 101, 9]
DENSE = ["I1", "I2", "I3"]
DIM = 7  # table rows are 8 wide: two column-wise shards of 4
BATCH = 16  # per rank
STEPS = 4
LR = 0.1


# The "rich" schema: C1 and C2 share one table, C3 carries per-id weights, C4 mean-pools.
RICH = dict(shared_tables={"C1": "shared", "C2": "shared"}, weighted={"C3": "W3"}, pooling={"C4": "mean"},
            multi_hot=["C1", "C2", "C3", "C4"])
RICH_SIZES = [50, 50, 101, 9]


def make_config(sharding_type: str, rich: bool = False) -> Config:
    extra = RICH if rich else {}
    return Config(
        data=DataConfig(
            train=["unused"], val=["unused"], dense=DENSE, sparse=FEATURES,
            num_embeddings_per_feature=RICH_SIZES if rich else SIZES, **extra,
        ),
        model=ModelConfig(embedding_dim=DIM, mlp=[16, 8], batch_norm=False, dropout=0.0, init_std=0.1),
        sharding=ShardingConfig(type=sharding_type),
        optimizer=OptimizerConfig(embedding="sgd", embedding_lr=LR, dense="sgd", dense_lr=LR),
        train=TrainConfig(batch_size=BATCH, seed=7, device="cpu", threads=1),
    )


def _kjt(keys, per_key_lengths, per_key_values, per_key_weights=None) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(per_key_values),
        lengths=torch.cat(per_key_lengths),
        weights=torch.cat(per_key_weights) if per_key_weights is not None else None,
    )


def global_batch(step: int, rows: int, rich: bool = False) -> Batch:
    """A deterministic batch with multi-hot rows and empty bags, so pooling is exercised.
    ``rich``: C3 is weighted and travels in its own KJT with per-id weights."""
    g = torch.Generator().manual_seed(1000 + step)
    dense = torch.rand(rows, len(DENSE), generator=g) * 3
    sizes = RICH_SIZES if rich else SIZES
    lengths = {f: torch.randint(0, 3, (rows,), generator=g) for f in FEATURES}
    values = {f: torch.randint(0, size, (int(lengths[f].sum()),), generator=g) for f, size in zip(FEATURES, sizes)}
    weights = {f: torch.rand(int(lengths[f].sum()), generator=g) * 2 for f in FEATURES}
    labels = torch.randint(0, 2, (rows,), generator=g).float()
    weighted_keys = ["C3"] if rich else []
    plain = [f for f in FEATURES if f not in weighted_keys]
    return Batch(
        dense_features=dense,
        sparse_features=_kjt(plain, [lengths[f] for f in plain], [values[f] for f in plain]),
        labels=labels,
        weighted_features=(
            _kjt(weighted_keys, [lengths[f] for f in weighted_keys], [values[f] for f in weighted_keys],
                 [weights[f] for f in weighted_keys])
            if weighted_keys else None
        ),
    )


def _slice_kjt(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    per_key = kjt.to_dict()
    keys = kjt.keys()
    w = kjt.weights_or_none()
    lengths, values, weights = [], [], []
    for k in keys:
        jt = per_key[k]
        offsets = jt.offsets()
        lengths.append(jt.lengths()[start:stop])
        values.append(jt.values()[offsets[start] : offsets[stop]])
        if w is not None:
            weights.append(jt.weights()[offsets[start] : offsets[stop]])
    return _kjt(keys, lengths, values, weights if w is not None else None)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(
        dense_features=batch.dense_features[start:stop],
        sparse_features=_slice_kjt(batch.sparse_features, start, stop),
        labels=batch.labels[start:stop],
        weighted_features=(
            _slice_kjt(batch.weighted_features, start, stop) if batch.weighted_features is not None else None
        ),
    )


_TABLE = re.compile(r"embedding_bags\.([^.]+)\.weight$")


def rank_worker(sharding_type: str, rich: bool = False, comm: str = "auto") -> dict:
    """Runs on each rank: shard, train STEPS steps on this rank's half of each global batch."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from deepfm_dist.distributed import shm
    from deepfm_dist.distributed.env import destroy, init_distributed
    from deepfm_dist.distributed.sharding import embedding_kernel_tensors, shard_model
    from deepfm_dist.optim import build_optimizers
    from deepfm_dist.logs import quiet_library_noise
    from deepfm_dist.step import build_model

    quiet_library_noise()
    cfg = make_config(sharding_type, rich)
    cfg.sharding.intra_node_comm = "auto" if comm == "shm_all_to_all" else comm
    cfg.sharding.shm_all_to_all = comm == "shm_all_to_all"
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    model, plan, _ = shard_model(build_model(cfg), cfg, env)
    shm_group = shm.groups_created > 0
    optimizer = build_optimizers(model, cfg.optimizer).combined
    losses = []
    for step in range(STEPS):
        batch = slice_batch(global_batch(step, BATCH * env.world_size, rich), env.rank * BATCH, (env.rank + 1) * BATCH)
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / env.world_size)
    tables, dense = {}, {}
    # train.huge_pages targets the kernels' tensors: their storages must hold every table shard.
    kernel_storages = {t.untyped_storage().data_ptr() for t in embedding_kernel_tensors(model)}
    uncovered = []
    for key, value in model.state_dict().items():
        m = _TABLE.search(key)
        if m:
            local = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
            uncovered += [key for t in local if t.numel() and t.untyped_storage().data_ptr() not in kernel_storages]
            if isinstance(value, ShardedTensor):
                tables[m.group(1)] = [(s.metadata.shard_offsets, s.tensor.clone()) for s in value.local_shards()]
            else:
                tables[m.group(1)] = [([0, 0], value.clone())]
        elif "sparse_fields" not in key:
            dense[key.split("model.", 1)[1]] = value.clone()
    kinds = {t: ps.sharding_type for mp in plan.plan.values() for t, ps in mp.items()}
    from deepfm_dist.distributed import ddp_hook, pooled_shm

    fused_pooled = pooled_shm.calls
    destroy()
    return {"losses": losses, "tables": tables, "dense": dense, "kinds": kinds, "shm_group": shm_group,
            "hook_buckets": ddp_hook.buckets_reduced, "uncovered": uncovered, "fused_pooled": fused_pooled}


def reference(cfg: Config, rich: bool = False) -> tuple[list[float], dict, dict]:
    """The plain single-process model: full global batches, torch SGD on every parameter."""
    torch.manual_seed(cfg.train.seed)
    model = DeepFM(
        features=feature_specs(cfg.data),
        num_dense=len(DENSE),
        embedding_dim=DIM,
        mlp=cfg.model.mlp,
        batch_norm=False,
        init_std=cfg.model.init_std,
        table_device="cpu",
    )
    with torch.no_grad():
        for name, w in _reference_tables(model).items():
            w.copy_(
                init_table_block(
                    seed=cfg.train.seed, table=name, vector_dim=DIM, table_dim=table_dim(DIM),
                    rows=(0, w.shape[0]), cols=(0, table_dim(DIM)), std=cfg.model.init_std,
                )
            )
    train = DeepFMTrain(model)
    opt = torch.optim.SGD(train.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss, _ = train(global_batch(step, 2 * BATCH, rich))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tables = {name: w.detach() for name, w in _reference_tables(model).items()}
    dense = {k: v.detach() for k, v in model.state_dict().items() if "sparse_fields" not in k}
    return losses, tables, dense


def _reference_tables(model: DeepFM) -> dict[str, torch.Tensor]:
    out = {}
    for ebc in (model.sparse_fields.ebc, model.sparse_fields.weighted_ebc):
        if ebc is not None:
            out.update({name: bag.weight for name, bag in ebc.embedding_bags.items()})
    return out


@pytest.mark.parametrize(
    "sharding_type, rich, comm",
    [("table_wise", False, "auto"), ("column_wise", False, "auto"), ("row_wise", False, "auto"),
     ("table_row_wise", False, "auto"), ("table_column_wise", False, "auto"), ("data_parallel", False, "auto"),
     ("table_wise", True, "auto"), ("row_wise", True, "auto"),
     # auto: gloo, with DDP's all-reduce through shared memory on this x86-64 node; gloo for
     # everything, and the opt-in shared-memory all-to-alls, must match as well.
     ("table_wise", False, "gloo"), ("row_wise", True, "gloo"),
     ("table_wise", False, "shm_all_to_all"), ("column_wise", False, "shm_all_to_all")],
)
def test_two_ranks_match_single_process(sharding_type, rich, comm):
    from deepfm_dist.distributed import shm

    results = launch(rank_worker, (sharding_type, rich, comm), nproc=2)
    # Shared memory where it can be had: x86-64 and room in /dev/shm for both ranks' segments.
    # By default only DDP's all-reduce (a comm hook) uses it; the sharded model keeps gloo.
    room = shm.supported() and shm.room_on_every_rank(Config().sharding.shm_buffer_mb, local_world_size=2)[0]
    for r in (0, 1):
        assert results[r]["shm_group"] == (comm == "shm_all_to_all" and room)
        hooked = comm == "auto" and room
        assert (results[r]["hook_buckets"] >= STEPS) == hooked, results[r]["hook_buckets"]
    ref_losses, ref_tables, ref_dense = reference(make_config(sharding_type, rich), rich)
    if rich:
        assert set(ref_tables) == {"t_shared", "t_C3", "t_C4"}

    assert set(results[0]["kinds"].values()) == {sharding_type}
    assert results[0]["uncovered"] == results[1]["uncovered"] == []
    # On shared memory, table- and column-wise pooled all-to-alls take the fused exchange
    # (distributed/pooled_shm.py): the comparison below then checks its values and gradients.
    if results[0]["shm_group"] and sharding_type in ("table_wise", "column_wise"):
        assert results[0]["fused_pooled"] >= STEPS and results[1]["fused_pooled"] >= STEPS
    if not results[0]["shm_group"]:
        assert results[0]["fused_pooled"] == results[1]["fused_pooled"] == 0
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["losses"], ref_losses, rtol=1e-5, atol=1e-6)
    for name, ref in ref_tables.items():  # the comparison is not vacuous: every table moved
        rows, cols = ref.shape
        init = init_table_block(seed=7, table=name, vector_dim=DIM, table_dim=cols, rows=(0, rows), cols=(0, cols), std=0.1)
        assert (ref - init).abs().max() > 1e-3, f"table {name} did not train"

    # Reassemble every table from both ranks' shards and compare with the reference.
    for name, ref in ref_tables.items():
        full = torch.full_like(ref, float("nan"))
        for rank in (0, 1):
            for (r0, c0), shard in results[rank]["tables"].get(name, []):
                full[r0 : r0 + shard.shape[0], c0 : c0 + shard.shape[1]] = shard
        torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6, msg=f"table {name}")
    for key, ref in ref_dense.items():
        for rank in (0, 1):
            torch.testing.assert_close(results[rank]["dense"][key], ref, rtol=1e-5, atol=1e-6, msg=key)
