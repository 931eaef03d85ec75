"""Criteo-shaped raw TSV with planted labels: the rehearsal's input, at any fraction of real size.

    deepfm-gen-criteo --like criteo-kaggle --scale 0.1 --out data/generated/kaggle_0.1
    prepare-criteo --input data/generated/kaggle_0.1/train.txt --output ... --split kaggle

Writes what a user downloads: ``train.txt`` (Kaggle) or ``day_N`` (a Terabyte day), one line per
row, ``label \\t I1..I13 \\t C1..C26``, integers in decimal, categorical values as 8 lowercase hex
digits, an empty field for a null. Beside it, ``criteo_like.json`` (written last: marks a complete
file) holds the shape, the per-column parameters and the oracle: the AUC and log loss of the true
click probabilities on the rows ``prepare-criteo`` will route to validation and test.

**Values.** In categorical column f, a row is null with Criteo's null rate for f; otherwise its
value's *rank* r is drawn from a power law over ``[0, U_f)``, density proportional to
``(r + 1) ** -a_f``, and written as a 32-bit hash of (f, r). ``U_f`` is solved so the expected
number of distinct values over the file's rows equals the target (``--scale`` x the preset's
cardinality; columns of at most ``SMALL_DOMAIN`` values keep all of them), and ``a_f`` so the
number of values seen at least 10 times in Kaggle's training rows matches the published count
(``KAGGLE_KEPT_AT_10``): most values rare, a few very frequent, as in Criteo.
Integer columns are heavy-tailed counts with Criteo's null rates; I2 also takes -1, -2, -3.

**Labels.** ``logit = bias + sum_f w_f(r_f) + sum_{f<g} <v_f(r_f), v_g(r_g)> + beta . log1p(I)``,
``label ~ Bernoulli(sigmoid(logit))``. The weights of a rank are pseudo-random normals derived
from a hash of (seed, f, r), scaled down with the rank (the signal sits on frequent values, which
a model sees often enough to learn), so no weight table is stored: memory does not depend on the
cardinalities or on the number of rows. Each term is rescaled to a target standard deviation and
the bias solved for the target CTR on calibration rows, as in ``deepfm_dist.prepare.synthetic``.

**Streaming and parallel.** Rows are made in chunks of ``CHUNK_ROWS``, each from a generator keyed
by (seed, chunk), by a pool of worker processes; the main process writes them in order through a
bounded window, so memory stays a few chunks per worker whatever the row count, and the same
arguments give the same bytes with any number of workers. The oracle's AUC over the validation
rows is computed from a histogram of the true probabilities (``ORACLE_BINS`` bins per label):
bounded memory, exact up to the pairs that share a bin, whose share is recorded as
``auc_error_bound``.

Only numpy and pyarrow: the workers do not import torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import tomllib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm_dist import cli

CHUNK_ROWS = 1 << 17
"""Rows made at a time by one worker (about 30 MB of text)."""
ORACLE_BINS = 1 << 20
"""Histogram bins per label for the oracle AUC (16 MB in all)."""
CALIBRATION_ROWS = 200_000
"""Rows drawn (not written) to rescale the logit terms and solve the bias."""
SMALL_DOMAIN = 100
"""Columns with at most this many distinct values keep all of them at every scale (a domain of
a few categories does not shrink with the rows); larger ones scale with ``--scale``."""
META_FILE = "criteo_like.json"
NUM_DENSE, NUM_SPARSE = 13, 26

# Criteo Kaggle statistics (train.txt, 45,840,617 rows); sources and what is unsourced: data/CRITEO.md.
DENSE_NULL = [0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.043, 0.0005, 0.043, 0.45, 0.043, 0.76, 0.22]
"""Share of empty fields, I1..I13 (I2 none and I12 76% published; the others estimates)."""
DENSE_LOG_MEAN = [0.7, 2.5, 2.0, 1.5, 7.5, 3.5, 1.5, 2.3, 3.5, 0.3, 1.0, 0.3, 1.5]
"""Mean of log1p(value), I1..I13: the integers are drawn as floor(expm1(Exponential(mean)))."""
I2_NEGATIVE_RATE = 0.03
SPARSE_NULL = [0, 0, 0.034, 0.034, 0, 0.12, 0, 0, 0, 0, 0, 0.034, 0, 0, 0, 0.034, 0, 0,
               0.44, 0.44, 0.034, 0.7625, 0, 0.034, 0.44, 0.44]  # fmt: skip
"""Share of empty fields, C1..C26 (C22's 76.25% published; the others estimates)."""
KAGGLE_KEPT_AT_10 = [1447, 554, 157461, 117683, 305, 17, 11878, 629, 4, 39504, 5128, 156729, 3175, 27, 11070,
                     149083, 11, 4542, 1996, 4, 154737, 17, 16, 52989, 81, 40882]  # fmt: skip
"""FuxiCTR Criteo_x4_001's vocabulary sizes, C1..C26: values seen >= 10 times in a random 80% of
Kaggle's rows (36,672,493), plus one row for the rest and one for the empty string where the
column has nulls."""
KAGGLE_FIT_SHARE = 0.8
"""Share of the rows KAGGLE_KEPT_AT_10 was counted on."""


@dataclass(frozen=True)
class Shape:
    """A real data set's shape at scale 1."""

    name: str
    rows: int
    """Lines in one file at scale 1."""
    preset: str
    """The training preset whose ``num_embeddings_per_feature`` are the distinct counts at scale 1."""
    ctr: float
    file_name: str
    split: str
    """``prepare-criteo --split`` the file is meant for (decides which rows the oracle scores)."""


SHAPES = {
    # Kaggle: one file of 45,840,617 lines, CTR 0.2562 (Criteo's Display Advertising Challenge).
    "criteo-kaggle": Shape("criteo-kaggle", 45_840_617, "criteo_kaggle", 0.2562, "train.txt", "kaggle"),
    # One Terabyte day: day_0 has 195,841,983 lines; a day's CTR is about 3.3%. The preset's
    # cardinalities count 24 days, so one day at scale 1 has more distinct values than a real day
    # (a heavier test of the converter and the vocabulary, not a lighter one).
    "criteo-1tb-day": Shape("criteo-1tb-day", 195_841_983, "criteo_1tb", 0.033, "day_0", "terabyte"),
}


def preset_cardinalities(preset: str) -> list[int]:
    """``num_embeddings_per_feature`` of a shipped preset (``deepfm_dist/configs/NAME.toml``)."""
    path = Path(__file__).resolve().parent.parent / "configs" / f"{preset}.toml"
    with open(path, "rb") as f:
        return [int(n) for n in tomllib.load(f)["data"]["num_embeddings_per_feature"]]


# --- The value distribution: a power law over ranks [0, U) -------------------------------------

def _cdf(x: np.ndarray | float, a: float, universe: float) -> np.ndarray:
    """P(rank < x) for density proportional to (x + 1) ** -a on [0, universe)."""
    if abs(a - 1.0) < 1e-9:
        return np.log1p(x) / math.log1p(universe)
    return (1.0 - np.power(np.add(x, 1.0), 1.0 - a)) / (1.0 - (universe + 1.0) ** (1.0 - a))


def _inverse_cdf(u: np.ndarray, a: float, universe: float) -> np.ndarray:
    """Ranks (int64) for uniforms ``u`` in [0, 1)."""
    if abs(a - 1.0) < 1e-9:
        x = np.expm1(u * math.log1p(universe))
    else:
        x = np.power(1.0 - u * (1.0 - (universe + 1.0) ** (1.0 - a)), 1.0 / (1.0 - a)) - 1.0
    return np.minimum(np.floor(x), universe - 1).astype(np.int64)


def _rank_bins(universe: float, exact: int = 20_000, bins: int = 3_000) -> tuple[np.ndarray, np.ndarray]:
    """Ranks one by one up to ``exact``, then log-spaced bins: (first rank, width) each."""
    e = int(min(universe, exact))
    lo, width = np.arange(e, dtype=np.float64), np.ones(e)
    if universe > e:
        edges = np.unique(np.floor(np.geomspace(e, universe, bins)))
        lo, width = np.concatenate([lo, edges[:-1]]), np.concatenate([width, np.diff(edges)])
    return lo, width


def expected_counts(a: float, universe: float, draws: float, at_least: int = 10) -> tuple[float, float]:
    """Expected (distinct values, values seen >= ``at_least`` times) in ``draws`` draws."""
    lo, width = _rank_bins(universe)
    lam = draws * (_cdf(lo + width, a, universe) - _cdf(lo, a, universe)) / width
    distinct = float(np.sum(width * -np.expm1(-lam)))
    term = np.exp(-lam)
    below = term.copy()
    for j in range(1, at_least):  # P(Poisson(lam) < at_least)
        term = term * lam / j
        below += term
    return distinct, float(np.sum(width * np.clip(1.0 - below, 0.0, 1.0)))


def solve_universe(a: float, distinct: float, draws: float) -> float | None:
    """The universe U whose expected distinct count in ``draws`` draws is ``distinct``; None if
    no U reaches it at this exponent (the tail is too light)."""
    if distinct >= draws:
        return None
    low, high = float(distinct), float(distinct) * 1e5
    if expected_counts(a, low, draws)[0] >= distinct * 0.999:
        return low  # every value is seen: a small domain
    if expected_counts(a, high, draws)[0] < distinct:
        return None
    for _ in range(40):
        mid = math.sqrt(low * high)
        if expected_counts(a, mid, draws)[0] < distinct:
            low = mid
        else:
            high = mid
    return high


def fit_exponent(distinct: float, kept: float, draws: float, fit_draws: float) -> float:
    """The power law's exponent a at which a column with ``distinct`` expected values over ``draws``
    rows has ``kept`` values seen >= 10 times over ``fit_draws`` rows (bisection: a steeper law
    keeps fewer)."""
    low, high = 0.3, 3.0
    for _ in range(30):
        a = 0.5 * (low + high)
        universe = solve_universe(a, distinct, draws)
        if universe is None or expected_counts(a, universe, fit_draws)[1] < kept:
            high = a  # too steep: the tail cannot reach the distinct count, or too few kept
        else:
            low = a
    return round(0.5 * (low + high), 4)


def fit_kaggle_exponents() -> list[float]:
    """Per column, the exponent that matches Kaggle's distinct count (the preset's, which counts
    the empty value as one) and FuxiCTR's count of values kept at a min-count of 10. Small domains,
    where every value is kept, take 1.0 (any exponent gives all their values)."""
    shape = SHAPES["criteo-kaggle"]
    out = []
    for f, (card, kept) in enumerate(zip(preset_cardinalities(shape.preset), KAGGLE_KEPT_AT_10)):
        has_null = SPARSE_NULL[f] > 0
        distinct, kept = card - has_null, kept - 1 - has_null  # without the empty value and the rare row
        draws = shape.rows * (1.0 - SPARSE_NULL[f])
        out.append(1.0 if kept >= 0.98 * distinct else fit_exponent(distinct, kept, draws, KAGGLE_FIT_SHARE * draws))
    return out


@dataclass
class ColumnParams:
    """How one categorical column's values are drawn at the generated size."""

    target_distinct: int
    """Expected distinct values over the file's rows."""
    exponent: float
    """``a_f`` of the power law over ranks."""
    universe: float
    """``U_f``: ranks are in [0, U_f)."""
    expected_distinct: int
    """Expected distinct values over the file's rows (below the target only where the rows are too few
    to show them all)."""
    null_rate: float
    """Share of rows where the column is empty."""


def column_params(shape: Shape, scale: float, exponents: list[float],
                  null_rates: list[float] | None = None) -> list[ColumnParams]:
    """Per categorical column, the universe that gives ``scale`` x the preset's distinct count
    over ``scale`` x the shape's rows (all values of a small domain)."""
    rows = scaled_rows(shape, scale)
    out = []
    for f, (card, a) in enumerate(zip(preset_cardinalities(shape.preset), exponents)):
        target = card if card <= SMALL_DOMAIN else max(SMALL_DOMAIN, round(card * scale))
        null_rate = (null_rates or SPARSE_NULL)[f]
        draws = rows * (1.0 - null_rate)
        universe = solve_universe(a, target, draws)
        if universe is None:  # too few rows for this law to show that many values: offer them all
            universe = float(target)
        out.append(ColumnParams(target, a, universe, round(expected_counts(a, universe, draws)[0]), null_rate))
    return out


def scaled_rows(shape: Shape, scale: float) -> int:
    return max(1, round(shape.rows * scale))


# --- The planted model: per-rank weights from hashes, no tables ---------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 -> uint64), vectorised."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _normals(ranks: np.ndarray, key: int) -> np.ndarray:
    """A standard normal per rank, the same for the same (key, rank): Box-Muller on the two
    32-bit halves of one hash."""
    h = _mix64(ranks.astype(np.uint64) ^ _mix64(np.uint64(key)))
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2.0**32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass
class PlantedModel:
    """The ground truth; weights of a rank come from ``_normals`` keyed by (seed, field, j)."""

    seed: int
    columns: list[ColumnParams]
    latent_dim: int = 4
    signal_rank_scale: float = 64.0
    """The weights of rank r are scaled by 1 / sqrt(1 + r / this)."""
    first_scale: np.ndarray = field(default_factory=lambda: np.ones(NUM_SPARSE))
    latent_scale: np.ndarray = field(default_factory=lambda: np.ones(NUM_SPARSE))
    dense_weight: np.ndarray = field(default_factory=lambda: np.ones(NUM_DENSE))
    bias: float = 0.0

    def key(self, f: int, j: int) -> int:
        return (self.seed * 1_000_003 + f) * 64 + j

    def logit_terms(self, ranks: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First-order, FM pairwise and dense terms ``[n]`` each, from ranks ``[n, 26]`` (-1: null)
        and integers ``[n, 13]`` (NaN: null)."""
        n = ranks.shape[0]
        first, latent_sum, latent_sq = np.zeros(n), np.zeros((n, self.latent_dim)), np.zeros(n)
        for f in range(ranks.shape[1]):
            valid = ranks[:, f] >= 0
            r = np.where(valid, ranks[:, f], 0)
            decay = valid / np.sqrt(1.0 + r / self.signal_rank_scale)
            first += self.first_scale[f] * decay * _normals(r, self.key(f, 0))
            for j in range(self.latent_dim):
                v = self.latent_scale[f] * decay * _normals(r, self.key(f, j + 1))
                latent_sum[:, j] += v
                latent_sq += v * v
        pairwise = 0.5 * (np.einsum("nk,nk->n", latent_sum, latent_sum) - latent_sq)
        transformed = np.nan_to_num(np.log1p(np.maximum(dense, 0.0)), nan=0.0)
        return first, pairwise, transformed @ self.dense_weight

    def calibrate(self, first_std: float, pairwise_std: float, dense_std: float, ctr: float) -> None:
        """Rescales each term to its target std over rows and solves the bias for ``ctr``."""
        rng = np.random.default_rng([self.seed, 1])
        ranks, dense = draw_features(self.columns, rng, CALIBRATION_ROWS)
        self.dense_weight = rng.standard_normal(NUM_DENSE)
        importance = np.exp(0.5 * rng.standard_normal(NUM_SPARSE))
        self.first_scale, self.latent_scale = importance, np.sqrt(importance)
        first, pairwise, dense_term = self.logit_terms(ranks, dense)
        self.first_scale = self.first_scale * first_std / first.std()
        self.latent_scale = self.latent_scale * math.sqrt(pairwise_std / pairwise.std())  # quadratic
        self.dense_weight = self.dense_weight * dense_std / dense_term.std()
        logit = sum(self.logit_terms(ranks, dense))
        low, high = -30.0, 30.0
        for _ in range(100):  # mean(sigmoid(bias + logit)) increases with the bias
            mid = 0.5 * (low + high)
            low, high = (mid, high) if _sigmoid(mid + logit).mean() < ctr else (low, mid)
        self.bias = 0.5 * (low + high)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def draw_features(columns: list[ColumnParams], rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks ``[n, 26]`` (int64, -1 for null) and integers ``[n, 13]`` (float64, NaN for null)."""
    ranks = np.empty((n, NUM_SPARSE), dtype=np.int64)
    for f, col in enumerate(columns):
        r = _inverse_cdf(rng.random(n), col.exponent, col.universe)
        r[rng.random(n) < col.null_rate] = -1
        ranks[:, f] = r
    dense = np.empty((n, NUM_DENSE))
    for d in range(NUM_DENSE):
        counts = np.floor(np.expm1(np.minimum(rng.exponential(DENSE_LOG_MEAN[d], n), 20.0)))
        if d == 1:
            negative = rng.random(n) < I2_NEGATIVE_RATE
            counts[negative] = -rng.integers(1, 4, int(negative.sum()))
        counts[rng.random(n) < DENSE_NULL[d]] = np.nan
        dense[:, d] = counts
    return ranks, dense


# --- Formatting ----------------------------------------------------------------------------------

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(values: np.ndarray) -> pa.Array:
    """uint32 values -> 8-lowercase-hex-digit strings, vectorised."""
    shifts = np.arange(28, -4, -4, dtype=np.uint32)
    digits = _HEX_DIGITS[(values[:, None].astype(np.uint32) >> shifts) & 0xF]
    offsets = np.arange(0, 8 * (len(values) + 1), 8, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def _field(strings: pa.Array, null: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(null), "", strings) if null.any() else strings


def format_lines(labels: np.ndarray, ranks: np.ndarray, dense: np.ndarray, seed: int) -> bytes:
    """Criteo TSV lines (``\\n``-terminated) for the rows."""
    columns = [pa.array(labels).cast(pa.string())]
    for d in range(NUM_DENSE):
        null = np.isnan(dense[:, d])
        columns.append(_field(pa.array(np.nan_to_num(dense[:, d]).astype(np.int64)).cast(pa.string()), null))
    for f in range(NUM_SPARSE):
        # The raw value: a 32-bit hash of (field, rank), as Criteo's values are hashes.
        salt = _mix64(np.uint64(seed * 1_000_003 + 1_000 + f))
        hashed = (_mix64(ranks[:, f].astype(np.uint64) ^ salt) >> np.uint64(32)).astype(np.uint32)
        columns.append(_field(_hex8(hashed), ranks[:, f] < 0))
    lines = pc.binary_join_element_wise(*columns, "\t")
    lines = pc.binary_join_element_wise(lines, "\n", "")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(labels) + 1, offset=lines.offset * 4)
    return lines.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]


# --- Writing -------------------------------------------------------------------------------------

@dataclass
class _Job:
    """What every worker needs (sent once, at the pool's start)."""

    model: PlantedModel
    rows: int
    scored: dict[str, tuple[int, int]]
    """Split name -> [first, end) line range whose true probabilities the oracle scores."""


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _make_chunk(index: int) -> tuple[bytes, int, float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Chunk ``index``: (TSV bytes, positives, summed log loss of the true probabilities,
    {split: (probs, labels)} of its rows in each scored range)."""
    job = _JOB
    start = index * CHUNK_ROWS
    n = min(CHUNK_ROWS, job.rows - start)
    rng = np.random.default_rng([job.model.seed, 2, index])
    ranks, dense = draw_features(job.model.columns, rng, n)
    prob = _sigmoid(job.model.bias + sum(job.model.logit_terms(ranks, dense)))
    labels = (rng.random(n) < prob).astype(np.int8)
    p = np.clip(prob, 1e-12, 1 - 1e-12)
    loss = float(-np.sum(np.where(labels == 1, np.log(p), np.log1p(-p))))
    scored = {}
    for split, (first, end) in job.scored.items():
        lo, hi = max(first, start) - start, min(end, start + n) - start
        if lo < hi:
            scored[split] = (prob[lo:hi].astype(np.float32), labels[lo:hi])
    return format_lines(labels, ranks, dense, job.model.seed), int(labels.sum()), loss, scored


class BinnedAUC:
    """AUC from per-label histograms of scores in [0, 1]: bounded memory, any number of rows.

    Pairs whose scores share a bin count as half right; ``error_bound`` is their share of all
    positive-negative pairs, the most the result can differ from the exact AUC by that.
    """

    def __init__(self, bins: int = ORACLE_BINS) -> None:
        self.bins = bins
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)
        self.loss = 0.0

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        index = np.minimum((probs.astype(np.float64) * self.bins).astype(np.int64), self.bins - 1)
        self.pos += np.bincount(index[labels == 1], minlength=self.bins)
        self.neg += np.bincount(index[labels == 0], minlength=self.bins)
        p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
        self.loss += float(-np.sum(np.where(labels == 1, np.log(p), np.log1p(-p))))

    def result(self) -> dict[str, float]:
        positives, negatives = int(self.pos.sum()), int(self.neg.sum())
        rows = positives + negatives
        if positives == 0 or negatives == 0:
            return {"rows": rows, "auc": float("nan"), "auc_error_bound": 0.0, "logloss": self.loss / max(rows, 1)}
        below = np.cumsum(self.neg) - self.neg  # negatives in lower bins
        pairs = float(positives) * negatives
        ties = float(np.sum(self.pos.astype(np.float64) * self.neg))
        auc = (float(np.sum(self.pos.astype(np.float64) * below)) + 0.5 * ties) / pairs
        return {"rows": rows, "ctr": positives / rows, "auc": auc, "auc_error_bound": 0.5 * ties / pairs,
                "logloss": self.loss / rows}


def scored_ranges(shape: Shape, rows: int) -> dict[str, tuple[int, int]]:
    """The line ranges the oracle scores: for Kaggle those ``prepare-criteo --split kaggle`` routes
    to val and test (see its routing)."""
    if shape.split == "kaggle":  # floor(N / 14) test lines at the end, the val lines before them
        n_test = n_val = rows // 14
        return {"val": (rows - n_val - n_test, rows - n_test), "test": (rows - n_test, rows)}
    return {"all": (0, rows)}  # a training day (day_0): the oracle over all its rows


def generate(out_dir: str | os.PathLike, *, like: str = "criteo-kaggle", scale: float = 1.0, seed: int = 0,
             workers: int = 1, first_std: float = 1.0, pairwise_std: float = 0.7, dense_std: float = 0.5,
             progress: bool = False) -> dict[str, Any]:
    """Writes ``out_dir/<the shape's file>`` and ``out_dir/criteo_like.json``; returns the latter."""
    shape = SHAPES[like]
    rows = scaled_rows(shape, scale)
    start = time.perf_counter()
    columns = column_params(shape, scale, EXPONENTS[like], NULL_RATES[like])
    model = PlantedModel(seed, columns)
    model.calibrate(first_std, pairwise_std, dense_std, shape.ctr)
    job = _Job(model, rows, scored_ranges(shape, rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    final, tmp = out / shape.file_name, out / f".{shape.file_name}.tmp"
    oracle = {split: BinnedAUC() for split in job.scored}
    chunks = math.ceil(rows / CHUNK_ROWS)
    positives, loss, written = 0, 0.0, 0

    def consume(result: tuple[bytes, int, float, dict]) -> None:
        nonlocal positives, loss, written
        data, pos, chunk_loss, scored = result
        f.write(data)
        positives, loss, written = positives + pos, loss + chunk_loss, written + len(data)
        for split, (probs, labels) in scored.items():
            oracle[split].add(probs, labels)

    try:
        with open(tmp, "wb") as f:
            if workers <= 1:
                _init_worker(job)
                for i in range(chunks):
                    consume(_make_chunk(i))
                    _progress(progress, i + 1, chunks, start)
            else:
                with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(job,)) as pool:
                    window: deque = deque()
                    for i in range(chunks):
                        window.append(pool.submit(_make_chunk, i))
                        if len(window) >= 2 * workers:  # bounded: a few chunks per worker in memory
                            consume(window.popleft().result())
                            _progress(progress, i + 2 - len(window), chunks, start)
                    while window:
                        consume(window.popleft().result())
                        _progress(progress, chunks - len(window), chunks, start)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "like": like,
        "scale": scale,
        "seed": seed,
        "file": shape.file_name,
        "rows": rows,
        "bytes": written,
        "ctr": positives / rows,
        "logloss": loss / rows,
        "oracle": {split: acc.result() for split, acc in oracle.items()},
        "columns": {f"C{f + 1}": {"target_distinct": c.target_distinct, "exponent": c.exponent,
                                  "universe": round(c.universe),
                                  "expected_distinct": c.expected_distinct, "null_rate": c.null_rate}
                    for f, c in enumerate(columns)},
        "model": {"first_std": first_std, "pairwise_std": pairwise_std, "dense_std": dense_std,
                  "latent_dim": model.latent_dim, "signal_rank_scale": model.signal_rank_scale, "bias": model.bias},
        "seconds": round(time.perf_counter() - start, 2),
        "workers": workers,
        "numpy_version": np.__version__,
    }
    meta_tmp = out / f".{META_FILE}.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, out / META_FILE)
    return meta


def _progress(on: bool, done: int, total: int, start: float) -> None:
    if on and (done == total or done % 16 == 0):
        rate = done * CHUNK_ROWS / max(time.perf_counter() - start, 1e-9)
        print(f"deepfm-gen-criteo: {done}/{total} chunks, {rate:,.0f} rows/s", file=sys.stderr, flush=True)

KAGGLE_EXPONENTS = [1.0, 2.44, 1.0599, 1.143, 1.0, 3.0, 1.5316, 1.0, 1.0, 1.3356, 1.7303, 1.0692, 1.0, 3.0, 1.5705,
                    1.0906, 1.0, 1.77, 1.8938, 3.0, 1.0773, 3.0, 1.0, 1.2808, 3.0, 1.2531]  # fmt: skip
"""``fit_kaggle_exponents()``'s result (it takes ~20 s; tests/test_criteo_like.py checks it still holds)."""


def _nearest_kaggle_columns(cardinalities: list[int]) -> list[int]:
    """For another data set's columns, the Kaggle column nearest in log-cardinality (in Terabyte
    the same column names hold fields of other sizes)."""
    kaggle = np.log(np.array(preset_cardinalities("criteo_kaggle"), dtype=np.float64))
    return [int(np.argmin(np.abs(kaggle - math.log(c)))) for c in cardinalities]


_TB_LIKE = _nearest_kaggle_columns(preset_cardinalities("criteo_1tb"))
EXPONENTS = {"criteo-kaggle": KAGGLE_EXPONENTS, "criteo-1tb-day": [KAGGLE_EXPONENTS[k] for k in _TB_LIKE]}
NULL_RATES = {"criteo-kaggle": SPARSE_NULL, "criteo-1tb-day": [SPARSE_NULL[k] for k in _TB_LIKE]}
"""Per shape, C1..C26. No per-column statistics of a Terabyte day were found to fit: each of its
columns takes the exponent and null rate of the Kaggle column of the nearest size."""


@dataclass
class GenOptions:
    out: str
    """Output folder: the raw file (train.txt, or day_0 for a Terabyte day) and criteo_like.json."""
    like: str = field(default="criteo-kaggle", metadata={"choices": tuple(SHAPES)})
    """The data set whose shape to copy: rows, cardinalities, null rates, CTR."""
    scale: float = 1.0
    """Fraction of the real rows and distinct values (columns of <= 100 values keep them all)."""
    seed: int = 0
    """Seed of the planted model and every drawn value."""
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """Processes making rows (default: the usable cores); the output does not depend on it."""
    force: bool = False
    """Regenerate even if --out already holds a complete file of the same arguments."""

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"argument --scale: expected a fraction > 0, got {self.scale}")
        if self.workers < 1:
            raise ValueError(f"argument --workers: expected a positive integer, got {self.workers}")


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("deepfm-gen-criteo", GenOptions, argv, __doc__.split("\n\n")[0])
    meta_path = Path(args.out) / META_FILE
    if meta_path.exists() and not args.force:
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        if (old.get("like"), old.get("scale"), old.get("seed")) == (args.like, args.scale, args.seed):
            print(f"deepfm-gen-criteo: {args.out}: already generated ({meta_path}); pass --force to redo it")
            return 0
    try:
        meta = generate(args.out, like=args.like, scale=args.scale, seed=args.seed, workers=args.workers,
                        progress=True)
    except ValueError as e:
        print(f"deepfm-gen-criteo: error: {e}", file=sys.stderr)
        return 2
    split, scored = next(iter(meta["oracle"].items()))
    print(f"deepfm-gen-criteo: wrote {Path(args.out) / meta['file']}: {meta['rows']:,} rows, "
          f"{meta['bytes'] / 1e9:.2f} GB, CTR {meta['ctr']:.4f}, in {meta['seconds']:.0f} s\n"
          f"oracle on {'all' if split == 'all' else 'the ' + split} rows ({scored['rows']:,}): AUC {scored['auc']:.4f}, logloss {scored['logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
