"""deepfm-predict: a checkpoint on 2 real ranks, an exported model.pt as a world of one, and the
bad-input errors (all found before any collective).

One tiny model is trained once (2 gloo ranks); the data to score is the planted validation set
plus id columns. The reference is the plain single-process model on the same rows.
"""

from __future__ import annotations

import json
import math
import os
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import deepfm_dist.train
from deepfm_dist import predict
from deepfm_dist.data import ParquetLoader, resolve_parquet_paths
from deepfm_dist.export import build_plain_model, consolidate
from deepfm_dist.export import main as export_main
from deepfm_dist.metrics import exact_auc, logloss
from tests.conftest import small_args
from tests.distributed_helpers import launch


def _session(i: int):
    return None if i % 7 == 0 else i % 50  # an id column with nulls


def _with_ids(src_dir, dst_dir, drop=()) -> list[str]:
    """Copies of ``src_dir``'s Parquet files with a unique ``request_id`` (string) and a
    ``session`` (int32, nulls) column, without the ``drop`` columns; same row groups."""
    os.makedirs(dst_dir, exist_ok=True)
    start, out = 0, []
    for path in resolve_parquet_paths(str(src_dir), "test"):
        table = pq.read_table(path)
        idx = range(start, start + table.num_rows)
        table = table.append_column("request_id", pa.array([f"req-{i}" for i in idx]))
        table = table.append_column("session", pa.array([_session(i) for i in idx], pa.int32()))
        table = table.drop_columns(list(drop))
        out.append(str(dst_dir / os.path.basename(path)))
        pq.write_table(table, out[-1], row_group_size=1_000)
        start += table.num_rows
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """(checkpoint root, exported model.pt, labelled id files, unlabelled id files, work dir)."""
    data, _ = tiny_data
    root = tmp_path_factory.mktemp("predict")
    run = root / "run"
    launch(deepfm_dist.train.main, (small_args(data, run, "--train.epochs=1", "--train.max_steps=12"),), nproc=2)
    model_pt = root / "model.pt"
    assert export_main([str(run / "checkpoints"), "--out", str(model_pt)]) == 0
    labelled = _with_ids(data / "val", root / "ids")
    unlabelled = _with_ids(data / "val", root / "ids_nolabel", drop=["label"])
    return run / "checkpoints", model_pt, labelled, unlabelled, root


def _reference(checkpoints, files) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(logits, labels, request ids) of every row in input order, from the plain model."""
    state, cfg, _ = consolidate(str(checkpoints))
    model = build_plain_model(cfg)
    model.load_state_dict(state)
    model.eval()
    loader = ParquetLoader(files, cfg.data, batch_size=1000, rank=0, world_size=1, train=False, seed=0)
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            keep = batch.weights > 0
            _, (_, lg, lb, _) = model(batch)
            logits.append(lg[keep])
            labels.append(lb[keep])
    ids = pq.read_table(files, columns=["request_id"]).column("request_id").to_pylist()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), ids


def _read_out(out, world: int) -> pa.Table:
    names = sorted(os.listdir(out))
    assert names == ["_summary.json"] + [f"part-{r:05d}.parquet" for r in range(world)], names
    table = pq.read_table(out)  # the folder reads as one data set (the summary is skipped)
    assert table.equals(pa.concat_tables([pq.read_table(out / f"part-{r:05d}.parquet") for r in range(world)]))
    return table


def _check_predictions(table: pa.Table, logits: np.ndarray, ids: list[str]) -> None:
    got = table.column("request_id").to_pylist()
    # Every input row exactly once, with its id, in input order (rank 0's share first).
    assert got == ids
    assert table.column("session").to_pylist() == [_session(int(i.split("-")[1])) for i in got]
    assert table.schema.field("session").type == pa.int32()
    assert table.schema.field("probability").type == pa.float32()
    np.testing.assert_allclose(table.column("logit").to_numpy(), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(table.column("probability").to_numpy(), torch.sigmoid(torch.from_numpy(logits)).numpy(),
                               atol=1e-5, rtol=0)


def test_checkpoint_on_two_ranks_and_exported_model_on_one(trained, tmp_path):
    checkpoints, model_pt, labelled, unlabelled, root = trained
    logits, labels, ids = _reference(checkpoints, labelled)
    assert len(ids) == 6_000

    # A checkpoint folder, 2 ranks: sharded model, exact metrics over both ranks' rows.
    out = tmp_path / "ckpt"
    args = ["--model", str(checkpoints), "--data", str(root / "ids"), "--out", str(out),
            "--id-columns", "request_id,session"]
    assert launch(predict.main, (args,), nproc=2) == {0: 0, 1: 0}
    table = _read_out(out, world=2)
    _check_predictions(table, logits, ids)
    summary = json.loads((out / "_summary.json").read_text())
    written = torch.from_numpy(table.column("logit").to_numpy())
    assert summary["rows"] == 6_000 and summary["rows_per_rank"] == [3_000, 3_000]
    assert summary["model_kind"] == "checkpoint" and summary["step"] == 12 and summary["world_size"] == 2
    assert summary["label"] == "label" and summary["files"] == labelled
    assert math.isclose(summary["auc"], exact_auc(written, torch.from_numpy(labels)), rel_tol=1e-12)
    assert math.isclose(summary["logloss"], logloss(written, torch.from_numpy(labels)), rel_tol=1e-9)
    assert math.isclose(summary["auc"], exact_auc(torch.from_numpy(logits), torch.from_numpy(labels)), abs_tol=1e-4)
    assert math.isclose(summary["label_mean"], labels.sum(dtype=np.float64) / 6_000, rel_tol=1e-12)

    # The exported model.pt, a world of one (no torchrun), on files without labels; it
    # replaces a previous prediction only when told to.
    out = tmp_path / "exported"
    out.mkdir()
    (out / "part-00003.parquet").write_bytes(b"stale")
    args = ["--model", str(model_pt), "--data", *unlabelled, "--out", str(out),
            "--id-columns", "request_id,session", "--batch-size", "700", "--overwrite"]
    threads = torch.get_num_threads()
    with mock.patch.dict(os.environ):  # init_distributed sets RANK etc. for a world of one
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        assert predict.main(args) == 0
    torch.set_num_threads(threads)
    table = _read_out(out, world=1)
    _check_predictions(table, logits, ids)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["model_kind"] == "exported" and summary["step"] == 12 and summary["rows"] == 6_000
    assert summary["label"] is None and "auc" not in summary and summary["batch_size_per_rank"] == 700


def _fails(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        predict.main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_named_before_anything_starts(trained, tmp_path, capsys):
    checkpoints, model_pt, labelled, unlabelled, root = trained
    ok = ["--model", str(checkpoints), "--data", str(root / "ids"), "--out", str(tmp_path / "out")]

    err = _fails(capsys, ok + ["--id-columns", "request_id,user_id"])
    assert "missing pass-through column 'user_id'" in err and labelled[0] in err, err
    err = _fails(capsys, ok + ["--data", str(tmp_path / "nope")])
    assert "--data" in err and "nope" in err and "matched no Parquet file" in err, err
    err = _fails(capsys, ok + ["--id-columns", "request_id,probability"])
    assert "--id-columns" in err and "probability" in err, err
    assert _fails(capsys, ok + ["--batch-size", "0"])  # argparse names the flag

    # Not a model: a missing path, a folder with no checkpoint, a file that is not an export.
    rest = ok[2:]
    err = _fails(capsys, ["--model", str(tmp_path / "missing"), *rest])
    assert "--model" in err and "no such file or directory" in err, err
    err = _fails(capsys, ["--model", str(tmp_path), *rest])
    assert "--model" in err and "neither a checkpoint" in err, err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    err = _fails(capsys, ["--model", str(junk), *rest])
    assert "junk.pt.json is missing" in err, err
    (tmp_path / "junk.pt.json").write_text((root / "model.pt.json").read_text())
    err = _fails(capsys, ["--model", str(junk), *rest])
    assert "not a model.pt written by deepfm-export" in err, err

    # Data that does not fit the model: a sparse column missing; labels in some files only.
    broken = tmp_path / "broken"
    _with_ids(root / "ids_nolabel", broken, drop=["C7"])
    err = _fails(capsys, ["--model", str(model_pt), "--data", str(broken), "--out", str(tmp_path / "o")])
    assert "missing sparse column 'C7'" in err and str(broken) in err, err
    err = _fails(capsys, ["--model", str(model_pt), "--data", labelled[0], unlabelled[1], "--out", str(tmp_path / "o")])
    assert f"{unlabelled[1]}: no label column 'label'" in err, err
    assert not (tmp_path / "o").exists()  # nothing was created

    # A previous prediction is kept unless --overwrite.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_summary.json").write_text("{}")
    err = _fails(capsys, ok)
    assert "--out" in err and "--overwrite" in err, err


def test_out_apart_from_the_input_data(trained, tmp_path, capsys):
    checkpoints, model_pt, labelled, unlabelled, root = trained
    data = tmp_path / "data"
    files = _with_ids(root / "ids", data)
    before = {f: os.path.getsize(f) for f in files}
    model = ["--model", str(model_pt)]
    # --out is the data folder (with and without --overwrite), lies inside it, or contains it.
    for out, extra, why in [(data, [], "is the input"), (data, ["--overwrite"], "is the input"),
                            (data / "preds", [], "lies inside the input"), (tmp_path, ["--overwrite"], "contains the input")]:
        err = _fails(capsys, [*model, "--data", str(data), "--out", str(out), *extra])
        assert "--out" in err and why in err, err
    # The same with a file and a glob naming the data.
    err = _fails(capsys, [*model, "--data", files[0], "--out", str(data), "--overwrite"])
    assert "contains the input" in err and files[0] in err, err
    err = _fails(capsys, [*model, "--data", str(data / "*.parquet"), "--out", str(data / "p")])
    assert "lies inside the input" in err, err
    assert {f: os.path.getsize(f) for f in files} == before  # nothing touched
    assert not (data / "preds").exists() and not (data / "p").exists()


def test_export_refuses_to_overwrite_without_the_flag(trained, tmp_path, capsys):
    checkpoints, *_ = trained
    target = tmp_path / "data.parquet"
    target.write_bytes(b"precious")
    assert export_main([str(checkpoints), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(target) in err, err
    assert target.read_bytes() == b"precious" and not (tmp_path / "data.parquet.json").exists()
    assert export_main([str(checkpoints), "--out", str(target), "--overwrite"]) == 0
    assert torch.load(target, weights_only=True)


def _crafted_checkpoint(checkpoints, tmp_path, marker):
    """A copy of a real checkpoint whose DCP index runs ``touch marker`` when unpickled."""
    import pickle
    import shutil

    from deepfm_dist import checkpoint as ckpt

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad" / "step_000000012"
    shutil.copytree(ckpt.latest(str(checkpoints)), bad)
    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    return bad


def test_a_checkpoint_cannot_run_code(trained, tmp_path, capsys):
    from deepfm_dist import checkpoint as ckpt

    checkpoints, _, labelled, _, root = trained
    marker = tmp_path / "pwned"
    bad = _crafted_checkpoint(checkpoints, tmp_path, marker)
    # deepfm-export, deepfm-predict, and the loader every resume goes through.
    assert export_main([str(bad), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{bad / '.metadata'}: refused" in err and "system" in err, err
    err = _fails(capsys, ["--model", str(bad), "--data", str(root / "ids"), "--out", str(tmp_path / "o")])
    assert "refused" in err and str(bad) in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused"):
        ckpt.read_dcp_metadata(str(bad))
    with pytest.raises(ckpt.UnsafeCheckpointError):
        consolidate(str(bad))
    assert not marker.exists()
    # The genuine checkpoint passes the same reader.
    assert ckpt.read_dcp_metadata(ckpt.latest(str(checkpoints))).state_dict_metadata


def test_checkpoint_byte_items_load_only_plain_data(tmp_path):
    """DCP stores non-tensor values as pickled byte items; ``dcp_load`` reads them weights-only."""
    import torch.distributed.checkpoint as dcp

    from deepfm_dist import checkpoint as ckpt

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dcp.save({"t": torch.ones(2), "ok": {"step": 3, "name": "x"}}, checkpoint_id=str(tmp_path / "good"))
    got = {"t": torch.zeros(2), "ok": {"step": 0, "name": ""}}
    ckpt.dcp_load(got, str(tmp_path / "good"))
    assert torch.equal(got["t"], torch.ones(2)) and got["ok"] == {"step": 3, "name": "x"}

    dcp.save({"t": torch.ones(2), "evil": Payload()}, checkpoint_id=str(tmp_path / "bad"))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused: item 'evil'"):
        ckpt.dcp_load({"t": torch.zeros(2), "evil": None}, str(tmp_path / "bad"))
    assert not marker.exists()


def test_a_damaged_shard_is_named_before_any_output(trained, tmp_path, capsys):
    """A truncated shard: deepfm-predict and deepfm-export answer in one line naming the file."""
    import shutil

    from deepfm_dist import checkpoint as ckpt

    checkpoints, _, _, _, root = trained
    bad = tmp_path / "bad" / "step_000000012"
    shutil.copytree(ckpt.latest(str(checkpoints)), bad)
    shard = sorted(bad.glob("*.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    err = _fails(capsys, ["--model", str(bad), "--data", str(root / "ids"), "--out", str(tmp_path / "o")])
    assert f"data file {shard.name} is truncated" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    assert export_main([str(bad), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bad}: data file {shard.name} is truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
