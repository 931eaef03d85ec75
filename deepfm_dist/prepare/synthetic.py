"""Synthetic Criteo-schema data with a planted ground-truth model.

Writes Parquet files with Criteo's schema (``label``, ``I1..I13``, ``C1..C26``) whose labels
are drawn from a known model, so a training run can be judged against the best possible
score: ``oracle.json`` holds the AUC / log loss of the TRUE click probabilities on the
validation rows. A DeepFM that trains correctly approaches those numbers; one that does
not learn stays near AUC 0.5. See ``data/README.md`` for the schema and model.

The planted model, per row (nulls contribute 0 everywhere):

    logit = bias
          + sum_f   w_f[rank_f]                            first order, per (field, rank)
          + sum_f<g <v_f[rank_f], v_g[rank_g]>             FM pairwise, latent_dim-dim vectors
          + sum_d   beta_d * log1p(max(I_d, 0))            dense, on the reader's transform
    label ~ Bernoulli(sigmoid(logit))

``rank_f`` is the Zipf rank of the row's id in sparse field f (0 = most frequent); the raw
value written to ``C{f+1}`` is a 32-bit hash of that rank, as in Criteo. Weights decay
with rank, so the signal sits on the frequent ids, which a model sees often enough to
learn. Each term is rescaled so its standard deviation over rows is the requested
``*_std``, and ``bias`` is solved for so the mean click probability is ``ctr``.

Everything is derived from ``seed`` (numpy Generators keyed by seed, split, file and
chunk), so the same arguments give byte-identical data on the same numpy version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deepfm_dist import cli
from deepfm_dist.data.hashing import splitmix64
from deepfm_dist.metrics import exact_auc

DEFAULT_MAX_CARDINALITY = 100_000
MIN_DEFAULT_CARDINALITY = 4
CHUNK_ROWS = 64 * 1024
"""Rows generated at a time: memory stays bounded (~50 MB) whatever the data set size."""
CALIBRATION_ROWS = 50_000
"""Rows drawn (not written) to rescale the logit terms and solve for the bias."""
I2_NEGATIVE_RATE = 0.05
"""Share of non-null I2 values replaced by -1, -2 or -3 (real Criteo I2 has negatives)."""
ORACLE_FILE = "oracle.json"
SPLITS = ("train", "val")
_SPLIT_TAG = {"calibration": 1, "train": 2, "val": 3}  # params use tag 0


def dense_names(num_dense: int) -> list[str]:
    return [f"I{i + 1}" for i in range(num_dense)]


def sparse_names(num_sparse: int) -> list[str]:
    return [f"C{i + 1}" for i in range(num_sparse)]


def default_cardinalities(
    num_sparse: int = 26, max_cardinality: int = DEFAULT_MAX_CARDINALITY
) -> list[int]:
    """Log-spaced cardinalities from ~4 to ``max_cardinality``, like Criteo's spread.

    The sizes are put in a fixed shuffled order (independent of the seed, so a config's
    table sizes depend only on ``max_cardinality``) so small and large columns interleave
    as in the real data.
    """
    if max_cardinality < 1:
        raise ValueError(f"max_cardinality must be >= 1, got {max_cardinality}")
    low = min(MIN_DEFAULT_CARDINALITY, max_cardinality)
    sizes = np.round(np.geomspace(low, max_cardinality, num=num_sparse)).astype(np.int64)
    order = np.argsort(splitmix64(np.arange(num_sparse, dtype=np.uint64)), kind="stable")
    return [int(s) for s in sizes[order]]


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log) of probabilities ``[N]`` vs labels ``[N]``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _PlantedModel:
    """The ground truth: how ids/values are drawn and how they make the click logit."""

    zipf_cdfs: list[np.ndarray]
    """Per sparse field, ``[card_f]`` cumulative probabilities of ranks 0..card_f-1."""
    sparse_null_rates: np.ndarray
    """``[F_sparse]`` probability that the field is null in a row."""
    salts: np.ndarray
    """``[F_sparse]`` uint64 per-field salt of the raw-value hash."""
    first_order: list[np.ndarray]
    """Per sparse field, ``[card_f]`` first-order logit weight of each rank."""
    latent: list[np.ndarray]
    """Per sparse field, ``[card_f, latent_dim]`` FM latent vector of each rank."""
    dense_mu: np.ndarray
    """``[F_dense]`` log-normal location of each dense column's counts."""
    dense_sigma: np.ndarray
    """``[F_dense]`` log-normal scale of each dense column's counts."""
    dense_null_rates: np.ndarray
    """``[F_dense]`` probability that the column is null in a row."""
    dense_weight: np.ndarray
    """``[F_dense]`` logit weight of ``log1p(max(x, 0))``."""
    bias: float = 0.0


def _draw_model(
    rng: np.random.Generator,
    *,
    num_dense: int,
    cardinalities: list[int],
    zipf_a: float,
    latent_dim: int,
    signal_rank_scale: float,
) -> _PlantedModel:
    """Draws the planted model's raw parameters (rescaled later by ``_calibrate``)."""
    num_sparse = len(cardinalities)
    zipf_cdfs, first_order, latent = [], [], []
    field_importance = np.exp(0.5 * rng.standard_normal(num_sparse))
    latent_importance = np.exp(0.3 * rng.standard_normal(num_sparse))
    for f, card in enumerate(cardinalities):
        ranks = np.arange(card, dtype=np.float64)
        pmf = (ranks + 1.0) ** -zipf_a
        cdf = np.cumsum(pmf)
        zipf_cdfs.append(cdf / cdf[-1])
        # Signal concentrated on frequent ranks: rare ids are seen too seldom to learn.
        decay = 1.0 / np.sqrt(1.0 + ranks / signal_rank_scale)
        first_order.append(field_importance[f] * decay * rng.standard_normal(card))
        latent.append(
            latent_importance[f] * decay[:, None] * rng.standard_normal((card, latent_dim))
        )
    return _PlantedModel(
        zipf_cdfs=zipf_cdfs,
        sparse_null_rates=rng.uniform(0.0, 0.30, size=num_sparse),
        salts=rng.integers(0, 2**63, size=num_sparse, dtype=np.int64).astype(np.uint64),
        first_order=first_order,
        latent=latent,
        dense_mu=rng.uniform(-0.5, 4.0, size=num_dense),
        dense_sigma=rng.uniform(0.5, 1.5, size=num_dense),
        dense_null_rates=rng.uniform(0.0, 0.45, size=num_dense),
        dense_weight=rng.standard_normal(num_dense),
    )


def _draw_rows(
    model: _PlantedModel, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws ``n`` rows' features (no labels yet).

    Returns:
        ranks: int64 ``[n, F_sparse]``, -1 where null.
        dense: int64 ``[n, F_dense]`` raw counts (meaningless where null).
        dense_valid: bool ``[n, F_dense]``.
    """
    num_sparse, num_dense = len(model.zipf_cdfs), len(model.dense_mu)
    ranks = np.empty((n, num_sparse), dtype=np.int64)
    for f, cdf in enumerate(model.zipf_cdfs):
        # Inverse-CDF sampling of the truncated Zipf; min() guards float round-off at 1.0.
        r = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), cdf.size - 1)
        r[rng.random(n) < model.sparse_null_rates[f]] = -1
        ranks[:, f] = r
    dense = np.empty((n, num_dense), dtype=np.int64)
    dense_valid = np.empty((n, num_dense), dtype=bool)
    for d in range(num_dense):
        z = rng.standard_normal(n)
        x = np.floor(np.exp(model.dense_mu[d] + model.dense_sigma[d] * z))
        dense[:, d] = np.minimum(x, 2.0**40).astype(np.int64)
        if d == 1:  # I2: occasional small negative values, as in real Criteo
            neg = rng.random(n) < I2_NEGATIVE_RATE
            dense[neg, d] = -rng.integers(1, 4, size=int(neg.sum()))
        dense_valid[:, d] = rng.random(n) >= model.dense_null_rates[d]
    return ranks, dense, dense_valid


def _logit_terms(
    model: _PlantedModel, ranks: np.ndarray, dense: np.ndarray, dense_valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three logit terms ``[n]`` each: first order, FM pairwise, dense (no bias)."""
    n = ranks.shape[0]
    first = np.zeros(n)
    latent_dim = model.latent[0].shape[1] if model.latent else 0
    latent_sum = np.zeros((n, latent_dim))
    latent_sq = np.zeros(n)
    for f in range(ranks.shape[1]):
        valid = ranks[:, f] >= 0
        r = np.where(valid, ranks[:, f], 0)
        first += np.where(valid, model.first_order[f][r], 0.0)
        v = model.latent[f][r] * valid[:, None]
        latent_sum += v
        latent_sq += np.einsum("nk,nk->n", v, v)
    # sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2
    pairwise = 0.5 * (np.einsum("nk,nk->n", latent_sum, latent_sum) - latent_sq)
    transformed = np.where(dense_valid, np.log1p(np.maximum(dense, 0)), 0.0)
    return first, pairwise, transformed @ model.dense_weight


def _calibrate(
    model: _PlantedModel,
    rng: np.random.Generator,
    *,
    first_order_std: float,
    pairwise_std: float,
    dense_std: float,
    ctr: float,
) -> None:
    """Rescales the terms to the requested std and solves the bias for the mean CTR."""
    ranks, dense, dense_valid = _draw_rows(model, rng, CALIBRATION_ROWS)
    first, pairwise, dense_term = _logit_terms(model, ranks, dense, dense_valid)
    # A term whose std is 0 (no such columns) is left alone rather than divided by 0.
    if first.std() > 0:
        scale = first_order_std / first.std()
        model.first_order = [w * scale for w in model.first_order]
        first = first * scale
    if pairwise.std() > 0:
        scale = pairwise_std / pairwise.std()
        # The pairwise term is quadratic in the latent vectors.
        model.latent = [v * np.sqrt(scale) for v in model.latent]
        pairwise = pairwise * scale
    if dense_term.std() > 0:
        scale = dense_std / dense_term.std()
        model.dense_weight = model.dense_weight * scale
        dense_term = dense_term * scale
    logit = first + pairwise + dense_term
    # mean(sigmoid(bias + logit)) increases with bias: bisection.
    low, high = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        if _sigmoid(mid + logit).mean() < ctr:
            low = mid
        else:
            high = mid
    model.bias = 0.5 * (low + high)


def _schema(num_dense: int, num_sparse: int) -> pa.Schema:
    fields = [pa.field("label", pa.int8(), nullable=False)]
    fields += [pa.field(name, pa.int64()) for name in dense_names(num_dense)]
    fields += [pa.field(name, pa.int64()) for name in sparse_names(num_sparse)]
    return pa.schema(fields)


def _chunk_table(
    model: _PlantedModel, rng: np.random.Generator, n: int, schema: pa.Schema
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Draws ``n`` labelled rows. Returns the table, labels ``[n]`` and true probs ``[n]``."""
    ranks, dense, dense_valid = _draw_rows(model, rng, n)
    first, pairwise, dense_term = _logit_terms(model, ranks, dense, dense_valid)
    prob = _sigmoid(model.bias + first + pairwise + dense_term)
    labels = (rng.random(n) < prob).astype(np.int8)
    # Criteo-like raw values: a 32-bit hash of the rank, distinct per field.
    raw = splitmix64(ranks.view(np.uint64) ^ model.salts[None, :]) & np.uint64(0xFFFFFFFF)
    raw = raw.astype(np.int64)
    columns = [pa.array(labels, pa.int8())]
    columns += [
        pa.array(dense[:, d], pa.int64(), mask=~dense_valid[:, d])
        for d in range(dense.shape[1])
    ]
    columns += [
        pa.array(raw[:, f], pa.int64(), mask=ranks[:, f] < 0) for f in range(ranks.shape[1])
    ]
    return pa.Table.from_arrays(columns, schema=schema), labels, prob


def _clean(out_dir: Path) -> None:
    """Removes a previous data set's marker and files (only the names this module writes)."""
    (out_dir / ORACLE_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        split_dir = out_dir / split
        if split_dir.is_dir():
            for path in [*split_dir.glob("part-*.parquet"), *split_dir.glob(".part-*.tmp")]:
                path.unlink()


def _write_split(
    model: _PlantedModel,
    out_dir: Path,
    split: str,
    rows: int,
    num_files: int,
    row_group_size: int,
    seed: int,
    schema: pa.Schema,
) -> dict:
    """Writes ``out_dir/split/part-*.parquet``; rows are spread evenly over the files.

    Returns:
        {"ctr": label mean, "logloss": of the true probabilities, "labels": int8 ``[rows]``,
        "probs": float32 ``[rows]``} (labels/probs only for "val", else None).
    """
    split_dir = out_dir / split
    split_dir.mkdir(exist_ok=True)
    # Chunks of whole row groups: each write_table call then writes full row groups only.
    chunk_rows = row_group_size * max(1, CHUNK_ROWS // row_group_size)
    keep = split == "val"  # val probabilities are kept for the exact oracle AUC
    positives, loss_sum, all_labels, all_probs = 0, 0.0, [], []
    for file_idx in range(num_files):
        file_rows = (file_idx + 1) * rows // num_files - file_idx * rows // num_files
        tmp = split_dir / f".part-{file_idx:05d}.tmp"
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for chunk_idx, chunk_start in enumerate(range(0, file_rows, chunk_rows)):
                n = min(chunk_rows, file_rows - chunk_start)
                # Keyed per chunk, so a chunk's rows do not depend on how many came before.
                rng = np.random.default_rng([seed, _SPLIT_TAG[split], file_idx, chunk_idx])
                table, labels, probs = _chunk_table(model, rng, n, schema)
                writer.write_table(table, row_group_size=row_group_size)
                positives += int(labels.sum())
                loss_sum += log_loss(labels, probs) * n
                if keep:
                    all_labels.append(labels)
                    all_probs.append(probs.astype(np.float32))
        # Readers only ever see complete files under the final name.
        os.replace(tmp, split_dir / f"part-{file_idx:05d}.parquet")
    return {
        "ctr": positives / rows,
        "logloss": loss_sum / rows,
        "labels": np.concatenate(all_labels) if keep else None,
        "probs": np.concatenate(all_probs) if keep else None,
    }


def generate(
    out_dir: str | os.PathLike,
    *,
    train_rows: int = 1_000_000,
    val_rows: int = 100_000,
    num_dense: int = 13,
    num_sparse: int = 26,
    cardinalities: list[int] | None = None,
    max_cardinality: int = DEFAULT_MAX_CARDINALITY,
    zipf_a: float = 1.2,
    files_per_split: tuple[int, int] = (4, 2),
    row_group_size: int = 64 * 1024,
    seed: int = 0,
    latent_dim: int = 4,
    first_order_std: float = 1.0,
    pairwise_std: float = 0.7,
    dense_std: float = 0.5,
    ctr: float = 0.25,
    signal_rank_scale: float = 32.0,
) -> dict:
    """Writes ``out_dir/{train,val}/part-*.parquet`` and ``out_dir/oracle.json``.

    Args:
        out_dir: output folder (created if needed; a previous data set there is replaced).
        train_rows, val_rows: rows per split.
        num_dense, num_sparse: columns ``I1..I{num_dense}`` and ``C1..C{num_sparse}``.
        cardinalities: distinct ids per sparse column; default ``default_cardinalities``.
        max_cardinality: largest default cardinality (ignored if ``cardinalities`` given).
        zipf_a: Zipf exponent of the id frequencies (P(rank k) ~ (k + 1)^-zipf_a).
        files_per_split: (train files, val files); rows are split evenly over them.
        row_group_size: rows per Parquet row group.
        seed: determines the planted model and every drawn value.
        latent_dim: size of the planted FM latent vectors.
        first_order_std, pairwise_std, dense_std: std over rows of each logit term;
            together they set how predictable the labels are (the oracle AUC).
        ctr: mean click probability (solved into the bias).
        signal_rank_scale: weights of rank k are scaled by 1/sqrt(1 + k / this), so the
            signal sits on the frequent ids.

    Returns:
        The oracle dict also written to ``oracle.json`` (written last: marks completion).
    """
    num_files = tuple(files_per_split)
    _check(train_rows >= 1, "train_rows", train_rows, "an integer >= 1")
    _check(val_rows >= 1, "val_rows", val_rows, "an integer >= 1")
    _check(num_dense >= 0, "num_dense", num_dense, "an integer >= 0")
    _check(num_sparse >= 0, "num_sparse", num_sparse, "an integer >= 0")
    _check(num_dense + num_sparse >= 1, "num_dense + num_sparse", num_dense + num_sparse, ">= 1")
    _check(len(num_files) == 2, "files_per_split", files_per_split, "(train files, val files)")
    _check(1 <= num_files[0] <= train_rows, "files_per_split[0]", num_files[0],
           f"in [1, train_rows={train_rows}]")
    _check(1 <= num_files[1] <= val_rows, "files_per_split[1]", num_files[1],
           f"in [1, val_rows={val_rows}]")
    _check(row_group_size >= 1, "row_group_size", row_group_size, "an integer >= 1")
    _check(zipf_a > 0, "zipf_a", zipf_a, "> 0")
    _check(latent_dim >= 1, "latent_dim", latent_dim, "an integer >= 1")
    _check(0 < ctr < 1, "ctr", ctr, "in (0, 1)")
    _check(signal_rank_scale > 0, "signal_rank_scale", signal_rank_scale, "> 0")
    for name, value in [("first_order_std", first_order_std), ("pairwise_std", pairwise_std),
                        ("dense_std", dense_std)]:
        _check(value >= 0, name, value, ">= 0")
    if cardinalities is None:
        cardinalities = default_cardinalities(num_sparse, max_cardinality)
    cardinalities = [int(c) for c in cardinalities]
    _check(len(cardinalities) == num_sparse, "cardinalities", f"{len(cardinalities)} values",
           f"one per sparse column ({num_sparse})")
    _check(all(c >= 1 for c in cardinalities), "cardinalities", cardinalities, "all >= 1")

    start = time.perf_counter()
    model = _draw_model(
        np.random.default_rng([seed, 0, 0, 0]),
        num_dense=num_dense,
        cardinalities=cardinalities,
        zipf_a=zipf_a,
        latent_dim=latent_dim,
        signal_rank_scale=signal_rank_scale,
    )
    _calibrate(
        model,
        np.random.default_rng([seed, _SPLIT_TAG["calibration"], 0, 0]),
        first_order_std=first_order_std,
        pairwise_std=pairwise_std,
        dense_std=dense_std,
        ctr=ctr,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean(out_dir)
    schema = _schema(num_dense, num_sparse)
    train = _write_split(model, out_dir, "train", train_rows, num_files[0], row_group_size,
                         seed, schema)
    val = _write_split(model, out_dir, "val", val_rows, num_files[1], row_group_size,
                       seed, schema)

    labels, probs = val["labels"], val["probs"]
    val_ctr = float(labels.mean())
    oracle = {
        "val_auc": exact_auc(torch.from_numpy(np.asarray(probs)), torch.from_numpy(np.asarray(labels))),
        "val_logloss": log_loss(labels, probs),
        # Log loss of always predicting the val CTR: what "learned nothing" scores.
        "val_constant_logloss": log_loss(labels, np.full(labels.size, val_ctr)),
        "train_logloss": train["logloss"],
        "train_rows": train_rows,
        "val_rows": val_rows,
        "ctr": train["ctr"],
        "val_ctr": val_ctr,
        "seed": seed,
        "label": "label",
        "dense": dense_names(num_dense),
        "sparse": sparse_names(num_sparse),
        "cardinalities": dict(zip(sparse_names(num_sparse), cardinalities)),
        "bias": model.bias,
        "generation_seconds": round(time.perf_counter() - start, 2),
        "generator_args": {
            "train_rows": train_rows,
            "val_rows": val_rows,
            "num_dense": num_dense,
            "num_sparse": num_sparse,
            "cardinalities": cardinalities,
            "max_cardinality": max_cardinality,
            "zipf_a": zipf_a,
            "files_per_split": list(num_files),
            "row_group_size": row_group_size,
            "seed": seed,
            "latent_dim": latent_dim,
            "first_order_std": first_order_std,
            "pairwise_std": pairwise_std,
            "dense_std": dense_std,
            "ctr": ctr,
            "signal_rank_scale": signal_rank_scale,
            "numpy_version": np.__version__,
        },
    }
    tmp = out_dir / f".{ORACLE_FILE}.tmp"
    tmp.write_text(json.dumps(oracle, indent=2) + "\n")
    os.replace(tmp, out_dir / ORACLE_FILE)
    return oracle


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"synthetic.generate: {name} must be {expected}, got {value!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _files_per_split(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or TRAIN,VAL, got {text!r}")
    values = tuple(_positive_int(p) for p in parts)
    return (values[0], values[-1])


@dataclass
class SyntheticOptions:
    out: str
    """Output folder, e.g. data/generated/synthetic."""
    train_rows: int = 1_000_000
    """Rows in train/."""
    val_rows: int = 100_000
    """Rows in val/."""
    files_per_split: tuple[int, int] = field(default=(4, 2), metadata={"parse": _files_per_split, "metavar": "N|TRAIN,VAL"})
    """Parquet files per split: N for both, or TRAIN,VAL."""
    row_group_size: int = 64 * 1024
    """Rows per Parquet row group."""
    max_cardinality: int = DEFAULT_MAX_CARDINALITY
    """Largest sparse-column cardinality."""
    seed: int = 0
    """Seed of the planted model and the rows."""
    force: bool = False
    """Regenerate even if --out already holds a complete data set."""

    def __post_init__(self) -> None:
        for flag, value in (("--train-rows", self.train_rows), ("--val-rows", self.val_rows),
                            ("--row-group-size", self.row_group_size), ("--max-cardinality", self.max_cardinality)):
            if value < 1:
                raise ValueError(f"argument {flag}: expected a positive integer, got {value}")
        train_files, val_files = self.files_per_split
        if train_files > self.train_rows or val_files > self.val_rows:
            raise ValueError(
                f"argument --files-per-split: {train_files},{val_files} files for --train-rows {self.train_rows} / "
                f"--val-rows {self.val_rows}: every file needs at least one row"
            )


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("deepfm-gen-synthetic", SyntheticOptions, argv,
                     "Generate a synthetic Criteo-schema data set with a planted model.")

    oracle_path = Path(args.out) / ORACLE_FILE
    if oracle_path.exists() and not args.force:
        print(f"{args.out}: data set exists ({oracle_path}); pass --force to regenerate")
        return 0
    oracle = generate(
        args.out,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        files_per_split=args.files_per_split,
        row_group_size=args.row_group_size,
        max_cardinality=args.max_cardinality,
        seed=args.seed,
    )
    print(
        f"wrote {args.out}: train {oracle['train_rows']} rows, val {oracle['val_rows']} rows, "
        f"ctr {oracle['ctr']:.4f}, in {oracle['generation_seconds']:.1f} s\n"
        f"oracle (true probabilities on val): auc {oracle['val_auc']:.4f}, "
        f"logloss {oracle['val_logloss']:.4f} "
        f"(constant-prediction logloss {oracle['val_constant_logloss']:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
