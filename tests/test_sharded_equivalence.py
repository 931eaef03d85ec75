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
from torchrec.datasets.utils import Batch

from deepfm_dist.config import Config, DataConfig, ModelConfig, OptimizerConfig, ShardingConfig, TrainConfig
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.model import DeepFM, init_table_block, table_dim
from tests.distributed_helpers import launch

FEATURES = ["C1", "C2", "C3", "C4"]
SIZES = [50, 30, 101, 9]
DENSE = ["I1", "I2", "I3"]
DIM = 7  # table rows are 8 wide: two column-wise shards of 4
BATCH = 16  # per rank
STEPS = 4
LR = 0.1


def make_config(sharding_type: str) -> Config:
    return Config(
        data=DataConfig(
            train=["unused"], val=["unused"], dense=DENSE, sparse=FEATURES, num_embeddings_per_feature=SIZES
        ),
        model=ModelConfig(embedding_dim=DIM, mlp=[16, 8], batch_norm=False, dropout=0.0, init_std=0.1),
        sharding=ShardingConfig(type=sharding_type),
        optimizer=OptimizerConfig(embedding="sgd", embedding_lr=LR, dense="sgd", dense_lr=LR),
        train=TrainConfig(batch_size=BATCH, seed=7, device="cpu", threads=1),
    )


def global_batch(step: int, rows: int) -> Batch:
    """A deterministic batch with multi-hot rows and empty bags, so pooling is exercised."""
    g = torch.Generator().manual_seed(1000 + step)
    dense = torch.rand(rows, len(DENSE), generator=g) * 3
    lengths = torch.randint(0, 3, (len(FEATURES), rows), generator=g)
    values = torch.cat(
        [torch.randint(0, size, (int(lengths[i].sum()),), generator=g) for i, size in enumerate(SIZES)]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths.flatten())
    labels = torch.randint(0, 2, (rows,), generator=g).float()
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    rows = batch.labels.numel()
    lengths = batch.sparse_features.lengths().view(len(FEATURES), rows)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)]).view(-1)
    values = []
    for f in range(len(FEATURES)):
        base = f * rows
        values.append(batch.sparse_features.values()[offsets[base + start] : offsets[base + stop]])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat(values), lengths=lengths[:, start:stop].flatten()
    )
    return Batch(batch.dense_features[start:stop], kjt, batch.labels[start:stop])


_TABLE = re.compile(r"embedding_bags\.([^.]+)\.weight$")


def rank_worker(sharding_type: str) -> dict:
    """Runs on each rank: shard, train STEPS steps on this rank's half of each global batch."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from deepfm_dist.distributed.env import destroy, init_distributed
    from deepfm_dist.distributed.sharding import shard_model
    from deepfm_dist.optim import build_optimizers
    from deepfm_dist.trainer import build_model, quiet_library_noise

    quiet_library_noise()
    cfg = make_config(sharding_type)
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    model, plan = shard_model(build_model(cfg), cfg, env)
    optimizer = build_optimizers(model, cfg.optimizer).combined
    losses = []
    for step in range(STEPS):
        batch = slice_batch(global_batch(step, BATCH * env.world_size), env.rank * BATCH, (env.rank + 1) * BATCH)
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / env.world_size)
    tables, dense = {}, {}
    for key, value in model.state_dict().items():
        m = _TABLE.search(key)
        if m:
            if isinstance(value, ShardedTensor):
                tables[m.group(1)] = [(s.metadata.shard_offsets, s.tensor.clone()) for s in value.local_shards()]
            else:
                tables[m.group(1)] = [([0, 0], value.clone())]
        elif "sparse_fields" not in key:
            dense[key.split("model.", 1)[1]] = value.clone()
    kinds = {t: ps.sharding_type for mp in plan.plan.values() for t, ps in mp.items()}
    destroy()
    return {"losses": losses, "tables": tables, "dense": dense, "kinds": kinds}


def reference(cfg: Config) -> tuple[list[float], dict, dict]:
    """The plain single-process model: full global batches, torch SGD on every parameter."""
    torch.manual_seed(cfg.train.seed)
    model = DeepFM(
        sparse_features=FEATURES,
        table_sizes=dict(zip(FEATURES, SIZES)),
        num_dense=len(DENSE),
        embedding_dim=DIM,
        mlp=cfg.model.mlp,
        batch_norm=False,
        init_std=cfg.model.init_std,
        table_device="cpu",
    )
    with torch.no_grad():
        for f, rows in zip(FEATURES, SIZES):
            w = model.sparse_fields.ebc.embedding_bags[f"t_{f}"].weight
            w.copy_(
                init_table_block(
                    seed=cfg.train.seed, table=f"t_{f}", vector_dim=DIM, table_dim=table_dim(DIM),
                    rows=(0, rows), cols=(0, table_dim(DIM)), std=cfg.model.init_std,
                )
            )
    train = DeepFMTrain(model)
    opt = torch.optim.SGD(train.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss, _ = train(global_batch(step, 2 * BATCH))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tables = {name: bag.weight.detach() for name, bag in model.sparse_fields.ebc.embedding_bags.items()}
    dense = {k: v.detach() for k, v in model.state_dict().items() if "sparse_fields" not in k}
    return losses, tables, dense


@pytest.mark.parametrize(
    "sharding_type", ["table_wise", "column_wise", "row_wise", "table_row_wise", "table_column_wise", "data_parallel"]
)
def test_two_ranks_match_single_process(sharding_type):
    results = launch(rank_worker, (sharding_type,), nproc=2)
    ref_losses, ref_tables, ref_dense = reference(make_config(sharding_type))

    assert set(results[0]["kinds"].values()) == {sharding_type}
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["losses"], ref_losses, rtol=1e-5, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the model did not learn: the comparison would be vacuous"

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
