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

The MLP's first layer never sees the dense fields themselves: ``W_i (x_i e_i) = x_i (W_i e_i)``,
so it multiplies the dense values by Nd folded columns instead of Nd * D (``DeepTower``).
"""

import re

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType

from deepfm_dist.data.schema import FeatureSpec
from deepfm_dist.model.fields import field_interactions
from deepfm_dist.model.linear import linear_class, linear_with_weight

# fx.wrap patches the name in the globals of the module that calls it: this module calls
# field_interactions, so the pipeline's fx trace records it as one call instead of tracing into it.
torch.fx.wrap("field_interactions")

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def table_dim(embedding_dim: int) -> int:
    """Width of a table row: D vector columns + 1 first-order column, rounded up to 4."""
    return (embedding_dim + 1 + 3) // 4 * 4


TABLE_WEIGHT_KEY = re.compile(r"embedding_bags\.([^.]+)\.weight$")
"""A table's weight in a parameter or state-dict name (whatever wraps the module); group 1 is
its ``table_name``."""


def table_name(table: str) -> str:
    """The EmbeddingBagConfig name of a table (``FeatureSpec.table``)."""
    return f"t_{table}"


def one_hot_features(names: list[str], sizes: dict[str, int]) -> list[FeatureSpec]:
    """Specs of plain categorical columns: one id per row, own table, sum pooling."""
    return [FeatureSpec(n, n, sizes[n], "sum", weighted=False, multi_hot=False) for n in names]


class DeepTower(nn.Module):
    """MLP: [Linear -> BatchNorm? -> activation -> Dropout?] per width, then Linear(., 1).

    ``linear_kernel`` picks the Linear implementation (``model.linear_kernel``; the parameters
    and state-dict keys are those of nn.Linear either way).

    Args shapes: x [B, F*D] -> [B].
    """

    def __init__(
        self, in_features: int, widths: list[int], activation: str, batch_norm: bool, dropout: float,
        linear_kernel: str = "auto",
    ):
        super().__init__()
        linear = linear_class(linear_kernel)
        layers: list[nn.Module] = []
        prev = in_features
        for width in widths:
            layers.append(linear(prev, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            # ReLU in place: neither BatchNorm's nor the Linear's backward reads the tensor it
            # overwrites, and one [B, width] tensor fewer per layer means less memory traffic.
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else _ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        layers.append(linear(prev, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, dense_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in_features] -> [B]; or, with ``dense_vectors`` e [Nd, D], x = [dense values
        x_1..x_Nd | the other fields flat] [B, Nd + in_features - Nd * D], standing for the
        input [x_1 e_1 | ... | x_Nd e_Nd | the other fields].

        The second form folds the dense fields into the first layer: W [x_i e_i] = x_i (W_i e_i)
        with W_i the first layer's [H, D] block of field i, so it multiplies Nd columns
        ``U = [W_1 e_1 .. W_Nd e_Nd]`` instead of Nd * D (with Criteo's 13 dense fields at D = 16,
        a 429-wide first layer instead of 624: a third fewer FLOPs there). Same parameters,
        same function (to rounding); the gradients reach W and e through U by autograd.
        """
        if dense_vectors is None:
            return self.layers(x).squeeze(-1)
        first = self.layers[0]
        num_dense, dim = dense_vectors.shape
        weight = first.weight  # [H, in_features]
        folded = (weight[:, : num_dense * dim].view(-1, num_dense, dim) * dense_vectors).sum(dim=-1)  # [H, Nd]
        weight = torch.cat([folded, weight[:, num_dense * dim:]], dim=1)  # [H, Nd + in_features - Nd * D]
        return self.layers[1:](linear_with_weight(first, x, weight)).squeeze(-1)


class DenseFields(nn.Module):
    """Numeric columns as field vectors and first-order terms.

    x [B, Nd] -> (fields [B, Nd, D], first_order [B]). DeepFM passes the parameters to
    ``field_interactions`` (the same math, fused); ``forward`` is the plain form.
    """

    def __init__(self, num_dense: int, embedding_dim: int, init_std: float):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_dense, embedding_dim) * init_std)
        self.weights = nn.Parameter(torch.zeros(num_dense))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.unsqueeze(-1) * self.vectors, x @ self.weights


def _table_configs(features: list[FeatureSpec], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table, listing the features that look it up."""
    by_table: dict[str, list[FeatureSpec]] = {}
    for f in features:
        by_table.setdefault(f.table, []).append(f)
    configs = []
    for table, group in by_table.items():
        for attr in ("num_embeddings", "pooling", "weighted"):
            values = {f.name: getattr(f, attr) for f in group}
            if len(set(values.values())) != 1:
                raise ValueError(f"features sharing table {table!r} disagree on {attr}: {values}")
        configs.append(
            EmbeddingBagConfig(
                name=table_name(table),
                embedding_dim=table_dim(embedding_dim),
                num_embeddings=group[0].num_embeddings,
                feature_names=[f.name for f in group],
                pooling=PoolingType.MEAN if group[0].pooling == "mean" else PoolingType.SUM,
            )
        )
    return configs


class SparseFields(nn.Module):
    """Categorical columns -> their pooled table rows (field vectors and first-order weights).

    One EmbeddingBagCollection for unweighted features and, if any feature carries per-id
    weights, a second (``is_weighted``) one reading its own KeyedJaggedTensor. Multi-hot
    features pool their ids (sum or mean) into one row, so every feature is one field. Shared
    tables serve several features (one field each).

    (sparse KJT, weighted KJT or None) -> [KeyedTensor of [B, K * W] rows] per collection.
    """

    def __init__(self, features: list[FeatureSpec], embedding_dim: int, device: torch.device):
        super().__init__()
        self.features = [f.name for f in features]
        self.embedding_dim = embedding_dim
        plain = [f for f in features if not f.weighted]
        weighted = [f for f in features if f.weighted]
        self.ebc = EmbeddingBagCollection(tables=_table_configs(plain, embedding_dim), device=device) if plain else None
        self.weighted_ebc = (
            EmbeddingBagCollection(tables=_table_configs(weighted, embedding_dim), is_weighted=True, device=device)
            if weighted
            else None
        )

    def forward(self, sparse: KeyedJaggedTensor, weighted: KeyedJaggedTensor | None = None) -> list[KeyedTensor]:
        """-> the pooled rows, one KeyedTensor per collection (plain, then weighted); after
        sharding their keys come out grouped by shard, not in config order
        (``field_interactions`` selects by name)."""
        if self.weighted_ebc is not None and weighted is None:
            raise ValueError("the model has weighted features but the batch carries no weighted_features")
        pooled = []
        if self.ebc is not None:
            pooled.append(self.ebc(sparse))
        if self.weighted_ebc is not None:
            pooled.append(self.weighted_ebc(weighted))
        return pooled


class DeepFM(nn.Module):
    """DeepFM logits from dense features and a KeyedJaggedTensor of categorical ids.

    Args:
        features: the categorical features (KJT keys, in field order) with their tables,
            pooling and weighting (``deepfm_dist.data.feature_specs``; ``one_hot_features``
            for plain columns).
        num_dense: Nd, number of dense columns (may be 0).
        embedding_dim: D.
        mlp: hidden widths of the deep tower.
        linear_kernel: the MLP's Linear implementation (``model.linear_kernel``).
        table_device: where the tables are created; ``meta`` lets DMP materialise only the
            shards each rank owns.
    Shapes: forward(dense [B, Nd], sparse KJT with B rows, weighted KJT or None) -> logits [B].
    """

    def __init__(
        self,
        *,
        features: list[FeatureSpec],
        num_dense: int,
        embedding_dim: int,
        mlp: list[int],
        activation: str = "relu",
        batch_norm: bool = True,
        dropout: float = 0.0,
        init_std: float = 0.01,
        linear_kernel: str = "auto",
        table_device: torch.device | str = "meta",
    ):
        super().__init__()
        num_fields = num_dense + len(features)
        # Dense modules are built before the tables so that the RNG stream (seeded by the
        # caller) gives them the same values whether the tables are on `meta` or not.
        self.dense_fields = DenseFields(num_dense, embedding_dim, init_std) if num_dense else None
        self.deep = DeepTower(num_fields * embedding_dim, mlp, activation, batch_norm, dropout, linear_kernel)
        self.bias = nn.Parameter(torch.zeros(1))
        self.sparse_fields = SparseFields(features, embedding_dim, torch.device(table_device))

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, weighted: KeyedJaggedTensor | None = None
    ) -> torch.Tensor:
        pooled = self.sparse_fields(sparse, weighted)
        dense_args, vectors = (), None
        if self.dense_fields is not None:
            vectors = self.dense_fields.vectors
            dense_args = (dense, vectors, self.dense_fields.weights)
        # Indexed, not unpacked: under the pipeline's fx trace the result is one proxy, which
        # cannot be iterated.
        out = field_interactions(pooled, self.sparse_fields.features, self.sparse_fields.embedding_dim, *dense_args)
        # out[0]: [B, Nd + Ns * D] = [x | sparse fields], the MLP input with the dense fields
        # folded into the first layer; out[1]: [B] first order + FM second order.
        return self.bias + out[1] + self.deep(out[0], vectors)
