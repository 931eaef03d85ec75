"""The real entry point on 2 CPU ranks (gloo) on a tiny planted Parquet data set."""

from __future__ import annotations

import json

import pytest

from deepfm_dist.train import main
from tests.conftest import small_args
from tests.distributed_helpers import launch


def _bf16_cpu() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("precision", [
    "fp32",
    pytest.param("bf16", marks=pytest.mark.skipif(not _bf16_cpu(), reason="no native bf16 on this CPU")),
])
def test_main_on_two_ranks_learns_planted_signal(tiny_data, tmp_path, precision):
    data_dir, oracle = tiny_data
    run_dir = tmp_path / "run"
    results = launch(main, (small_args(data_dir, run_dir, "--train.log_every=20", f"--train.precision={precision}"),),
                     nproc=2)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["train"]["precision"] == precision
    for key in ("world_size", "steps", "train_samples", "train_samples_per_s", "val_auc", "val_logloss"):
        assert key in summary, key
    assert summary["world_size"] == 2
    steps_per_epoch = (24_000 // 2) // 256
    assert summary["steps"] == 2 * steps_per_epoch
    assert summary["train_samples"] == summary["steps"] * 256 * 2
    assert summary["val_rows"] == 6_000, "every validation row is scored exactly once across ranks"
    assert summary["train_samples_per_s"] > 0
    # Planted data: clearly above chance, and never above the oracle by more than noise.
    assert 0.62 < summary["val_auc"] <= oracle["val_auc"] + 0.02, (summary["val_auc"], oracle["val_auc"])
    # Every rank returned the same metrics: computed over the union of both ranks' rows.
    assert results[0]["val_auc"] == results[1]["val_auc"] == summary["val_auc"]
    assert (run_dir / "plan.json").exists()


def test_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        main([f"--data.train={tmp_path}/nope/*.parquet", f"--data.val={tmp_path}", f"--run_dir={tmp_path}/r"])
    assert "data.train" in str(e.value) and "nope" in str(e.value)


def test_too_little_data_for_one_batch_per_rank(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    args = small_args(data_dir, tmp_path / "r") + ["--train.batch_size=100000"]
    with pytest.raises(ValueError, match="train.batch_size"):
        main(args)
