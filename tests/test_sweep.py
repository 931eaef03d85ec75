"""deepfm-sweep: trials through the real launcher, skipped when finished; ranking over seeds; the
best configuration as TOML; random search; one trial per node under Slurm (a recording srun)."""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib

import pytest

from deepfm_dist import sweep
from deepfm_dist.config import build_config, load_config, to_toml
from tests.conftest import small_args


def test_grid_through_the_launcher_then_a_rerun_skips_finished_runs(tiny_data, tmp_path, capsys):
    data, _ = tiny_data
    out = tmp_path / "sweep"
    run_args = [a for a in small_args(data, tmp_path / "unused", "--train.epochs=1", "--checkpoint.at_end=false",
                                      "--train.progress=false", "--train.tensorboard=false")
                if not a.startswith("--run_dir")]
    argv = ["--out", str(out), "--grid", "optimizer.embedding_lr=0.01,0.1", "--seeds", "0", "--", *run_args]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert "2 trials x 1 seeds = 2 runs; 0 finished before, 2 to run" in first
    result = json.loads((out / "sweep.json").read_text())
    trials = result["trials"]
    assert {t["params"]["optimizer.embedding_lr"] for t in trials} == {"0.01", "0.1"}
    aucs = [t["val_auc"]["mean"] for t in trials]
    assert aucs == sorted(aucs, reverse=True) and result["best"] == trials[0]["trial"]
    for t in trials:  # each is an ordinary run with its own summary, at its own rate
        s = json.loads((out / "trials" / t["trial"] / "seed_0" / "summary.json").read_text())
        assert s["config"]["optimizer"]["embedding_lr"] == float(t["params"]["optimizer.embedding_lr"])
        assert s["val_auc"] == t["runs"]["0"]["val_auc"]
    best = build_config(tomllib.loads((out / "best.toml").read_text()))
    assert best.optimizer.embedding_lr == float(trials[0]["params"]["optimizer.embedding_lr"])
    assert best.model.mlp == [32, 16] and best.data.num_embeddings == 1000  # the run arguments are in it
    mtime = (out / "trials" / trials[0]["trial"] / "seed_0" / "summary.json").stat().st_mtime
    assert sweep.main(argv) == 0
    assert "2 finished before, 0 to run" in capsys.readouterr().out
    assert (out / "trials" / trials[0]["trial"] / "seed_0" / "summary.json").stat().st_mtime == mtime


FAKE_TRAIN = """#!{python}
# A stand-in for launcher/train.sh: records its arguments and writes a summary whose AUC is a
# known function of the rate and the seed; the rate 0.3 fails.
import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
lr, seed = float(args["optimizer.embedding_lr"]), int(args["train.seed"])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "start": time.time(), "node": os.environ.get("FAKE_NODE")}}) + "\\n")
time.sleep(0.5)
if lr == 0.3:
    sys.exit(3)
os.makedirs(args["run_dir"], exist_ok=True)
auc = 0.7 - abs(lr - 0.02) + 0.001 * seed
json.dump({{"val_auc": auc, "val_logloss": 0.5 + abs(lr - 0.02), "val_ne": 0.9, "val_calibration": 1.0,
           "steps": 10, "train_samples_per_s": 1.0}}, open(os.path.join(args["run_dir"], "summary.json"), "w"))
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Records srun's options, then runs the command (as one task on one node would).
echo "$*" >> "$FAKE_SRUN_LOG"
while [[ "$1" == --* ]]; do shift; done
FAKE_NODE=node$RANDOM exec "$@"
"""


def _executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_ranking_over_seeds_failures_and_one_trial_per_node_under_slurm(tmp_path, monkeypatch, capsys):
    train = _executable(tmp_path / "train.py", FAKE_TRAIN.format(python=sys.executable))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _executable(bindir / "srun", FAKE_SRUN)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "runs.jsonl"))
    monkeypatch.setenv("FAKE_SRUN_LOG", str(tmp_path / "srun.log"))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--grid", "optimizer.embedding_lr=0.005,0.02,0.05,0.3", "--seeds", "0,1,2",
            "--launcher", "slurm", "--train-script", train, "--", "--model.batch_norm=false"]
    assert sweep.main(argv) == 1  # the 0.3 runs failed: named, the others ranked
    err = capsys.readouterr().err
    assert "3 run(s) failed" in err and "Rerun the same command" in err
    result = json.loads((out / "sweep.json").read_text())
    order = [t["params"]["optimizer.embedding_lr"] for t in result["trials"]]
    assert order == ["0.02", "0.005", "0.05", "0.3"]  # complete trials by mean AUC; the failed one last
    top = result["trials"][0]["val_auc"]
    assert top["mean"] == pytest.approx(0.701) and top["spread"] == pytest.approx(0.002) and top["n"] == 3
    best = (out / "best.toml").read_text()
    assert best.startswith("# deepfm-sweep's best trial") and "optimizer.embedding_lr=0.02" in best
    cfg = build_config(tomllib.loads(best))
    assert cfg.optimizer.embedding_lr == 0.02 and cfg.model.batch_norm is False
    srun = (tmp_path / "srun.log").read_text().splitlines()
    assert len(srun) == 12 and all(line.startswith("--nodes=1 --ntasks=1 --exclusive") for line in srun)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    starts = sorted(r["start"] for r in runs)
    # Two nodes: runs start in pairs, about one run time (0.5 s) apart, never three at once.
    assert all(b - a < 0.4 for a, b in zip(starts[0::2], starts[1::2]))
    assert all(b - a > 0.3 for a, b in zip(starts[0::2], starts[2::2]))
    assert sweep.main(argv) == 1  # a rerun runs only the failed trial's seeds again
    assert "9 finished before, 3 to run" in capsys.readouterr().out


def test_random_search_is_reproducible_and_crossed_with_the_grid(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "s"), "--random", "optimizer.embedding_lr=loguniform:0.001:0.1",
            "--random", "model.dropout=choice:0,0.1", "--grid", "model.batch_norm=true,false", "--trials", "3",
            "--dry-run"]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out == first
    runs = [line for line in first.splitlines() if "--run_dir=" in line]
    assert len(runs) == 6 and not (tmp_path / "s").exists()  # 3 draws x 2 grid values; a dry run writes nothing
    rates = {float(a.split("=")[1]) for line in runs for a in line.split() if a.startswith("--optimizer.embedding_lr")}
    assert len(rates) == 3 and all(0.001 <= r <= 0.1 for r in rates)


@pytest.mark.parametrize("args, message", [
    (["--grid", "optimizer.embedding_lr"], "--grid 'optimizer.embedding_lr': expected SECTION.KEY=V1,V2"),
    (["--grid", "optimizer.embedding_lr=0.1,-1"], "trial {'optimizer.embedding_lr': '-1'}: optimizer.embedding_lr"),
    (["--grid", "optimizer.nope=1"], "unknown key optimizer.nope"),
    (["--random", "model.dropout=gauss:0:1", "--trials", "2"], "DIST one of loguniform, uniform, int, choice"),
    (["--random", "model.dropout=uniform:0.5:0.1", "--trials", "2"], "expected LO < HI"),
    (["--random", "optimizer.embedding_lr=loguniform:0:1", "--trials", "2"], "both > 0"),
    (["--random", "model.dropout=uniform:0:0.5"], "--random needs a budget"),
    (["--grid", "train.seed=1,2"], "train.seed: set by deepfm-sweep"),
    (["--grid", "model.dropout=0,0.1", "--", "--run_dir=x"], "--run_dir=x: set by deepfm-sweep"),
    ([], "nothing to sweep"),
])
def test_bad_sweep_options_are_one_line_naming_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--out", str(tmp_path / "s"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deepfm-sweep: error:") and message in err


def test_config_toml_round_trips_every_preset_and_structured_value():
    for argv in ([], ["--config", "deepfm_criteo_x1"], ["--config", "criteo_1tb"],
                 ["--sharding.tables=C1:row_wise", "--data.multi_hot=C2", "--model.mlp=none",
                  "--data.weighted=C2:W2", "--data.label=a \"quoted\" name"]):
        cfg = load_config(argv)
        assert build_config(tomllib.loads(to_toml(cfg))) == cfg, argv
