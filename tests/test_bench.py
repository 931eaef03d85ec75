"""Each benchmark mode runs on a tiny configuration and ends with its one-line JSON report.

ceiling and baseline run in this process; step and e2e as real torchrun jobs on 2 CPU ranks
(gloo), as launcher/bench.sh starts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compare, precision

REQUIRED = ("mode", "world_size", "samples_per_s", "samples_per_s_per_rank", "step_ms_p50", "step_ms_p90",
            "data_wait_ms_per_step", "peak_rss_mb", "peak_rss_mb_per_rank")
TINY = ["--data.num_embeddings=1000", "--model.embedding_dim=8", "--model.mlp=32,16", "--train.batch_size=256"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])  # the very last line is the JSON object


def check(result: dict, mode: str, world_size: int) -> None:
    for key in REQUIRED:
        assert key in result, key
    assert result["mode"] == mode and result["world_size"] == world_size
    assert result["samples_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert len(result["peak_rss_mb_per_rank"]) == world_size
    with open(result["json"]) as f:
        record = json.load(f)
    assert record["versions"]["torch"] and record["hardware"]["cores"] and record["commit"]


@pytest.mark.parametrize("mode", ["ceiling", "baseline"])
def test_single_process_modes(mode, capsys, tmp_path):
    from benchmarks.__main__ import main

    args = [mode, "--warmup", "2", "--steps", "3", "--threads", "1", "--out", str(tmp_path / "r.json"), *TINY]
    if mode == "baseline":
        args.append("--kernels=ours")
    assert main(args) == 0
    check(last_json(capsys.readouterr().out), mode, 1)


def torchrun(mode: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "--local-ranks-filter=0", "-m", "benchmarks", mode, "--warmup", "2", "--steps", "3", *TINY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return last_json(proc.stdout)


def test_step_on_two_ranks(tmp_path):
    result = torchrun("step", "--out", str(tmp_path / "s.json"))
    check(result, "step", 2)
    # Memory accounting: each rank reports its shards and the bound of the memory target.
    assert len(result["table_shards_mb_per_rank"]) == 2 and len(result["rss_bound_mb_per_rank"]) == 2
    assert result["threads_per_rank"] == 1
    # 2 CPU ranks use the shared-memory collectives (sharding.intra_node_comm=auto), which
    # account the time each rank was blocked on the other.
    waits = result["peer_wait_ms_per_step_per_rank"]
    assert len(waits) == 2 and all(w >= 0 for w in waits)


def test_comm_on_two_ranks(tmp_path):
    result = torchrun("comm", "--out", str(tmp_path / "c.json"))
    check(result, "comm", 2)
    kinds = [c["kind"] for c in result["collectives"]]
    assert kinds.count("all_to_all") == 4 and kinds.count("all_reduce") == 1
    per_step = sum(c["per_step"] * c["ms_mean"] for c in result["collectives"])
    # The report rounds to 3 decimals (0.0005 ms at most), which rel=1e-3 does not cover
    # once a step's collectives take under half a millisecond.
    assert result["collectives_ms_per_step"] == pytest.approx(per_step, rel=1e-3, abs=6e-4)


def test_e2e_on_two_ranks(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    result = torchrun("e2e", f"--data.train={data_dir}/train", f"--data.val={data_dir}/val",
                      f"--run_dir={tmp_path / 'run'}", "--out", str(tmp_path / "e.json"))
    check(result, "e2e", 2)
    assert result["steps"] == 3


def test_compare_ratios_and_targets():
    results = {
        "ceiling": {"samples_per_s": 80_000.0},
        "baseline": {"samples_per_s": 30_000.0},
        "step_1": {"samples_per_s": 40_000.0},
        "step_2": {"samples_per_s": 70_000.0, "samples_per_s_per_rank": 35_000.0, "batch_size_per_rank": 2048,
                   "peer_wait_ms_per_step_per_rank": [3.0, 2.0]},
        "e2e": {"samples_per_s": 66_000.0},
        "step_1_at_once": {"samples_per_s": 74_000.0, "samples_per_s_per_rank": 37_000.0},
        "memory": {"peak_rss_mb_per_rank": [3000.0, 2000.0], "rss_bound_mb_per_rank": [3200.0, 1900.0]},
    }
    r = compare.ratios(results, nproc=2, cores_1=1, cores_n=2)
    assert r["scaling_without_communication"] == pytest.approx(0.925)
    assert r["e2e_vs_ceiling"] == pytest.approx(0.825)
    assert r["e2e_vs_baseline"] == pytest.approx(2.2)
    assert r["step_per_core_scaling"] == pytest.approx(0.875)
    assert r["memory_within_bound"] is False
    assert r["step_peer_wait_ms_per_step"] == pytest.approx(2.5)
    assert r["step_peer_wait_share"] == pytest.approx(2.5 / (2048 / 35_000 * 1e3))
    table, met = compare.targets_table(r)
    assert met == {"e2e_vs_ceiling": True, "e2e_vs_baseline": True, "step_per_core_scaling": False, "memory": False}
    assert "NO" in table and "scaling with no communication" in table and "waiting for peers" in table


def _run(precision_: str, seed: int, auc: float, logloss: float = 0.47) -> dict:
    return {"precision": precision_, "seed": seed, "val_auc": auc, "val_logloss": logloss, "val_ne": logloss / 0.56,
            "val_calibration": 1.0, "train_samples_per_s": 100.0 if precision_ == "fp32" else 150.0}


def test_precision_verdict_compares_the_shift_with_the_seeds_spread():
    fp32 = [_run("fp32", s, auc) for s, auc in enumerate((0.770, 0.772, 0.771))]
    near = precision.summarize(fp32 + [_run("bf16", s, auc) for s, auc in enumerate((0.771, 0.773, 0.772))])
    assert near["verdict"]["val_auc"]["unchanged"] and near["unchanged"]
    assert near["verdict"]["val_auc"]["allowed"] == pytest.approx(0.002)
    assert near["speedup"] == pytest.approx(1.5)
    far = precision.summarize(fp32 + [_run("bf16", s, auc) for s, auc in enumerate((0.760, 0.761, 0.762))])
    assert not far["verdict"]["val_auc"]["unchanged"] and not far["unchanged"]
    assert far["verdict"]["val_auc"]["diff"] == pytest.approx(-0.010)


def test_precision_runs_both_precisions_per_seed(tiny_data, tmp_path):
    """Two seeds x fp32/bf16 on one rank each; on a CPU without native bf16 the bf16 runs go
    through torch's kernels (--emulate-bf16), on one with it natively."""
    data_dir, _ = tiny_data
    out, runs = tmp_path / "p.json", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "precision", "--data", str(data_dir), "--seeds", "0,1",
                           "--nproc", "1", "--emulate-bf16", "--out", str(out), "--runs-dir", str(runs), *TINY,
                           "--train.max_steps=6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert last_json(proc.stdout)["mode"] == "precision"
    result = json.loads(out.read_text())
    done = result["datasets"][str(data_dir)]["runs"]
    assert [(r["precision"], r["seed"]) for r in done] == [("fp32", 0), ("bf16", 0), ("fp32", 1), ("bf16", 1)]
    for r in done:  # each run trained in the precision it is listed under
        config = json.loads(open(os.path.join(r["run_dir"], "summary.json")).read())["config"]
        assert config["train"]["precision"] == r["precision"] and config["train"]["seed"] == r["seed"]
    assert set(result["datasets"][str(data_dir)]["summary"]["verdict"]) == set(precision.QUALITY)


def test_precision_needs_the_flag_where_bf16_is_not_native(monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        precision.main(["--seeds", "0,1"])
    assert "--emulate-bf16" in capsys.readouterr().err


def test_reference_models_learn_the_planted_signal_and_are_scored_like_ours(tiny_data):
    """Both references beat chance clearly on the planted set (a misaligned label or feature
    would give ~0.5), and their figures are deepfm_dist.metrics' on their own predictions."""
    from benchmarks import references
    from deepfm_dist.config import DataConfig

    data, oracle = tiny_data
    cfg = DataConfig(train=[f"{data}/train"], val=[f"{data}/val"], num_embeddings=1000)
    train, val = references.Rows(cfg.train, cfg), references.Rows(cfg.val, cfg)
    assert (len(train), len(val)) == (24_000, 6_000)
    lr = references.hashed_lr(train, val, cfg, seed=0, batch_size=256, epochs=1, lr=0.05)
    deepctr = references.deepctr_deepfm(train, val, cfg, seed=0, batch_size=256, epochs=1, embedding_dim=8,
                                        mlp=[32, 16])
    for r in (lr, deepctr):
        assert 0.6 < r["val_auc"] <= oracle["val_auc"] + 0.01 and r["val_ne"] < 1.0
    with pytest.raises(ValueError, match="no Parquet files"):
        references.Rows([str(data)], cfg)


def test_quality_bench_trains_every_model_on_the_same_tsv_split(tmp_path):
    """Criteo TSV folders are converted once; ours runs through the launcher at global batch /
    ranks per rank and scores the same validation rows the references score."""
    from deepfm_dist.prepare.criteo_like import SHAPES, generate

    generate(tmp_path / "raw", scale=6_000 / SHAPES["criteo-kaggle"].rows, seed=3)
    lines = (tmp_path / "raw" / "train.txt").read_text().splitlines(keepends=True)
    for split, part in (("train", lines[:5_000]), ("val", lines[5_000:])):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / f"{split}.txt").write_text("".join(part))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "quality", "--data", str(tmp_path / "data"), "--seeds", "0,1",
         "--nproc", "2", "--batch-size", "512", "--models", "ours,lr", "--runs-dir", str(tmp_path / "runs"),
         "--out", str(tmp_path / "q.json"), "--data.num_embeddings=1000", "--model.mlp=32,16",
         "--model.embedding_dim=8"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = last_json(proc.stdout)
    assert line["mode"] == "quality" and set(line["datasets"][str(tmp_path / "data")]) == {"ours", "lr"}
    result = json.loads((tmp_path / "q.json").read_text())["datasets"][str(tmp_path / "data")]
    ours = result["models"]["ours"]
    for run in ours["runs"]:
        s = json.loads(open(os.path.join(run["run_dir"], "summary.json")).read())
        assert s["batch_size_per_rank"] == 256 and s["val_rows"] == 1_000 and s["config"]["model"]["mlp"] == [32, 16]
        assert s["val_auc"] == run["val_auc"]
    assert [r["seed"] for r in result["models"]["lr"]["runs"]] == [0, 1]
    spread = ours["summary"]["val_auc"]
    assert spread["spread"] == pytest.approx(abs(ours["runs"][0]["val_auc"] - ours["runs"][1]["val_auc"]))
    assert result["ours_minus"]["lr"]["auc"] == pytest.approx(
        spread["mean"] - result["models"]["lr"]["summary"]["val_auc"]["mean"])
