"""The Criteo-shaped generator: its value law against Monte Carlo, its fit against the published
counts, its file against Criteo's layout, and determinism whatever the number of workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepfm_dist.metrics import exact_auc
from deepfm_dist.prepare import criteo_like as cl


@pytest.mark.parametrize("a,universe", [(1.0, 5_000.0), (1.3, 50_000.0), (0.9, 200_000.0)])
def test_expected_counts_match_draws(a, universe):
    draws = 300_000
    rng = np.random.default_rng(0)
    ranks = cl._inverse_cdf(rng.random(draws), a, universe)
    assert ranks.min() >= 0 and ranks.max() < universe
    _, counts = np.unique(ranks, return_counts=True)
    distinct, kept = cl.expected_counts(a, universe, draws)
    assert counts.size == pytest.approx(distinct, rel=0.02)
    assert int((counts >= 10).sum()) == pytest.approx(kept, rel=0.03)


def test_solve_universe_hits_the_target():
    universe = cl.solve_universe(1.1, 40_000, 500_000)
    assert cl.expected_counts(1.1, universe, 500_000)[0] == pytest.approx(40_000, rel=1e-3)
    assert cl.solve_universe(1.1, 600_000, 500_000) is None  # more values than draws


@pytest.mark.parametrize("column", [3, 4, 12, 16, 21, 24, 26])
def test_fitted_exponents_reproduce_kaggle_counts(column):
    """At scale 1, the large columns' expected distinct values equal the preset's cardinality and
    the values seen >= 10 times in 80% of the rows equal FuxiCTR's vocabulary (within 1%)."""
    f = column - 1
    shape = cl.SHAPES["criteo-kaggle"]
    card = cl.preset_cardinalities("criteo_kaggle")[f]
    params = cl.column_params(shape, 1.0, cl.KAGGLE_EXPONENTS)[f]
    draws = shape.rows * (1 - cl.SPARSE_NULL[f])
    has_null = cl.SPARSE_NULL[f] > 0
    assert params.expected_distinct == pytest.approx(card, rel=0.01)
    kept = cl.expected_counts(params.exponent, params.universe, cl.KAGGLE_FIT_SHARE * draws)[1]
    assert kept == pytest.approx(cl.KAGGLE_KEPT_AT_10[f] - 1 - has_null, rel=0.01)


def test_binned_auc_is_within_its_bound_of_the_exact_auc():
    rng = np.random.default_rng(1)
    probs = rng.random(50_000).astype(np.float32)
    labels = (rng.random(50_000) < probs).astype(np.int8)
    acc = cl.BinnedAUC(bins=1 << 10)
    acc.add(probs[:20_000], labels[:20_000])
    acc.add(probs[20_000:], labels[20_000:])
    r = acc.result()
    exact = exact_auc(torch.from_numpy(probs), torch.from_numpy(labels))
    assert 0 < r["auc_error_bound"] < 0.01
    assert abs(r["auc"] - exact) <= r["auc_error_bound"] + 1e-9


def test_file_layout_oracle_and_determinism(tmp_path):
    scale = 60_000 / cl.SHAPES["criteo-kaggle"].rows  # two chunks
    one = cl.generate(tmp_path / "one", scale=scale, seed=3, workers=1)
    two = cl.generate(tmp_path / "two", scale=scale, seed=3, workers=2)
    data = (tmp_path / "one" / "train.txt").read_bytes()
    assert data == (tmp_path / "two" / "train.txt").read_bytes()  # any number of workers: same bytes
    assert one["oracle"] == two["oracle"]
    lines = data.decode().splitlines()
    assert len(lines) == one["rows"] == 60_000 and len(data) == one["bytes"]
    fields = [line.split("\t") for line in lines[:2000]]
    assert all(len(f) == 40 for f in fields)
    assert {f[0] for f in fields} == {"0", "1"}
    dense = [v for f in fields for v in f[1:14] if v]
    assert all(v.lstrip("-").isdigit() for v in dense) and any(v.startswith("-") for v in dense)  # I2's negatives
    sparse = [v for f in fields for v in f[14:]]
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in sparse if v)
    null_c22 = sum(f[14 + 21] == "" for f in fields) / len(fields)
    assert null_c22 == pytest.approx(cl.SPARSE_NULL[21], abs=0.05)
    # Labels from the planted model: Kaggle's CTR, an oracle well above chance on the rows that
    # prepare-criteo --split kaggle routes to val (the 1/14 before the last 1/14).
    assert one["ctr"] == pytest.approx(cl.SHAPES["criteo-kaggle"].ctr, abs=0.02)
    val = one["oracle"]["val"]
    assert val["rows"] == 60_000 // 14 and 0.7 < val["auc"] < 0.9 and val["auc_error_bound"] < 1e-3
    labels = np.array([int(line[0]) for line in lines])
    start, end = cl.scored_ranges(cl.SHAPES["criteo-kaggle"], 60_000)["val"]
    assert val["ctr"] == pytest.approx(labels[start:end].mean())
    meta = json.loads((tmp_path / "one" / cl.META_FILE).read_text())
    assert meta["columns"]["C3"]["target_distinct"] == round(10_131_227 * scale)


def test_cli_reuses_a_complete_file_and_rejects_bad_flags(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["--out", str(out), "--scale", "0.0002", "--workers", "1"]
    assert cl.main(args) == 0
    assert cl.main(args) == 0
    assert "already generated" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cl.main(["--out", str(out), "--scale", "0"])
    assert e.value.code == 2
    assert "--scale: expected a fraction > 0" in capsys.readouterr().err


def test_a_terabyte_day_reaches_its_distinct_counts():
    """Terabyte's columns take the exponent and null rate of the Kaggle column of the nearest
    size; with them a quarter day can show every column's target of distinct values."""
    shape = cl.SHAPES["criteo-1tb-day"]
    params = cl.column_params(shape, 0.25, cl.EXPONENTS["criteo-1tb-day"], cl.NULL_RATES["criteo-1tb-day"])
    assert all(p.expected_distinct >= 0.99 * p.target_distinct for p in params)
    big = max(range(26), key=lambda f: params[f].target_distinct)
    assert params[big].target_distinct == round(cl.preset_cardinalities("criteo_1tb")[big] * 0.25)
