"""DeepFM (Guo et al. 2017) over TorchRec embedding tables.

    logit = bias + first_order + FM(fields) + MLP(concat(fields))

Fields (F = Nd + Ns, each a D-vector shared by the FM term and the MLP):
  * one per categorical column: the row of that column's table, looked up in an
    ``EmbeddingBagCollection`` (sum pooling; sharded by DMP outside this module);
  * one per dense column: ``x_i * e_i`` with a learned vector ``e_i`` (the numeric-field
    embedding of FuxiCTR/AutoInt), where x_i is the transformed value (log1p, see the data
    module). Dense fields thus interact with every other field in the FM term.

First-order term: sum over categorical fields of a per-id weight plus ``w . x`` over dense
columns. The per-id weight is stored as an extra column of the same table row (as HugeCTR
does), so one lookup and one all-to-all serve both orders: a table row is
``[v (D) | w (1) | padding]``, padded to a multiple of 4 because FBGEMM's fused kernel rejects
other widths. With D = 4k + 3 there is no padding; with D = 16 the rows are 20 wide.
"""

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from deepfm_dist.model.fm import fm_second_order

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def table_dim(embedding_dim: int) -> int:
    """Width of a table row: D vector columns + 1 first-order column, rounded up to 4."""
    return (embedding_dim + 1 + 3) // 4 * 4


def table_name(feature: str) -> str:
    return f"t_{feature}"


class DeepTower(nn.Module):
    """MLP: [Linear -> BatchNorm? -> activation -> Dropout?] per width, then Linear(., 1).

    Args shapes: x [B, F*D] -> [B].
    """

    def __init__(self, in_features: int, widths: list[int], activation: str, batch_norm: bool, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in widths:
            layers.append(nn.Linear(prev, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class DenseFields(nn.Module):
    """Numeric columns as field vectors and first-order terms.

    x [B, Nd] -> (fields [B, Nd, D], first_order [B]).
    """

    def __init__(self, num_dense: int, embedding_dim: int, init_std: float):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_dense, embedding_dim) * init_std)
        self.weights = nn.Parameter(torch.zeros(num_dense))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.unsqueeze(-1) * self.vectors, x @ self.weights


class SparseFields(nn.Module):
    """Categorical columns -> field vectors and first-order weights via one EBC lookup.

    sparse KJT (keys = features) -> (fields [B, Ns, D], first_order [B]).
    """

    def __init__(self, features: list[str], table_sizes: dict[str, int], embedding_dim: int, device: torch.device):
        super().__init__()
        self.features = list(features)
        self.embedding_dim = embedding_dim
        tables = [
            EmbeddingBagConfig(
                name=table_name(f),
                embedding_dim=table_dim(embedding_dim),
                num_embeddings=table_sizes[f],
                feature_names=[f],
                pooling=PoolingType.SUM,
            )
            for f in self.features
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)

    def forward(self, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        # After sharding the pooled keys come out grouped by shard, not in config order:
        # always select by name.
        pooled = self.ebc(sparse).to_dict()
        rows = torch.stack([pooled[f] for f in self.features], dim=1)  # [B, Ns, table_dim]
        d = self.embedding_dim
        return rows[:, :, :d], rows[:, :, d].sum(dim=1)


class DeepFM(nn.Module):
    """DeepFM logits from dense features and a KeyedJaggedTensor of categorical ids.

    Args:
        sparse_features: categorical feature names (KJT keys), one table each.
        table_sizes: rows per feature's table.
        num_dense: Nd, number of dense columns (may be 0).
        embedding_dim: D.
        mlp: hidden widths of the deep tower.
        table_device: where the tables are created; ``meta`` lets DMP materialise only the
            shards each rank owns.
    Shapes: forward(dense [B, Nd], sparse KJT with B rows) -> logits [B].
    """

    def __init__(
        self,
        *,
        sparse_features: list[str],
        table_sizes: dict[str, int],
        num_dense: int,
        embedding_dim: int,
        mlp: list[int],
        activation: str = "relu",
        batch_norm: bool = True,
        dropout: float = 0.0,
        init_std: float = 0.01,
        table_device: torch.device | str = "meta",
    ):
        super().__init__()
        num_fields = num_dense + len(sparse_features)
        # Dense modules are built before the tables so that the RNG stream (seeded by the
        # caller) gives them the same values whether the tables are on `meta` or not.
        self.dense_fields = DenseFields(num_dense, embedding_dim, init_std) if num_dense else None
        self.deep = DeepTower(num_fields * embedding_dim, mlp, activation, batch_norm, dropout)
        self.bias = nn.Parameter(torch.zeros(1))
        self.sparse_fields = SparseFields(sparse_features, table_sizes, embedding_dim, torch.device(table_device))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, first_order = self.sparse_fields(sparse)
        if self.dense_fields is not None:
            dense_fields, dense_first = self.dense_fields(dense)
            fields = torch.cat([dense_fields, fields], dim=1)  # [B, F, D]
            first_order = first_order + dense_first
        deep = self.deep(fields.flatten(1))
        return self.bias + first_order + fm_second_order(fields) + deep
