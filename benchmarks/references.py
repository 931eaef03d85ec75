"""Reference models for ``bench quality``: a hashed logistic regression, and DeepCTR-Torch's DeepFM.

Both read the same Parquet rows as our runs (the columns of a :class:`DataConfig`), train in this
process for the same epochs and global batch, and are scored on the validation rows by the same
functions as our runs (``deepfm_dist.metrics``), so the figures compare like with like.

- ``hashed_lr``: logit = b + sum over sparse columns of w_c[row] + sum over dense columns of
  u_j x_j, with our id hashing (``data.hash_seed``, the config's table sizes; row 0 for nulls) and
  our dense transform; per-coordinate Adagrad, the usual optimizer of sparse logistic regression.
- ``deepctr_deepfm``: ``deepctr_torch.models.DeepFM`` (the DeepCTR-Torch package: the quality
  benchmark's extra, ``launcher/setup.sh`` installs it in the project's venv, and training never
  imports it). Embedding size and MLP as our config; everything else at DeepCTR-Torch's
  documented defaults: init std 1e-4, L2 1e-5 on embeddings and linear weights, no batch norm, no
  dropout, ``compile("adam")`` (torch Adam, lr 1e-3, for every parameter). Inputs as in its Criteo
  example (examples/run_classification_criteo.py): a vocabulary fitted on the training rows
  (nulls are one more value; a value not seen in training takes index 0), dense columns with
  nulls as 0 scaled by a MinMaxScaler fitted on the training rows.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from deepfm_dist import metrics
from deepfm_dist.config import DataConfig
from deepfm_dist.data.columns import _array, _raw_ids, _valid, _values
from deepfm_dist.data.hashing import hash_ids


class Rows:
    """Single-valued Criteo-style rows in memory.

    labels ``[N]`` float32; dense ``[N, F_dense]`` float64 with NaN at nulls; raw ``[N, F_sparse]``
    int64 ids (string values hashed to int64 as the loader does) with ``valid`` ``[N, F_sparse]``
    bool, False at nulls.
    """

    def __init__(self, paths: list[str], cfg: DataConfig):
        files = []
        for p in paths:
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet")) if os.path.isdir(p) \
                else [p]
        if not files:
            raise ValueError(f"{', '.join(paths)}: no Parquet files")
        table = pa.concat_tables(pq.read_table(f, columns=[cfg.label, *cfg.dense, *cfg.sparse]) for f in files)
        n = table.num_rows
        self.labels = _values(_array(table, cfg.label)).astype(np.float32)
        self.dense = np.full((n, len(cfg.dense)), np.nan)
        for j, name in enumerate(cfg.dense):
            arr = _array(table, name)
            x, valid = _values(arr).astype(np.float64), _valid(arr)
            self.dense[:, j] = x if valid is None else np.where(valid, x, np.nan)
        self.raw = np.empty((n, len(cfg.sparse)), dtype=np.int64)
        self.valid = np.ones((n, len(cfg.sparse)), dtype=bool)
        for j, name in enumerate(cfg.sparse):
            arr = _array(table, name)
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                raise ValueError(f"column {name}: the reference models take single-valued columns, not lists")
            raw, valid = _raw_ids(arr)
            self.raw[:, j] = raw
            if valid is not None:
                self.valid[:, j] = valid

    def __len__(self) -> int:
        return len(self.labels)


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """val AUC, logloss, NE and calibration, by the functions our runs use."""
    lg, lb = torch.from_numpy(logits.astype(np.float64)), torch.from_numpy(labels.astype(np.float64))
    return {"val_auc": metrics.exact_auc(lg, lb), "val_logloss": metrics.logloss(lg, lb),
            "val_ne": metrics.normalized_entropy(lg, lb), "val_calibration": metrics.calibration(lg, lb)}


def hashed_lr(train: Rows, val: Rows, cfg: DataConfig, seed: int, batch_size: int, epochs: int,
              lr: float) -> dict[str, Any]:
    """Train and score the hashed logistic regression (module docstring)."""
    torch.manual_seed(seed)
    sizes = list(cfg.table_sizes().values())
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def features(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.empty_like(rows.raw)
        for j, size in enumerate(sizes):
            ids[:, j] = hash_ids(rows.raw[:, j], rows.valid[:, j], size, salt=cfg.hash_seed) + offsets[j]
        x = np.nan_to_num(rows.dense, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.dense_transform == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        return torch.from_numpy(ids), torch.from_numpy(x.astype(np.float32))

    weights = torch.nn.Embedding(int(sum(sizes)), 1, sparse=True)
    torch.nn.init.zeros_(weights.weight)
    dense = torch.nn.Linear(len(cfg.dense), 1)
    torch.nn.init.zeros_(dense.weight)
    torch.nn.init.zeros_(dense.bias)
    opt = torch.optim.Adagrad([*weights.parameters(), *dense.parameters()], lr=lr)

    def forward(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return weights(ids).sum(dim=(1, 2)) + dense(x).squeeze(1)

    ids, x = features(train)
    y = torch.from_numpy(train.labels)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), batch_size):
            b = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(forward(ids[b], x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    vids, vx = features(val)
    with torch.no_grad():
        logits = forward(vids, vx).numpy()
    return {**scores(logits, val.labels), "train_seconds": seconds}


def deepctr_available() -> str | None:
    """None when DeepCTR-Torch imports, else why not."""
    try:
        import deepctr_torch  # noqa: F401
    except ImportError as e:
        return f"DeepCTR-Torch is not installed ({e}); launcher/setup.sh installs it"
    return None


def deepctr_deepfm(train: Rows, val: Rows, cfg: DataConfig, seed: int, batch_size: int, epochs: int,
                   embedding_dim: int, mlp: list[int]) -> dict[str, Any]:
    """Train and score DeepCTR-Torch's DeepFM (module docstring)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM

    x_train: dict[str, np.ndarray] = {}
    x_val: dict[str, np.ndarray] = {}
    columns = []
    for j, name in enumerate(cfg.sparse):
        # The vocabulary of the training rows: index 0 for values never seen there, nulls a value.
        key_tr = np.where(train.valid[:, j], train.raw[:, j], np.iinfo(np.int64).min)
        key_va = np.where(val.valid[:, j], val.raw[:, j], np.iinfo(np.int64).min)
        vocab, idx = np.unique(key_tr, return_inverse=True)
        x_train[name] = (idx + 1).astype(np.int64)
        pos = np.searchsorted(vocab, key_va).clip(0, len(vocab) - 1)
        x_val[name] = np.where(vocab[pos] == key_va, pos + 1, 0).astype(np.int64)
        columns.append(SparseFeat(name, vocabulary_size=len(vocab) + 1, embedding_dim=embedding_dim))
    for j, name in enumerate(cfg.dense):
        tr = np.nan_to_num(train.dense[:, j], nan=0.0)
        va = np.nan_to_num(val.dense[:, j], nan=0.0)
        lo, hi = tr.min(), tr.max()
        span = hi - lo if hi > lo else 1.0  # sklearn's MinMaxScaler: a constant column scales by 1
        x_train[name], x_val[name] = ((tr - lo) / span).astype(np.float32), ((va - lo) / span).astype(np.float32)
        columns.append(DenseFeat(name, 1))
    torch.manual_seed(seed)
    model = DeepFM(columns, columns, dnn_hidden_units=tuple(mlp), task="binary", device="cpu", seed=seed)
    model.compile("adam", "binary_crossentropy")
    t0 = time.perf_counter()
    model.fit(x_train, train.labels, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True)
    seconds = time.perf_counter() - t0
    p = model.predict(x_val, batch_size=4096).reshape(-1).astype(np.float64)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return {**scores(np.log(p) - np.log1p(-p), val.labels), "train_seconds": seconds}
