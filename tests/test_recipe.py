"""The Criteo recipe's training features, in-process on one rank (the loop is the same on
more): the best checkpoint and early stopping on a planted set whose second epoch overfits,
warm start (--init_from) from it, and a checkpoint of another layout refused."""

from __future__ import annotations

import json

import pytest
import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.export import consolidate, resolve_checkpoint
from deepfm_dist.train import main as _main
from tests.conftest import small_args

WORLD_OF_ONE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(args: list[str], fn=None):
    """deepfm-train (or ``fn``) in this process, a world of one on a fresh port each time."""
    import os

    try:
        return (fn or _main)(args)
    finally:
        for key in WORLD_OF_ONE:
            os.environ.pop(key, None)

# A learning rate that overfits the small planted set in its second epoch (val AUC drops).
OVERFIT = ["--optimizer.embedding_lr=0.5", "--optimizer.dense_lr=0.01", "--train.progress=false"]


@pytest.fixture(scope="module")
def overfit_run(tiny_data, tmp_path_factory):
    data, _ = tiny_data
    run = tmp_path_factory.mktemp("overfit") / "run"
    summary = main(small_args(data, run, "--train.epochs=6", "--train.early_stop_patience=1", *OVERFIT))
    return run, summary


def test_best_checkpoint_and_early_stopping(overfit_run):
    run, s = overfit_run
    aucs = [e["val_auc"] for e in s["evals"]]
    # Stopped at the first evaluation that did not improve, long before 6 epochs.
    assert s["early_stopped"] and len(aucs) == 2 and aucs[1] <= aucs[0], aucs
    best = json.loads((run / "checkpoints" / ckpt.BEST).read_text())
    assert best == s["best"] and best["step"] == s["evals"][0]["step"] and best["value"] == aucs[0]
    assert best["metric"] == "auc" and best["evals_since"] == 1
    # The end's checkpoint is the latest; the folder resolves to the best for predict / export.
    assert ckpt.latest(str(run / "checkpoints")).endswith(f"step_{s['steps']:09d}")
    assert resolve_checkpoint(str(run / "checkpoints")).endswith(best["checkpoint"])
    assert ckpt.resolve(str(run / "checkpoints")) == str(run / "checkpoints" / best["checkpoint"])


def test_warm_start_begins_a_new_run_from_the_best_weights(overfit_run, tiny_data, tmp_path):
    run, s = overfit_run
    data, _ = tiny_data
    # Learning rates too small to move a weight: after one step the new run holds the weights it
    # started from.
    frozen = ["--optimizer.embedding_lr=1e-12", "--optimizer.dense_lr=1e-12", "--train.progress=false"]
    b = main(small_args(data, tmp_path / "b", f"--init_from={run}/checkpoints", "--train.max_steps=1", *frozen))
    assert b["steps"] == 1 and b["train_samples"] == 256  # step 0 of a new run, its own schedule
    start, _, _ = consolidate(str(run / "checkpoints"))  # the best checkpoint
    after, _, _ = consolidate(str(tmp_path / "b" / "checkpoints"))
    assert start.keys() == after.keys()
    for k in start:
        if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics move with any forward
            assert torch.allclose(start[k].float(), after[k].float(), atol=1e-6), k
    fresh, _, _ = consolidate(ckpt.latest(str(run / "checkpoints")))  # the end (overfit) model differs
    assert any(not torch.allclose(start[k].float(), fresh[k].float(), atol=1e-3) for k in start)
    # With the optimizers' state too.
    c = main(small_args(data, tmp_path / "c", f"--init_from={run}/checkpoints", "--init_optimizer",
                        "--train.max_steps=2", *frozen))
    assert c["steps"] == 2


def test_warm_start_refuses_a_checkpoint_of_another_layout(overfit_run, tiny_data, tmp_path):
    run, _ = overfit_run
    data, _ = tiny_data
    with pytest.raises(ValueError, match=r"--init_from .*tables \(rows x width\): t_C1: 1000x12 in the checkpoint, "
                                         r"1000x20 here"):
        main(small_args(data, tmp_path / "d", f"--init_from={run}/checkpoints", "--model.embedding_dim=16",
                        "--train.progress=false"))
    with pytest.raises(SystemExit):  # init_optimizer without init_from: a config error
        main(small_args(data, tmp_path / "e", "--init_optimizer"))


def test_day_by_day_trains_each_day_from_the_previous_and_scores_the_next(tiny_data, tmp_path):
    """Three tiny days (the planted set's three train files): day 0 from scratch, day 1 from day
    0's model, each evaluated on the following day; one table of the days' metrics."""
    import os
    import sys

    from deepfm_dist.days import main as days_main

    data, _ = tiny_data
    run = tmp_path / "days"
    args = ["--days", "0-2", "--day-glob", f"{data}/train/part-0000{{day}}.parquet", "--run-dir", str(run), "--",
            *[a for a in small_args(data, run, "--train.epochs=1", "--train.progress=false")
              if not a.startswith(("--data.train", "--data.val", "--run_dir"))]]
    env = {k: v for k, v in os.environ.items() if k not in WORLD_OF_ONE}
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update({**env, "NPROC": "1", "VENV": os.path.dirname(os.path.dirname(sys.executable))})
    try:
        assert days_main(args) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    table = json.loads((run / "days.json").read_text())["days"]
    assert [(r["day"], r["eval_day"]) for r in table] == [(0, 1), (1, 2)]
    assert all(r["val_rows"] == 8_000 and 0.5 < r["val_auc"] < 1 and r["val_ne"] > 0 for r in table)
    day1 = json.loads((run / "day_1" / "summary.json").read_text())
    assert day1["config"]["init_from"] == str(run / "day_0" / "checkpoints") and day1["steps"] == table[1]["steps"]
    assert day1["config"]["data"]["val"] == [f"{data}/train/part-00002.parquet"]
    # Run again: every day is done, nothing is retrained (no launcher runs), the same table comes back.
    mtime = (run / "day_1" / "summary.json").stat().st_mtime
    assert days_main([*args[:6], "--launcher", "/bin/false", *args[6:]]) == 0
    assert (run / "day_1" / "summary.json").stat().st_mtime == mtime
    assert json.loads((run / "days.json").read_text())["days"] == table


def test_criteo_recipe_with_a_vocabulary_end_to_end(tmp_path):
    """Kaggle-format TSV -> prepare-criteo --split kaggle --vocab-threshold -> train the
    deepfm_criteo_x1 preset with data.vocab (table sizes from the manifest) -> predict (AUC, NE,
    calibration) on the test split; a changed vocabulary at prediction and a column without one
    are refused by name."""
    import os

    import pyarrow.parquet as pq

    from deepfm_dist import predict
    from deepfm_dist.data.vocab import VocabError, resolve, vocab_dir
    from deepfm_dist.config import DataConfig
    from deepfm_dist.prepare.criteo import main as prepare
    from deepfm_dist.prepare.criteo_like import SHAPES, generate

    generate(tmp_path / "raw", scale=12_000 / SHAPES["criteo-kaggle"].rows, seed=5)
    tsv = tmp_path / "raw" / "train.txt"
    out = tmp_path / "kaggle"
    assert prepare(["--input", str(tsv), "--output", str(out), "--split", "kaggle", "--vocab-threshold", "2",
                    "--workers", "1", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = manifest["vocab"]["num_embeddings_per_feature"]
    run = tmp_path / "run"
    # The published-recipe preset, scaled down by data and steps; its table optimizer, Adam, is
    # GPU-only (FBGEMM), so CPU ranks take row-wise Adagrad as the preset says, without the
    # embedding weight decay that FBGEMM's CPU kernel would ignore.
    s = main(["--config", "deepfm_criteo_x1", f"--data.train={out}/train", f"--data.val={out}/val",
              f"--run_dir={run}", f"--data.vocab={out}", "--optimizer.embedding=rowwise_adagrad",
              "--optimizer.embedding_weight_decay=0",
              "--optimizer.embedding_lr=0.05", "--train.epochs=2", "--train.global_batch_size=512",
              "--train.progress=false"])
    assert s["config"]["data"]["num_embeddings_per_feature"] == sizes and len(s["config"]["data"]["vocab_sha256"]) == 64
    assert all(k in s for k in ("val_auc", "val_ne", "val_calibration"))
    plan = json.loads((run / "plan.json").read_text())
    assert [t["rows"] for t in plan["tables"]] == sizes  # the tables are the vocabulary's size
    # Ids really go through the vocabulary: a frequent value's row is its id.
    vocab_c1 = pq.read_table(os.path.join(vocab_dir(str(out)), "C1.parquet")).to_pydict()
    cfg = resolve(DataConfig(train=[f"{out}/train"], val=[f"{out}/val"], vocab=str(out)))
    from deepfm_dist.data.columns import Layout, convert

    table = pq.read_table(next((out / "train").glob("*.parquet")))
    rows = convert(table, Layout.from_config(cfg), "t")
    top = vocab_c1["value"][0]
    raw_c1 = table.column("C1").to_pylist()
    at = raw_c1.index(top) if top in raw_c1 else None
    assert at is not None and rows.ids[0][at] == vocab_c1["id"][0] == 1
    # A preset's hashed table sizes (criteo_kaggle's C9 has 3 rows) give way to the vocabulary's.
    hashed = [3] * len(sizes)
    assert resolve(DataConfig(train=["x"], val=["x"], vocab=str(out), num_embeddings_per_feature=hashed)
                   ).num_embeddings_per_feature == sizes
    # Predict on the test split with the model's vocabulary: metrics reported.
    preds = tmp_path / "preds"
    assert main(["--model", str(run / "checkpoints"), "--data", f"{out}/test", "--out", str(preds)], predict.main) == 0
    summary = json.loads((preds / "_summary.json").read_text())
    assert summary["rows"] == manifest["splits"]["test"]["rows"] and {"auc", "ne", "calibration"} <= set(summary)
    # The vocabulary changed under the same path: prediction stops naming both hashes.
    c2 = os.path.join(vocab_dir(str(out)), "C2.parquet")
    t = pq.read_table(c2)
    pq.write_table(t.slice(0, t.num_rows - 1), c2)
    with pytest.raises(SystemExit):
        main(["--model", str(run / "checkpoints"), "--data", f"{out}/test", "--out", str(tmp_path / "p2")], predict.main)
    with pytest.raises(VocabError, match="not the vocabulary this model was trained with"):
        resolve(DataConfig(train=["x"], val=["x"], vocab=str(out), vocab_sha256=s["config"]["data"]["vocab_sha256"]))
    os.remove(os.path.join(vocab_dir(str(out)), "C26.parquet"))
    with pytest.raises(VocabError, match="no vocabulary for column C26"):
        resolve(DataConfig(train=["x"], val=["x"], vocab=str(out)))
