"""Tests of deepfm_dist.data: hashing, synthetic data, Parquet path resolution (the loader is
tested in test_loader.py).

Fixtures are tiny Parquet files written into tmp_path in the real format.
"""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from deepfm_dist.data import hash_ids, hash_strings, hashing, resolve_parquet_paths, splitmix64
from deepfm_dist.prepare import synthetic
from deepfm_dist.prepare.synthetic import generate

# --------------------------------------------------------------------------- hashing


def _fnv1a_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_splitmix64_known_values():
    # First output of the reference splitmix64 generator seeded with 0.
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    # int64 inputs are hashed by their bits: -1 is 2**64 - 1.
    assert splitmix64(np.array([-1]))[0] == splitmix64(np.array([2**64 - 1], dtype=np.uint64))[0]


def test_hash_ids_range_nulls_determinism():
    rng = np.random.default_rng(0)
    raw = np.concatenate([np.arange(5000), rng.integers(-(2**62), 2**62, 5000)])
    valid = rng.random(raw.size) > 0.2
    for n in (2, 3, 1000):
        ids = hash_ids(raw, valid, n, salt=7)
        assert ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < n
        assert (ids[~valid] == 0).all()
        assert (ids[valid] >= 1).all()  # non-null never lands on the null row
        np.testing.assert_array_equal(ids, hash_ids(raw.copy(), valid.copy(), n, salt=7))
    # Sequential ids spread over the table instead of filling the first rows.
    counts = np.bincount(hash_ids(np.arange(100_000), None, 101, salt=0), minlength=101)
    assert counts[0] == 0 and counts[1:].min() > 800
    # The salt changes the mapping.
    assert (hash_ids(raw, None, 1000, salt=1) != hash_ids(raw, None, 1000, salt=2)).mean() > 0.9
    with pytest.raises(ValueError, match="num_embeddings must be >= 2"):
        hash_ids(raw, None, 1)


def test_hash_strings_matches_fnv1a_reference():
    values = ["", "a", None, "héllo wörld", "ab" * 50, "a"]
    arr = pa.array(values)
    expected = [0 if v is None else _fnv1a_reference(v.encode()) for v in values]
    assert hash_strings(arr).view(np.uint64).tolist() == expected
    # Sliced, chunked, large_string and dictionary-encoded inputs hash alike.
    assert hash_strings(arr.slice(3)).view(np.uint64).tolist() == expected[3:]
    chunked = pa.chunked_array([arr[:2], arr[2:]])
    assert hash_strings(chunked).view(np.uint64).tolist() == expected
    assert hash_strings(arr.cast(pa.large_string())).view(np.uint64).tolist() == expected
    assert hash_strings(arr.dictionary_encode()).view(np.uint64).tolist() == expected


def test_hash_ids_reduction_and_out():
    raw = np.arange(-5000, 5000)
    h = splitmix64(raw.view(np.uint64) ^ hashing._salt_mix(3))
    # Tables up to 2**32 + 1 rows: the high 32 bits scaled to the table (multiply-shift).
    expected = 1 + ((h >> np.uint64(32)) * np.uint64(999) >> np.uint64(32)).astype(np.int64)
    np.testing.assert_array_equal(hash_ids(raw, None, 1000, salt=3), expected)
    # Larger tables: the remainder.
    big = 2**33
    np.testing.assert_array_equal(hash_ids(raw, None, big, salt=3),
                                  1 + (h % np.uint64(big - 1)).astype(np.int64))
    out = np.full(raw.size, -1, dtype=np.int64)
    assert hash_ids(raw, raw % 3 != 0, 1000, salt=3, out=out) is out
    np.testing.assert_array_equal(out, np.where(raw % 3 != 0, expected, 0))
    # Longer than one block, and every integer width hashes by its int64 value.
    long = np.arange(100_000, dtype=np.int32) - 50_000
    np.testing.assert_array_equal(hash_ids(long, None, 77), hash_ids(long.astype(np.int64), None, 77))


def test_hash_strings_short_and_long_paths_agree():
    short = ["", "a", None, "68fd1e64", "x" * 24]
    longer = short + ["y" * 25]
    expected = [0 if v is None else _fnv1a_reference(v.encode()) for v in longer]
    assert hash_strings(pa.array(short)).view(np.uint64).tolist() == expected[:-1]  # masked passes
    assert hash_strings(pa.array(longer)).view(np.uint64).tolist() == expected  # sorted by length


# --------------------------------------------------------------------------- synthetic


def _tiny_synthetic(out_dir, seed=3):
    return generate(
        out_dir,
        train_rows=3000,
        val_rows=1000,
        files_per_split=(2, 1),
        row_group_size=500,
        max_cardinality=1000,
        seed=seed,
    )


def test_synthetic_schema_oracle_and_determinism(tmp_path):
    oracle = _tiny_synthetic(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "oracle.json").read_text()) == oracle
    assert 0.6 < oracle["val_auc"] < 1.0
    assert oracle["val_logloss"] < oracle["val_constant_logloss"]
    assert 0.15 < oracle["ctr"] < 0.35
    assert oracle["train_rows"] == 3000 and oracle["val_rows"] == 1000

    train_files = sorted((tmp_path / "a" / "train").iterdir())
    assert [p.name for p in train_files] == ["part-00000.parquet", "part-00001.parquet"]
    assert [p.name for p in (tmp_path / "a" / "val").iterdir()] == ["part-00000.parquet"]
    pf = pq.ParquetFile(train_files[0])
    assert pf.metadata.num_rows == 1500
    assert [pf.metadata.row_group(i).num_rows for i in range(3)] == [500, 500, 500]

    table = pq.read_table(tmp_path / "a" / "train")
    assert table.num_rows == 3000
    assert table.schema.field("label").type == pa.int8()
    assert set(np.unique(table.column("label").to_numpy())) == {0, 1}
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert table.schema.names == ["label", *names]
    for name in names:
        assert table.schema.field(name).type == pa.int64()
    dense_nulls = [table.column(f"I{i}").null_count for i in range(1, 14)]
    sparse_nulls = [table.column(f"C{i}").null_count for i in range(1, 27)]
    assert sum(n > 0 for n in dense_nulls) >= 10 and sum(n > 0 for n in sparse_nulls) >= 20
    assert max(dense_nulls) <= 0.5 * 3000 and max(sparse_nulls) <= 0.35 * 3000
    assert pc.min(table.column("I2")).as_py() in (-1, -2, -3)
    for i in (1, 3, 13):
        assert pc.min(table.column(f"I{i}")).as_py() >= 0
    c = table.column("C1").drop_null().to_numpy()
    assert c.min() >= 0 and c.max() < 2**32  # Criteo-like 32-bit hash values

    # Same seed -> identical data; another seed -> other data.
    _tiny_synthetic(tmp_path / "b")
    assert pq.read_table(tmp_path / "b" / "train").equals(table)
    other = _tiny_synthetic(tmp_path / "c", seed=4)
    assert not pq.read_table(tmp_path / "c" / "train").equals(table)
    assert other["val_auc"] != oracle["val_auc"]


def test_synthetic_cli(tmp_path, capsys):
    out = str(tmp_path / "syn")
    args = ["--out", out, "--train-rows", "600", "--val-rows", "300", "--row-group-size", "200",
            "--max-cardinality", "100", "--files-per-split", "2,1"]
    assert synthetic.main(args) == 0
    assert "oracle" in capsys.readouterr().out
    assert synthetic.main(args) == 0
    assert "exists" in capsys.readouterr().out
    # --force with fewer files: the stale part-00001 of the first run must go.
    assert synthetic.main(args[:-1] + ["1", "--force"]) == 0
    assert [p.name for p in (tmp_path / "syn" / "train").iterdir()] == ["part-00000.parquet"]
    with pytest.raises(SystemExit):
        synthetic.main(["--out", out, "--train-rows", "-5"])
    assert "--train-rows" in capsys.readouterr().err


def test_planted_pairwise_term_matches_double_loop():
    rng = np.random.default_rng(0)
    model = synthetic._draw_model(rng, num_dense=2, cardinalities=[5, 7, 3], zipf_a=1.2,
                                  latent_dim=4, signal_rank_scale=32.0)
    ranks, dense, dense_valid = synthetic._draw_rows(model, rng, 50)
    assert (ranks == -1).any()
    _, pairwise, _ = synthetic._logit_terms(model, ranks, dense, dense_valid)
    slow = np.zeros(50)
    for f in range(3):
        for g in range(f + 1, 3):
            both = (ranks[:, f] >= 0) & (ranks[:, g] >= 0)  # a null field contributes 0
            dots = (model.latent[f][ranks[:, f]] * model.latent[g][ranks[:, g]]).sum(1)
            slow += np.where(both, dots, 0.0)
    np.testing.assert_allclose(pairwise, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_dense,num_sparse", [(0, 3), (2, 0)])
def test_synthetic_without_dense_or_sparse_columns(tmp_path, num_dense, num_sparse):
    oracle = generate(tmp_path, train_rows=500, val_rows=500, num_dense=num_dense,
                      num_sparse=num_sparse, max_cardinality=50, files_per_split=(1, 1))
    assert 0.5 < oracle["val_auc"] < 1.0
    assert pq.read_schema(tmp_path / "val" / "part-00000.parquet").names == (
        ["label"] + oracle["dense"] + oracle["sparse"]
    )


def _write(path, columns: dict, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def _good_columns(n=10, label=None):
    return {
        "label": pa.array(label if label is not None else np.zeros(n, np.int8)),
        "I1": pa.array(np.arange(n)),
        "I2": pa.array(np.arange(n) * 1.0),
        "C1": pa.array(np.arange(n)),
        "C2": pa.array([str(i) for i in range(n)]),
    }


def test_error_path_matches_nothing(tmp_path):
    spec = str(tmp_path / "nothing" / "*.parquet")
    with pytest.raises(FileNotFoundError, match="data.train") as e:
        resolve_parquet_paths(spec, "data.train")
    assert spec in str(e.value) and "matched no Parquet file" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data.val"):
        resolve_parquet_paths([str(tmp_path / "empty")], "data.val")


def test_resolve_parquet_paths_forms(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    a = _write(tmp_path / "d" / "b.parquet", _good_columns())
    b = _write(tmp_path / "d" / "sub" / "a.parquet", _good_columns())
    (tmp_path / "d" / ".tmp.parquet").write_bytes(b"in progress")
    (tmp_path / "d" / "_SUCCESS").write_bytes(b"")
    assert resolve_parquet_paths(str(tmp_path / "d"), "x") == sorted([a, b])
    assert resolve_parquet_paths(str(tmp_path / "d" / "*.parquet"), "x") == [a]
    assert resolve_parquet_paths([a, str(tmp_path / "d"), b], "x") == sorted([a, b])


def test_resolve_uris_through_pyarrow_fs(tmp_path):
    (tmp_path / "d" / "sub" / "_tmp").mkdir(parents=True)
    a = _write(tmp_path / "d" / "a.parquet", _good_columns())
    b = _write(tmp_path / "d" / "sub" / "b.parquet", _good_columns())
    _write(tmp_path / "d" / "sub" / "_tmp" / "c.parquet", _good_columns())
    _write(tmp_path / "d" / ".hidden.parquet", _good_columns())
    uri = f"file://{tmp_path}/d"
    # URIs stay URIs (read through pyarrow.fs, as s3:// would be), with the same rules.
    assert resolve_parquet_paths(uri, "x") == [f"file://{a}", f"file://{b}"]
    assert resolve_parquet_paths(f"{uri}/*.parquet", "x") == [f"file://{a}"]
    assert resolve_parquet_paths(f"{uri}/s*", "x") == [f"file://{b}"]
    assert resolve_parquet_paths(f"{uri}/**/b.parquet", "x") == [f"file://{b}"]
    with pytest.raises(FileNotFoundError, match="data.val") as e:
        resolve_parquet_paths(f"{uri}/nothing/*.parquet", "data.val")
    assert "matched no Parquet file" in str(e.value)
