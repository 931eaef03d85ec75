"""The Criteo-scale rehearsal at a tiny scale, as a journey: ``./launcher/bench.sh scale``.

Every stage is the command a user runs (``deepfm-gen-criteo``, ``prepare-criteo``,
``launcher/train.sh --config criteo_kaggle`` with the preset's full 33.8M-row tables, the same with
``--data.vocab``, ``--resume``, ``deepfm-predict`` under torchrun, ``deepfm-export``); only the
rows are scaled down (0.001 of Kaggle: 45,841 lines). The throughput stage is left out: speed is
measured by the benchmark, not by the suite.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["generate", "prepare", "train-hash", "train-vocab", "resume", "predict", "export"]


def test_the_pipeline_at_scale_0_001(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "launcher" / "bench.sh"), "scale", "--scale", "0.001", "--dir", str(tmp_path),
         "--stages", ",".join(STAGES), "--resume-steps", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == STAGES and all(s["rc"] == 0 for s in stages.values())
    assert result["ok"] and result["memory_within_plan"] and result["rows"] == 45_841
    assert 0.7 < result["oracle_auc"] < 0.9 and 0.0 < result["val_auc"] < 1.0

    # Every process is followed: the converter's workers, and both ranks of each 2-rank stage.
    procs = lambda name: [p["process"] for p in stages[name]["peak_rss_mb"]]  # noqa: E731
    assert any(p.endswith("/worker") for p in procs("prepare"))
    for name in ("train-hash", "train-vocab", "resume", "predict"):
        assert {"rank0", "rank1"} <= set(procs(name)), (name, procs(name))
    # The hashed run's plan holds the preset's full tables (~1.1-1.6 GB per rank with the
    # optimizer state), and each rank's peak is within the bound the report states.
    hashed = stages["train-hash"]
    assert sum(hashed["plan_mb"]) > 2000 and hashed["memory_within_plan"]
    assert stages["train-vocab"]["plan_mb"] and sum(stages["train-vocab"]["plan_mb"]) < 100
    assert stages["resume"]["steps"] == hashed["steps"] + 2
    assert stages["predict"]["test_auc"] is not None
    assert (tmp_path / "model.pt").is_file() and stages["export"]["disk_mb"] > 2000

    # The converter's vocabulary against the generator's targets: every column counted, no more
    # distinct values in train than the whole file was drawn to hold.
    vocab = stages["prepare"]["vocab"]
    assert len(vocab) == 26
    meta = json.loads((tmp_path / "raw" / "criteo_like.json").read_text())
    for column, v in vocab.items():
        assert 0 < v["kept_at_10"] <= v["distinct_train"] <= meta["columns"][column]["target_distinct"] * 1.1 + 2
