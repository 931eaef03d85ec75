"""Tests of deepfm_dist.data: hashing, synthetic data, the Parquet reader and its errors.

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

from deepfm_dist.data import (
    Batch,
    ParquetBatchReader,
    exact_auc,
    generate,
    hash_ids,
    hash_strings,
    resolve_parquet_paths,
    splitmix64,
)
from deepfm_dist.data import synthetic

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


def test_exact_auc_with_ties():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.5])
    # Pairwise definition: positive beats negative = 1, tie = 0.5.
    pos, neg = scores[labels == 1], scores[labels == 0]
    slow = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert exact_auc(labels, scores) == pytest.approx(slow)
    assert math.isnan(exact_auc(np.ones(3), np.arange(3)))


# --------------------------------------------------------------------------- reader

DENSE = ["I1", "I2"]
SPARSE = ["C1", "C2"]
NUM_EMB = {"C1": 50, "C2": 30}


def _write(path, columns: dict, row_group_size=None, schema=None):
    table = pa.table(columns, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _reader(paths, **kwargs):
    args = dict(label="label", dense=DENSE, sparse=SPARSE, num_embeddings=NUM_EMB,
                batch_size=64, rank=0, world_size=1, pad_last=True)
    args.update(kwargs)
    return ParquetBatchReader(paths, **args)


def _uneven_files(tmp_path):
    """3 files of 700, 450 and 333 rows in row groups of 100; I1 = global row index."""
    paths, start = [], 0
    for i, rows in enumerate((700, 450, 333)):
        idx = np.arange(start, start + rows)
        paths.append(_write(tmp_path / f"part-{i}.parquet", {
            "label": pa.array(idx % 3 == 0).cast(pa.int8()),
            "I1": pa.array(idx, pa.int64()),
            "I2": pa.array(idx * 0.5, pa.float64(), mask=idx % 7 == 0),
            "C1": pa.array(idx % 40, pa.int64(), mask=idx % 5 == 0),
            "C2": pa.array([f"s{j % 11}" for j in idx]),
        }, row_group_size=100))
        start += rows
    return paths, start


@pytest.mark.parametrize("batch_size", [64, 1000])
def test_reader_splits_rows_over_ranks_exactly_once(tmp_path, batch_size):
    paths, n = _uneven_files(tmp_path)
    world = 3
    expected_c1 = hash_ids(np.arange(n) % 40, np.arange(n) % 5 != 0, NUM_EMB["C1"], salt=5)

    seen, lengths = [], set()
    for rank in range(world):
        reader = _reader(paths, batch_size=batch_size, rank=rank, world_size=world,
                         pad_last=True, hash_seed=5)
        assert reader.num_rows == n
        lengths.add(len(reader))
        batches = list(reader)
        assert len(batches) == len(reader)
        assert reader.rank_rows == (rank + 1) * n // world - rank * n // world
        real = 0
        for b in batches:
            assert isinstance(b, Batch)
            assert b.dense_features.shape == (batch_size, 2) and b.labels.shape == (batch_size,)
            assert b.sparse_features.stride() == batch_size
            keep = b.weights == 1.0
            assert ((b.weights == 0.0) | keep).all()
            # Real rows come first; padding is zeros.
            real_in_batch = int(keep.sum())
            assert keep[:real_in_batch].all()
            assert (b.dense_features[~keep] == 0).all() and (b.labels[~keep] == 0).all()
            c1 = b.sparse_features["C1"].values()
            assert (c1[real_in_batch:] == 0).all()
            row = torch.round(torch.expm1(b.dense_features[keep, 0].double())).long().numpy()
            np.testing.assert_array_equal(b.labels[keep].numpy(), (row % 3 == 0).astype(np.float32))
            np.testing.assert_array_equal(c1[:real_in_batch].numpy(), expected_c1[row])
            seen.append(row)
            real += real_in_batch
        assert real == reader.rank_rows
    assert lengths == {math.ceil(math.ceil(n / world) / batch_size)}
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_reader_train_mode_drops_tail_with_equal_lengths(tmp_path):
    paths, n = _uneven_files(tmp_path)
    world, batch_size = 3, 64
    seen = []
    for rank in range(world):
        reader = _reader(paths, batch_size=batch_size, rank=rank, world_size=world, pad_last=False)
        batches = list(reader)
        assert len(reader) == len(batches) == (n // world) // batch_size
        assert reader.rank_rows == len(batches) * batch_size
        for b in batches:
            assert b.labels.shape == (batch_size,) and (b.weights == 1.0).all()
            seen.append(torch.round(torch.expm1(b.dense_features[:, 0].double())).long().numpy())
        # Rows come from this rank's own contiguous range.
        rows = np.concatenate(seen[-len(batches):])
        assert rows.min() >= rank * n // world and rows.max() < (rank + 1) * n // world
    rows = np.concatenate(seen)
    assert np.unique(rows).size == rows.size


def test_reader_conversion_on_hand_written_file(tmp_path):
    path = _write(tmp_path / "five.parquet", {
        "label": pa.array([0, 1, 1, 0, 1], pa.int8()),
        "I1": pa.array([0, 3, None, -2, 10], pa.int64()),
        "I2": pa.array([1.5, float("nan"), None, -1.0, 0.0], pa.float64()),
        "C1": pa.array([5, None, 7, 5, None], pa.int64()),
        "C2": pa.array(["a", "b", None, "a", "ccc"]),
    })
    batches = list(_reader([path], batch_size=5))
    assert len(batches) == 1
    b = batches[0]
    # Nulls, NaN and negatives -> 0, then log1p.
    expected = np.log1p([[0, 1.5], [3, 0], [0, 0], [0, 0], [10, 0]])
    np.testing.assert_allclose(b.dense_features.numpy(), expected, rtol=1e-6)
    assert b.dense_features.dtype == torch.float32 and b.labels.dtype == torch.float32
    np.testing.assert_array_equal(b.labels.numpy(), [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(b.weights.numpy(), np.ones(5))

    kjt = b.sparse_features
    assert kjt.keys() == ["C1", "C2"]
    assert kjt.lengths().tolist() == [1] * 10
    c1 = hash_ids(np.array([5, 0, 7, 5, 0]), np.array([1, 0, 1, 1, 0], bool), 50)
    c2_raw = hash_strings(pa.array(["a", "b", None, "a", "ccc"]))
    c2 = hash_ids(c2_raw, np.array([1, 1, 0, 1, 1], bool), 30)
    assert kjt.values().dtype == torch.int64
    assert kjt.values().tolist() == c1.tolist() + c2.tolist()  # key-major
    assert c1[1] == c1[4] == 0 and c1[0] == c1[3] != 0 and c2[2] == 0 and c2[0] == c2[3]
    assert kjt["C2"].values().tolist() == c2.tolist()

    # batch_size 4: the second batch holds one real row then three padding rows.
    second = list(_reader([path], batch_size=4))[1]
    assert second.weights.tolist() == [1, 0, 0, 0]
    assert second.sparse_features["C1"].values().tolist() == [0, 0, 0, 0]
    assert second.sparse_features["C2"].values().tolist() == [c2[4], 0, 0, 0]
    assert second.labels.tolist() == [1, 0, 0, 0]

    moved = b.to(torch.device("cpu"))
    assert isinstance(moved, Batch) and torch.equal(moved.weights, b.weights)
    if torch.cuda.is_available():
        pinned = b.pin_memory()
        assert isinstance(pinned, Batch) and pinned.weights.is_pinned()


def test_reader_reads_synthetic_data(tmp_path):
    oracle = _tiny_synthetic(tmp_path)
    paths = resolve_parquet_paths(str(tmp_path / "train"), "data.train")
    reader = ParquetBatchReader(
        paths, label="label", dense=oracle["dense"], sparse=oracle["sparse"],
        num_embeddings={c: 100 for c in oracle["sparse"]}, batch_size=256, rank=1,
        world_size=2, pad_last=False,
    )
    batches = list(reader)
    assert len(batches) == 1500 // 256
    assert batches[0].dense_features.shape == (256, 13)
    assert len(batches[0].sparse_features.keys()) == 26


# --------------------------------------------------------------------------- errors


def _good_columns(n=10, label=None):
    return {
        "label": pa.array(label if label is not None else np.zeros(n, np.int8)),
        "I1": pa.array(np.arange(n)),
        "I2": pa.array(np.arange(n) * 1.0),
        "C1": pa.array(np.arange(n)),
        "C2": pa.array([str(i) for i in range(n)]),
    }


def test_error_missing_column(tmp_path):
    columns = _good_columns()
    del columns["C2"]
    path = _write(tmp_path / "nocol.parquet", columns)
    with pytest.raises(ValueError, match="C2") as e:
        _reader([path])
    assert "nocol.parquet" in str(e.value)


def test_error_wrong_type(tmp_path):
    columns = _good_columns()
    columns["C1"] = pa.array(np.arange(10) * 1.0)
    path = _write(tmp_path / "badtype.parquet", columns)
    with pytest.raises(ValueError, match="badtype.parquet") as e:
        _reader([path])
    message = str(e.value)
    assert "'C1'" in message and "double" in message and "integer or string" in message


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


def test_error_corrupt_and_empty_files(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"this is not parquet" * 10)
    with pytest.raises(ValueError, match="x.parquet"):
        _reader([str(bad)])
    empty = _write(tmp_path / "empty.parquet", {k: v[:0] for k, v in _good_columns().items()})
    with pytest.raises(ValueError, match="0 rows") as e:
        _reader([empty])
    assert "empty.parquet" in str(e.value)


def test_error_label_out_of_range(tmp_path):
    label = np.zeros(10, np.int8)
    label[7] = 2
    path = _write(tmp_path / "lab.parquet", _good_columns(label=label), row_group_size=5)
    reader = _reader([path], batch_size=2)
    with pytest.raises(ValueError, match="lab.parquet") as e:
        list(reader)
    assert "row group 1" in str(e.value) and "'label'" in str(e.value)
