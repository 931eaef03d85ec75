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


def main(args: list[str]) -> dict:
    """deepfm-train in this process, a world of one on a fresh port each time."""
    import os

    try:
        return _main(args)
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
    import subprocess
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
    # Run again: every day is done, nothing is retrained, the same table comes back.
    mtime = (run / "day_1" / "summary.json").stat().st_mtime
    done = subprocess.run([sys.executable, "-m", "deepfm_dist.days", *args], capture_output=True, text=True,
                          env={**env, "NPROC": "1"})
    assert done.returncode == 0, done.stderr
    assert (run / "day_1" / "summary.json").stat().st_mtime == mtime
    assert json.loads((run / "days.json").read_text())["days"] == table
