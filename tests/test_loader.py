"""Tests of the production Parquet loader (deepfm_dist.data.loader.ParquetLoader).

Fixtures are small Parquet files written into tmp_path. Most files carry the global row index
in the dense column I1 (read with ``dense_transform="none"``, so it comes back exactly), which
lets every test check which rows a batch holds.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deepfm_dist.config import ConfigError, DataConfig, build_config
from deepfm_dist.data import Batch, ParquetLoader, feature_specs, hash_ids, hash_strings, resolve_parquet_paths
from deepfm_dist.data.schema import FeatureSpec
from tests.distributed_helpers import launch

SIZES = [50, 30]


def _cfg(**kw) -> DataConfig:
    args = dict(train=["unused"], val=["unused"], dense=["I1", "I2"], sparse=["C1", "C2"],
                num_embeddings_per_feature=SIZES, dense_transform="none", hash_seed=5)
    args.update(kw)
    return DataConfig(**args)


def _write(path, columns: dict, row_group_size=None, **kw) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size, **kw)
    return str(path)


def _columns(idx: np.ndarray) -> dict:
    return {
        "label": pa.array(idx % 3 == 0).cast(pa.int8()),
        "I1": pa.array(idx, pa.int64()),
        "I2": pa.array(idx * 0.5, pa.float64(), mask=idx % 7 == 0),
        "C1": pa.array(idx % 40, pa.int64(), mask=idx % 5 == 0),
        "C2": pa.array([f"s{j % 11}" for j in idx]),
    }


@pytest.fixture
def uneven(tmp_path):
    """3 files of 700, 450 and 333 rows in row groups of 97 (the last ones shorter)."""
    paths, start = [], 0
    for i, rows in enumerate((700, 450, 333)):
        idx = np.arange(start, start + rows)
        paths.append(_write(tmp_path / f"part-{i}.parquet", _columns(idx), row_group_size=97))
        start += rows
    return paths, start


def _loader(paths, cfg=None, **kw) -> ParquetLoader:
    args = dict(batch_size=64, rank=0, world_size=1, train=False, seed=0)
    args.update(kw)
    return ParquetLoader(paths, cfg or _cfg(), **args)


def _row_ids(batch: Batch) -> np.ndarray:
    """Global row indices of the batch's real (weight 1) rows, in batch order."""
    keep = batch.weights == 1.0
    return batch.dense_features[keep, 0].long().numpy()


def _epoch(loader: ParquetLoader) -> list[np.ndarray]:
    return [_row_ids(b) for b in loader]


# --------------------------------------------------------------------------- work split


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 0), (3, 2)])
def test_eval_covers_every_row_exactly_once(uneven, world, workers):
    paths, n = uneven
    cfg = _cfg(num_workers=workers)
    expected_c1 = hash_ids(np.arange(n) % 40, np.arange(n) % 5 != 0, SIZES[0], salt=5)
    expected_c2 = hash_ids(hash_strings(pa.array([f"s{j % 11}" for j in range(n)])), None, SIZES[1], salt=5)
    seen, lengths = [], set()
    for rank in range(world):
        loader = _loader(paths, cfg, batch_size=64, rank=rank, world_size=world)
        assert loader.num_rows == n
        assert loader.rank_rows == (rank + 1) * n // world - rank * n // world
        batches = list(loader)
        lengths.add(len(loader))
        assert len(batches) == len(loader)
        real = 0
        for b in batches:
            assert isinstance(b, Batch)
            assert b.dense_features.shape == (64, 2) and b.labels.shape == (64,) and b.weights.shape == (64,)
            kjt = b.sparse_features
            assert kjt.keys() == ["C1", "C2"] and kjt.stride() == 64
            assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
            keep = b.weights == 1.0
            assert ((b.weights == 0.0) | keep).all()
            # Padding rows are zeros: label 0, dense 0, the null id 0.
            assert (b.dense_features[~keep] == 0).all() and (b.labels[~keep] == 0).all()
            rows = _row_ids(b)
            np.testing.assert_array_equal(b.labels[keep].numpy(), (rows % 3 == 0).astype(np.float32))
            np.testing.assert_array_equal(kjt["C1"].values()[keep].numpy(), expected_c1[rows])
            np.testing.assert_array_equal(kjt["C2"].values()[keep].numpy(), expected_c2[rows])
            assert (kjt["C1"].values()[~keep] == 0).all()
            seen.append(rows)
            real += rows.size
        assert real == loader.rank_rows
    # Same number of batches on every rank; every row exactly once over ranks x workers.
    assert lengths == {math.ceil(math.ceil(n / world) / 64)}
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


@pytest.mark.parametrize("shuffle,workers", [(False, 0), (True, 0), (True, 2)])
def test_train_equal_batches_drop_only_the_tail(uneven, shuffle, workers):
    paths, n = uneven
    world, batch = 3, 64
    cfg = _cfg(shuffle=shuffle, num_workers=workers, shuffle_buffer=200)
    seen = []
    for rank in range(world):
        loader = _loader(paths, cfg, batch_size=batch, rank=rank, world_size=world, train=True)
        loader.set_epoch(2)
        batches = list(loader)
        assert len(loader) == len(batches) == (n // world) // batch  # identical on every rank
        assert loader.rank_rows == len(batches) * batch
        for b in batches:
            assert b.labels.shape == (batch,) and (b.weights == 1.0).all()
        rows = np.concatenate([_row_ids(b) for b in batches])
        seen.append(rows)
    rows = np.concatenate(seen)
    assert np.unique(rows).size == rows.size == world * ((n // world) // batch) * batch
    # Dropped: at most batch_size rows per rank (plus the extra row some ranks own).
    assert n - rows.size < world * (batch + 1)


def test_shuffle_false_is_file_order(uneven):
    paths, n = uneven
    cfg = _cfg(shuffle=False)
    rows = np.concatenate(_epoch(_loader(paths, cfg, train=True)))
    np.testing.assert_array_equal(rows, np.arange((n // 64) * 64))
    # Rank 1 of 2 reads the second half, in order.
    rows = np.concatenate(_epoch(_loader(paths, cfg, train=True, rank=1, world_size=2)))
    np.testing.assert_array_equal(rows, n // 2 + np.arange(((n // 2) // 64) * 64))
    # Evaluation never shuffles, whatever data.shuffle says.
    rows = np.concatenate(_epoch(_loader(paths, _cfg(shuffle=True), train=False)))
    np.testing.assert_array_equal(rows, np.arange(n))


def test_same_seed_same_batches_new_epoch_new_order(uneven):
    paths, n = uneven
    cfg = _cfg(shuffle=True, shuffle_buffer=300)

    def run(seed, epoch):
        loader = _loader(paths, cfg, train=True, seed=seed)
        loader.set_epoch(epoch)
        return _epoch(loader)

    a = run(seed=7, epoch=0)
    b = run(seed=7, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_epoch, other_seed = run(seed=7, epoch=1), run(seed=8, epoch=0)
    flat = np.concatenate(a)
    assert not np.array_equal(flat, np.concatenate(other_epoch))
    assert not np.array_equal(flat, np.concatenate(other_seed))
    # Really shuffled: a batch mixes rows from far apart, not a run of neighbours.
    assert np.mean([np.ptp(x) > 300 for x in a]) > 0.9
    assert not np.array_equal(np.sort(a[0]), np.arange(a[0][0], a[0][0] + 64))


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("shuffle,workers", [(False, 0), (True, 0), (True, 2), (False, 2)])
def test_resume_continues_exactly(uneven, shuffle, workers):
    paths, _ = uneven
    cfg = _cfg(shuffle=shuffle, shuffle_buffer=200, num_workers=workers)

    def make():
        loader = _loader(paths, cfg, batch_size=32, train=True, seed=3)
        loader.set_epoch(1)
        return loader

    full = _epoch(make())
    total = len(full)
    for k in (0, 5, 11, total):
        first = make()
        it = iter(first)
        assert first.state_dict()["batches"] == 0  # the position right after iter()
        head = [_row_ids(next(it)) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # small and JSON-able
        assert state["epoch"] == 1 and state["batches"] == k
        del it
        resumed = _loader(paths, cfg, batch_size=32, train=True, seed=3)
        resumed.load_state_dict(state)
        assert resumed.state_dict()["batches"] == k
        tail = _epoch(resumed)
        assert len(head) + len(tail) == total
        for x, y in zip(head + tail, full):
            np.testing.assert_array_equal(x, y)
        # The next epoch starts from its beginning.
        resumed.set_epoch(2)
        assert len(_epoch(resumed)) == total


def test_auto_workers_and_a_resume_on_another_device(uneven, monkeypatch):
    """data.num_workers auto: 0 on CPU, a few per GPU rank within its cores; a mid-epoch state
    written on CPU (0 workers) continues in the same order where auto chose 2 (a GPU)."""
    from deepfm_dist.config import DataConfig
    from deepfm_dist.data.loader import GPU_WORKERS, auto_num_workers

    assert DataConfig().num_workers == -1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert auto_num_workers(-1, "cpu", 8) == 0
    assert auto_num_workers(-1, "cuda", 8) == min(GPU_WORKERS, 3)
    assert auto_num_workers(-1, "cuda", 1) == GPU_WORKERS
    assert auto_num_workers(-1, "cuda", 32) == 1  # never 0 on a GPU
    assert auto_num_workers(-1, "cuda", 1, most=1) == 1
    assert auto_num_workers(3, "cuda", 1) == 3 and auto_num_workers(0, "cuda", 1) == 0
    paths, _ = uneven
    cfg = _cfg(shuffle=True, shuffle_buffer=200)  # num_workers auto
    assert _loader(paths, cfg).num_workers == 0  # no device given: CPU
    full = _epoch(_loader(paths, cfg, batch_size=32, train=True, seed=3))
    first = _loader(paths, cfg, batch_size=32, train=True, seed=3)
    it = iter(first)
    head = [_row_ids(next(it)) for _ in range(5)]
    state = first.state_dict()
    del it
    gpu = _loader(paths, cfg, batch_size=32, train=True, seed=3, num_workers=2)
    with pytest.raises(ValueError, match="num_workers=1 vs 2"):
        gpu.load_state_dict(state)
    gpu.keep_saved_workers(state)
    gpu.load_state_dict(state)
    assert gpu.num_workers == 1
    for x, y in zip(head + _epoch(gpu), full, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_positions_and_layout_checks(uneven):
    paths, n = uneven
    loader = _loader(paths, _cfg(shuffle=False), batch_size=64, train=True)
    it = iter(loader)
    for _ in range(12):  # 768 rows: file 1 (700 rows) holds rows 700.., row group 0 of 97
        next(it)
    (pos,) = loader.state_dict()["positions"]
    assert pos["file"] == paths[1] and pos["row_group"] == 0 and pos["offset"] == 68
    state = loader.state_dict()
    other = _loader(paths, _cfg(shuffle=False), batch_size=64, train=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size=1 vs 2"):
        other.load_state_dict(state)
    # At an epoch boundary any layout may resume.
    other.load_state_dict({**state, "batches": 0})
    assert len(_epoch(other)) == len(other)


# --------------------------------------------------------------------------- conversion


def test_conversion_on_hand_written_file(tmp_path):
    path = _write(tmp_path / "five.parquet", {
        "label": pa.array([0, 1, 1, 0, 1], pa.int8()),
        "I1": pa.array([0, 3, None, -2, 10], pa.int64()),
        "I2": pa.array([1.5, float("nan"), None, -1.0, float("inf")], pa.float64()),
        "C1": pa.array([5, None, 7, 5, None], pa.int64()),
        "C2": pa.array(["a", "b", None, "a", "ccc"]).dictionary_encode(),
    })
    cfg = _cfg(dense_transform="log1p", hash_seed=0)
    (b,) = list(_loader([path], cfg, batch_size=5))
    # Nulls, NaN, inf and negatives -> 0, then log1p.
    expected = np.log1p([[0, 1.5], [3, 0], [0, 0], [0, 0], [10, 0]])
    np.testing.assert_allclose(b.dense_features.numpy(), expected, rtol=1e-6)
    assert b.dense_features.dtype == torch.float32 and b.labels.dtype == torch.float32
    np.testing.assert_array_equal(b.labels.numpy(), [0, 1, 1, 0, 1])
    kjt = b.sparse_features
    assert kjt.lengths().tolist() == [1] * 10 and kjt.weights_or_none() is None
    assert b.weighted_features is None
    c1 = hash_ids(np.array([5, 0, 7, 5, 0]), np.array([1, 0, 1, 1, 0], bool), 50)
    c2 = hash_ids(hash_strings(pa.array(["a", "b", None, "a", "ccc"])), np.array([1, 1, 0, 1, 1], bool), 30)
    assert kjt.values().tolist() == c1.tolist() + c2.tolist()  # key-major
    assert c1[1] == c1[4] == 0 and c1[0] == c1[3] != 0 and c2[2] == 0 and c2[0] == c2[3]
    # "none" keeps the values (nulls/NaN/inf still 0).
    (b,) = list(_loader([path], _cfg(), batch_size=5))
    np.testing.assert_allclose(b.dense_features.numpy(), [[0, 1.5], [3, 0], [0, 0], [-2, -1], [10, 0]])


def _multi_hot_file(tmp_path, n=300, row_group_size=64):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, n)
    hist, hist_w = [], []
    for i, k in enumerate(lengths):
        if i % 17 == 0:
            hist.append(None)  # null list: an empty bag
            hist_w.append(None)
            continue
        ids = [int(1000 * i + j) for j in range(k)]
        hist.append([None if (i % 13 == 0 and j == 0) else v for j, v in enumerate(ids)])
        hist_w.append([float(i) + j / 10 for j in range(k)])
    idx = np.arange(n)
    path = _write(tmp_path / "mh.parquet", {
        "label": pa.array(idx % 2, pa.int8()),
        "I1": pa.array(idx, pa.int64()),
        "C1": pa.array(idx % 9, pa.int64()),
        "hist": pa.array(hist, pa.list_(pa.int64())),
        "hist_w": pa.array(hist_w, pa.list_(pa.float32())),
        "item": pa.array(idx % 23, pa.int64()),
        "item_w": pa.array(idx * 0.25, pa.float64()),
        "tags": pa.array([[f"t{i % 3}", f"u{i % 4}"] for i in idx], pa.list_(pa.string())),
    }, row_group_size=row_group_size)
    return path, hist, hist_w


@pytest.mark.parametrize("shuffle", [False, True])
def test_multi_hot_weighted_and_string_lists(tmp_path, shuffle):
    path, hist, hist_w = _multi_hot_file(tmp_path)
    cfg = _cfg(dense=["I1"], sparse=["C1", "hist", "item", "tags"], num_embeddings_per_feature=[10, 100, 100, 100],
               multi_hot=["hist", "tags"], weighted={"hist": "hist_w", "item": "item_w"},
               shared_tables={"item": "items", "hist": "items"}, pooling={"tags": "mean"},
               shuffle=shuffle, shuffle_buffer=100)
    loader = _loader([path], cfg, batch_size=32, train=True)
    seen = 0
    for b in loader:
        # Unweighted features in sparse_features, weighted ones (with their weights) apart.
        plain, weighted = b.sparse_features, b.weighted_features
        assert plain.keys() == ["C1", "tags"] and plain.weights_or_none() is None
        assert weighted.keys() == ["hist", "item"] and weighted.weights().dtype == torch.float32
        rows = _row_ids(b)
        per_key = {**plain.to_dict(), **weighted.to_dict()}
        h = per_key["hist"]
        for r, ids, ws in zip(rows, h.to_dense(), h.to_dense_weights()):
            want = hist[r] or []
            want_ids = hash_ids(np.array([0 if v is None else v for v in want], np.int64),
                                np.array([v is not None for v in want], bool), 100, salt=5)
            assert ids.tolist() == want_ids.tolist()
            np.testing.assert_allclose(ws.numpy(), hist_w[r] or [], rtol=1e-6)
        item = per_key["item"]
        assert item.lengths().tolist() == [1] * 32
        np.testing.assert_allclose(item.weights().numpy(), rows * 0.25)
        np.testing.assert_array_equal(item.values().numpy(), hash_ids(rows % 23, None, 100, salt=5))
        np.testing.assert_array_equal(per_key["C1"].values().numpy(), hash_ids(rows % 9, None, 10, salt=5))
        tags = per_key["tags"]
        assert tags.lengths().tolist() == [2] * 32
        assert tags.values().view(32, 2)[:, 0].tolist() == hash_ids(
            hash_strings(pa.array([f"t{r % 3}" for r in rows])), None, 100, salt=5).tolist()
        seen += rows.size
    assert seen == (300 // 32) * 32

    specs = loader.feature_specs
    assert specs == feature_specs(cfg)
    assert specs[1] == FeatureSpec("hist", "items", 100, "sum", weighted=True, multi_hot=True)
    assert specs[2] == FeatureSpec("item", "items", 100, "sum", weighted=True, multi_hot=False)
    assert specs[0] == FeatureSpec("C1", "C1", 10, "sum", weighted=False, multi_hot=False)
    assert specs[3] == FeatureSpec("tags", "tags", 100, "mean", weighted=False, multi_hot=True)


def test_mismatched_weights_are_an_error(tmp_path):
    path = _write(tmp_path / "w.parquet", {
        "label": pa.array([0, 1], pa.int8()), "I1": pa.array([0, 1]), "I2": pa.array([0, 1]),
        "C1": pa.array([[1, 2], [3]], pa.list_(pa.int64())), "C2": pa.array(["a", "b"]),
        "C1_w": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32())),
    })
    cfg = _cfg(multi_hot=["C1"], weighted={"C1": "C1_w"})
    with pytest.raises(ValueError, match="row group 0") as e:
        list(_loader([path], cfg, batch_size=2))
    assert "w.parquet" in str(e.value) and "'C1_w'" in str(e.value) and "row 1" in str(e.value)


def test_feature_specs_and_config_checks():
    cfg = _cfg(shared_tables={"C2": "C1"}, num_embeddings_per_feature=[], num_embeddings=64)
    assert [(s.name, s.table, s.num_embeddings) for s in feature_specs(cfg)] == [("C1", "C1", 64), ("C2", "C1", 64)]
    with pytest.raises(ConfigError, match="data.shared_tables") as e:
        _cfg(shared_tables={"C2": "C1"})  # sizes 50 and 30 disagree
    assert "size" in str(e.value)
    with pytest.raises(ConfigError, match="data.shared_tables"):
        _cfg(shared_tables={"C2": "T", "C1": "T"}, num_embeddings_per_feature=[], pooling={"C1": "mean"})
    with pytest.raises(ConfigError, match="data.multi_hot"):
        _cfg(multi_hot=["C9"])
    with pytest.raises(ConfigError, match="data.pooling.C1"):
        _cfg(pooling={"C1": "max"})
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        _cfg(shuffle_buffer=-1)
    with pytest.raises(ConfigError, match="data.dense_transform"):
        _cfg(dense_transform="log")
    with pytest.raises(ConfigError, match="data.dense/data.sparse/data.weighted"):
        _cfg(multi_hot=["C1"], weighted={"C1": "I1"})
    # TOML tables parse into the dict fields.
    tree = {"data": {"sparse": ["C1", "C2", "C3"], "multi_hot": ["C1"], "weighted": {"C1": "W"},
                     "shared_tables": {"C2": "t", "C3": "t"}, "pooling": {"C2": "mean", "C3": "mean"}}}
    data = build_config(tree).data
    assert data.weighted == {"C1": "W"} and data.shared_tables == {"C2": "t", "C3": "t"}
    with pytest.raises(ConfigError, match="weighting"):  # one table, weighted and not
        _cfg(weighted={"C1": "W"}, shared_tables={"C2": "C1"}, num_embeddings_per_feature=[])


def test_uri_input(uneven):
    paths, n = uneven
    uris = resolve_parquet_paths(f"file://{os.path.dirname(paths[0])}", "data.train")
    assert uris == [f"file://{p}" for p in paths]
    rows = np.concatenate(_epoch(_loader(uris)))
    np.testing.assert_array_equal(rows, np.arange(n))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("workers", [0, 1])
def test_pinned_memory(uneven, workers):
    paths, _ = uneven
    b = next(iter(_loader(paths, _cfg(num_workers=workers), pin_memory=True)))
    assert b.dense_features.is_pinned() and b.labels.is_pinned() and b.weights.is_pinned()
    assert b.sparse_features.values().is_pinned()


# --------------------------------------------------------------------------- pass-through columns


def _rid(i: int) -> str | None:
    return None if i % 9 == 0 else f"req-{i}"


@pytest.fixture
def with_ids(tmp_path):
    """The ``uneven`` layout plus pass-through columns: a string request id (null every 9th
    row; dictionary-encoded in the second file), a timestamp and a list<string>."""
    paths, start = [], 0
    for i, rows in enumerate((700, 450, 333)):
        idx = np.arange(start, start + rows)
        cols = _columns(idx)
        rid = pa.array([_rid(int(j)) for j in idx], pa.string())
        cols["rid"] = rid.dictionary_encode() if i == 1 else rid
        cols["ts"] = pa.array(idx * 1_000, pa.timestamp("ms"))
        cols["tags"] = pa.array([[f"t{j % 3}"] * int(j % 3) for j in idx], pa.list_(pa.string()))
        paths.append(_write(tmp_path / f"part-{i}.parquet", cols, row_group_size=97))
        start += rows
    return paths, start


PASS = ["rid", "ts", "tags", "I1"]  # I1 is also a configured (dense) column


def _check_passthrough(b: Batch) -> np.ndarray:
    """Every pass-through row matches the converted row beside it; returns the real row ids."""
    t = b.passthrough
    assert t.num_rows == b.labels.shape[0] and t.column_names == PASS
    assert t.schema.field("rid").type == pa.string()  # dictionary decoded, same type for every file
    keep = (b.weights == 1.0).numpy()
    rows = _row_ids(b)
    real = t.filter(pa.array(keep))
    assert real.column("rid").to_pylist() == [_rid(int(j)) for j in rows]
    assert real.column("I1").to_pylist() == rows.tolist()
    np.testing.assert_array_equal(real.column("ts").cast(pa.int64()).to_numpy(), rows * 1_000)
    assert real.column("tags").to_pylist() == [[f"t{j % 3}"] * int(j % 3) for j in rows]
    pad = t.filter(pa.array(~keep))
    assert all(pad.column(c).null_count == pad.num_rows for c in PASS)
    # A compact copy: a batch does not keep (or pickle) its row groups' buffers.
    assert t.get_total_buffer_size() < 64 * 1024
    return rows


@pytest.mark.parametrize("world,workers,train", [(1, 0, False), (3, 0, False), (3, 2, False), (2, 0, True), (2, 2, True)])
def test_passthrough_rows_stay_aligned(with_ids, world, workers, train):
    paths, n = with_ids
    cfg = _cfg(num_workers=workers, shuffle=True, shuffle_buffer=200)
    seen = []
    for rank in range(world):
        loader = _loader(paths, cfg, batch_size=64, rank=rank, world_size=world, train=train, passthrough=PASS)
        assert loader.passthrough_schema.names == PASS
        for b in loader:
            seen.append(_check_passthrough(b))
            moved = b.to(torch.device("cpu"))
            assert moved.passthrough is b.passthrough  # host data: never moved, never copied
    rows = np.concatenate(seen)
    assert np.unique(rows).size == rows.size
    if not train:
        assert rows.size == n
    # Without passthrough nothing changes.
    assert next(iter(_loader(paths, cfg, batch_size=64))).passthrough is None


def test_passthrough_on_skipped_row_group_is_null(tmp_path):
    path = _corrupt_row_group(tmp_path)
    loader = _loader([path], _cfg(skip_bad_row_groups=True), batch_size=64, passthrough=["I1", "C2"])
    got = []
    for b in loader:
        keep = (b.weights == 1.0).numpy()
        ids = b.passthrough.column("I1").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(ids[keep], _row_ids(b))  # padding sits mid-batch here
        assert b.passthrough.filter(pa.array(~keep)).column("C2").null_count == int((~keep).sum())
        got.append(ids[keep])
    np.testing.assert_array_equal(np.concatenate(got), np.r_[0:100, 200:300])


def test_passthrough_errors(tmp_path, with_ids):
    paths, _ = with_ids
    good = _good(tmp_path, "nocol.parquet")  # no rid column
    with pytest.raises(ValueError, match=r"nocol.parquet: missing pass-through column 'rid' \(the file has"):
        _loader([paths[0], good], passthrough=["rid"])
    cols = _columns(np.arange(10))
    cols["rid"] = pa.array(np.arange(10))
    other = _write(tmp_path / "intid.parquet", cols)
    with pytest.raises(ValueError, match="intid.parquet: column 'rid' has type int64, but .*part-0.parquet has string"):
        _loader([paths[0], other], passthrough=["rid"])
    with pytest.raises(ValueError, match="distinct column names"):
        _loader(paths, passthrough=["rid", "rid"])


def test_labels_optional(tmp_path):
    idx = np.arange(50)
    cols = _columns(idx)
    labelled = _write(tmp_path / "a.parquet", cols)
    del cols["label"]
    unlabelled = _write(tmp_path / "b.parquet", cols)
    with pytest.raises(ValueError, match="b.parquet: missing label column 'label'"):
        _loader([unlabelled])
    for files, labels, has in (([unlabelled], None, False), ([labelled], None, True), ([labelled], False, False)):
        loader = _loader(files, labels=labels, batch_size=50)
        assert loader.has_labels is has
        (b,) = list(loader)
        np.testing.assert_array_equal(b.labels.numpy(), (idx % 3 == 0) if has else np.zeros(50))
        np.testing.assert_array_equal(_row_ids(b), idx)
    with pytest.raises(ValueError, match="b.parquet: no label column 'label', but .*a.parquet has one"):
        _loader([labelled, unlabelled], labels=None)
    assert _loader([labelled, unlabelled], labels=False).num_rows == 100


# --------------------------------------------------------------------------- bad input


def _good(tmp_path, name="good.parquet", n=10, **kw):
    return _write(tmp_path / name, _columns(np.arange(n)), **kw)


def test_error_missing_column_and_wrong_type(tmp_path):
    columns = _columns(np.arange(10))
    del columns["C2"]
    path = _write(tmp_path / "nocol.parquet", columns)
    with pytest.raises(ValueError, match="nocol.parquet: missing sparse column 'C2'"):
        _loader([path])
    columns = _columns(np.arange(10))
    columns["C1"] = pa.array(np.arange(10) * 1.0)
    path = _write(tmp_path / "badtype.parquet", columns)
    with pytest.raises(ValueError, match="badtype.parquet") as e:
        _loader([path])
    assert "'C1' has type double, expected integer or string" in str(e.value)
    with pytest.raises(ValueError, match="multi-hot sparse column 'C1' has type int64, expected list"):
        _loader([_good(tmp_path)], _cfg(multi_hot=["C1"]))


def test_error_schema_differs_between_files(tmp_path):
    first = _good(tmp_path, "a.parquet")
    columns = _columns(np.arange(10))
    columns["C1"] = pa.array([str(i) for i in range(10)])
    second = _write(tmp_path / "b.parquet", columns)
    with pytest.raises(ValueError, match="b.parquet: column 'C1' has type string, but .*a.parquet has int64"):
        _loader([first, second])


def test_error_label_outside_0_1(tmp_path):
    idx = np.arange(20)
    columns = _columns(idx)
    columns["label"] = pa.array(np.where(idx == 13, 2, 0).astype(np.int8))
    # Found from the footer statistics, before any row is read.
    path = _write(tmp_path / "lab.parquet", columns, row_group_size=10)
    with pytest.raises(ValueError, match=r"lab.parquet: row group 1: label column 'label': labels in \[0, 2\]"):
        _loader([path])
    # Without statistics: found while reading, naming the file, row group and column.
    path = _write(tmp_path / "nostats.parquet", columns, row_group_size=10, write_statistics=False)
    loader = _loader([path], batch_size=5)
    with pytest.raises(ValueError, match="nostats.parquet: row group 1: label column 'label' has 1 values outside") as e:
        list(loader)
    assert "first in row 3: 2" in str(e.value)  # row 13 of the file is row 3 of row group 1


def test_empty_file_and_zero_row_row_group_are_skipped_and_counted(tmp_path):
    """Valid Parquet without rows (Spark writes a file per empty partition): skipped and counted,
    with or without data.skip_bad_row_groups; every real row is read once."""
    good = _good(tmp_path)
    empty = _write(tmp_path / "empty.parquet", {k: v[:0] for k, v in _columns(np.arange(1)).items()})
    table = pa.table(_columns(np.arange(10)))
    zero = tmp_path / "zero.parquet"
    with pq.ParquetWriter(zero, table.schema) as w:
        w.write_table(table)
        w.write_table(table.slice(0, 0))
        w.write_table(table)
    for cfg in (_cfg(), _cfg(skip_bad_row_groups=True)):
        loader = _loader([good, empty, str(zero)], cfg, batch_size=5)
        assert loader.num_rows == 30
        assert [(s["file"], s["row_group"], s["rows"]) for s in loader.skipped] == [(empty, None, 0), (str(zero), 1, 0)]
        assert sum(_row_ids(b).size for b in loader) == 30
    with pytest.raises(ValueError, match="the files hold 0 readable rows"):
        _loader([empty])


def test_error_truncated_file_and_no_match(tmp_path):
    good = _good(tmp_path, n=100)
    data = open(good, "rb").read()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.parquet: not a readable Parquet file"):
        _loader([good, str(cut)])
    with pytest.raises(FileNotFoundError, match="data.train: .*matched no Parquet file"):
        resolve_parquet_paths(str(tmp_path / "none-*.parquet"), "data.train")


def _corrupt_row_group(tmp_path, name="bad.parquet", n=300, row_group_size=100, row_group=1):
    """A file whose footer is fine but whose row group ``row_group`` has garbage pages."""
    path = _write(tmp_path / name, _columns(np.arange(n)), row_group_size=row_group_size, compression="zstd")
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    start = min(meta.column(i).data_page_offset for i in range(meta.num_columns))
    size = sum(meta.column(i).total_compressed_size for i in range(meta.num_columns))
    with open(path, "r+b") as f:  # garbage over the first half of this row group's bytes only
        f.seek(start)
        f.write(np.random.default_rng(0).integers(0, 256, size // 2, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_row_group_mid_epoch(tmp_path, workers):
    path = _corrupt_row_group(tmp_path)
    loader = _loader([path], _cfg(num_workers=workers), batch_size=50)  # footers are fine
    with pytest.raises(Exception, match="bad.parquet: row group 1") as e:
        list(loader)
    assert isinstance(e.value, (ValueError, RuntimeError))
    # With the flag: the same number of batches, the bad rows are weight-0 padding.
    loader = _loader([path], _cfg(num_workers=workers, skip_bad_row_groups=True), batch_size=50)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    rows = np.concatenate([_row_ids(b) for b in batches])
    np.testing.assert_array_equal(rows, np.r_[0:100, 200:300])
    assert [(s["file"], s["row_group"], s["rows"]) for s in loader.skipped] == [(path, 1, 100)]


# --------------------------------------------------------------------------- real processes


def _rank_rows(paths: list[str], workers: int) -> dict:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = _cfg(num_workers=workers, shuffle_buffer=150)
    out = {}
    for train in (False, True):
        loader = ParquetLoader(paths, cfg, batch_size=40, rank=rank, world_size=world, train=train, seed=1)
        loader.set_epoch(1)
        batches = list(loader)
        assert all(b.labels.shape == (40,) for b in batches)
        out[train] = (len(loader), np.concatenate([_row_ids(b) for b in batches]).tolist())
    return out


def test_two_ranks_in_real_processes_with_workers(uneven):
    paths, n = uneven
    results = launch(_rank_rows, (paths, 2), nproc=2)
    for train in (False, True):
        (len0, rows0), (len1, rows1) = results[0][train], results[1][train]
        assert len0 == len1
        rows = np.array(rows0 + rows1)
        assert np.unique(rows).size == rows.size
        if train:
            assert rows.size == 2 * len0 * 40
        else:
            np.testing.assert_array_equal(np.sort(rows), np.arange(n))


# --------------------------------------------------------------------------- benchmark


def test_bench_dispatcher_and_loader_mode(tmp_path, capsys):
    from benchmarks.__main__ import main

    assert main(["nope"]) == 2
    assert "unknown benchmark mode 'nope'" in capsys.readouterr().err
    from deepfm_dist.prepare.synthetic import generate

    generate(tmp_path, train_rows=3000, val_rows=100, files_per_split=(2, 1), row_group_size=500,
             max_cardinality=100)
    assert main(["loader", "--data", str(tmp_path), "--repeats", "1", "--batch-size", "256"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert {"raw_rows_per_s", "loader_rows_per_s", "ratio"} <= set(result)
    assert "rows/s/process" in out and result["rows"] == (3000 // 256) * 256
