"""User journeys at the default configuration, run the way the README tells users to.

The real launcher (``./launcher/train.sh``: torchrun, 2 CPU ranks, the default preset) and the
console scripts, with only the data size and the step counts scaled down. The fixture asserts
that the plan is the default run's (every table table-wise, every rank missing some table) and
that the transport is the default one, so that a later fixture change cannot hide the case in
which resuming the default configuration once failed.

Journeys: resume to 2N bitwise equal to 2N straight; kill -9 of a rank under MAX_RESTARTS=1;
SIGTERM to the launcher; 2-rank prediction from the checkpoint; resume on 1 rank with another
sharding type; export. After each: no process and no /dev/shm segment of the run left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.export import consolidate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 40  # 2N; an epoch of the fixture's data is 48 steps of 2 x 2048 rows
TRAIN_ROWS, VAL_ROWS = 200_000, 8_192


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("deepfm-")} if os.path.isdir("/dev/shm") else set()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            parent_of[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out += kids
        frontier += kids
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("journey") / "synthetic"
    subprocess.run([sys.executable, str(ROOT / "data/make_synthetic.py"), "--out", str(out),
                    "--train-rows", str(TRAIN_ROWS), "--val-rows", str(VAL_ROWS)], check=True, capture_output=True)
    return out


def env_for(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS")}
    return {**env, "VENV": sys.prefix, "SYNTHETIC_DIR": str(data), **extra}


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The default preset; only the data and the step count are the fixture's."""
    return [f"--data.train={data}/train", f"--data.val={data}/val", f"--run_dir={run_dir}", *extra]


class Journey:
    """One launcher run: no process of it and no new shared-memory segment left afterwards."""

    def __init__(self):
        self.segments_before = shm_segments()

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self.proc

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.5)  # the agent's children are reaped by then
        left = descendants(self.proc.pid)
        text = self.log.read_text()
        assert not left, f"processes left behind: {left}\n{text[-3000:]}"
        try:  # nothing of the session (train.sh, torchrun, ranks) may remain
            os.killpg(self.proc.pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, "the launcher's process group is still alive"
        assert shm_segments() <= self.segments_before, f"/dev/shm segments left: {shm_segments() - self.segments_before}"
        return rc, text


def run_train(data: Path, run_dir: Path, *extra: str, nproc: int = 2, **env_extra: str) -> tuple[int, str]:
    j = Journey()
    j.start(["./launcher/train.sh", *train_args(data, run_dir, *extra)], env_for(data, NPROC=str(nproc), **env_extra),
            run_dir.parent / f"{run_dir.name}.log")
    return j.finish()


def listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                out.add(fields[1].rsplit(":", 1)[0])
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    """The latest checkpoints of two folders hold the same tensors (a folder alone would
    resolve to its best checkpoint, which may be an earlier one)."""
    wa, _, _ = consolidate(ckpt.latest(str(a)))
    wb, _, _ = consolidate(ckpt.latest(str(b)))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """2N steps straight, the default configuration: the reference of every journey."""
    run = tmp_path_factory.mktemp("straight") / "run"
    rc, text = run_train(data, run, f"--train.max_steps={STEPS}", f"--checkpoint.every_steps={STEPS // 2}")
    assert rc == 0, text[-5000:]
    # The default run's plan and transport: every table table-wise, and each rank lacks some
    # table (the case a rank with no shard of a table must load).
    plan_json = json.loads((run / "plan.json").read_text())
    meta = json.loads((Path(ckpt.latest(str(run / "checkpoints"))) / "meta.json").read_text())
    assert meta["plan"] == plan_json, "each checkpoint records the plan the run wrote to plan.json"
    plan = plan_json["tables"]
    assert {p["sharding"] for p in plan} == {"table_wise"}, plan
    held = {r: {p["name"] for p in plan if r in p["ranks"]} for r in (0, 1)}
    assert all(len(held[r]) < len(plan) for r in (0, 1)), held
    assert "transport: gloo, dense gradient all-reduce through shared memory" in text or "using gloo" in text, text
    # The default precision, auto, resolved as on this CPU (bf16 where native) and recorded.
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert summary(run)["config"]["train"]["precision"] == ("bf16" if native else "fp32")
    assert f"train.precision=auto: {'bf16' if native else 'fp32'} on this cpu" in text, text[-3000:]
    return run


def test_resume_equals_straight_run(data, straight, tmp_path):
    run = tmp_path / "resumed"
    rc, text = run_train(data, run, f"--train.max_steps={STEPS // 2}", f"--checkpoint.every_steps={STEPS // 2}")
    assert rc == 0, text[-5000:]
    rc, text = run_train(data, run, f"--train.max_steps={STEPS}", f"--checkpoint.every_steps={STEPS // 2}", "--resume")
    assert rc == 0, text[-5000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000000020'}" in text
    assert summary(run)["last_loss"] == summary(straight)["last_loss"]
    assert summary(run)["steps"] == STEPS
    assert_same_weights(straight / "checkpoints", run / "checkpoints")


def test_opt_in_shared_memory_all_to_alls_resume_equals_straight_run(data, straight, tmp_path):
    """The opt-in transport (sharding.shm_all_to_all) hands DMP a process group torch does not
    know by name; its checkpoints still load, and it computes what the default computes."""
    run = tmp_path / "opt_in"
    opt_in = ("--sharding.shm_all_to_all=true", f"--checkpoint.every_steps={STEPS // 2}")
    rc, text = run_train(data, run, f"--train.max_steps={STEPS // 2}", *opt_in)
    assert rc == 0, text[-5000:]
    rc, text = run_train(data, run, f"--train.max_steps={STEPS}", "--resume", *opt_in)
    assert rc == 0, text[-5000:]
    assert "shared memory for all-to-alls" in text or "using gloo" in text, text[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000000020'}" in text
    assert summary(run)["last_loss"] == summary(straight)["last_loss"]
    assert_same_weights(straight / "checkpoints", run / "checkpoints")


def test_kill_one_rank_restarts_and_matches(data, straight, tmp_path):
    run = tmp_path / "killed"
    j = Journey()
    proc = j.start(["./launcher/train.sh", *train_args(data, run, f"--train.max_steps={STEPS}",
                                                       "--checkpoint.every_steps=10", "--checkpoint.keep=10")],
                   env_for(data, NPROC="2", MAX_RESTARTS="1"), tmp_path / "killed.log")
    deadline = time.monotonic() + 240
    while not ckpt.list_complete(str(run / "checkpoints")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a rank could be killed:\n" + j.log.read_text()[-3000:]
    ranks = [p for p in descendants(proc.pid) if "deepfm_dist.train" in Path(f"/proc/{p}/cmdline").read_text()
             and "torchrun" not in Path(f"/proc/{p}/cmdline").read_text()]
    assert ranks, "no rank process found"
    os.kill(ranks[-1], signal.SIGKILL)
    rc, text = j.finish()
    assert rc == 0, text[-5000:]
    assert "elastic restart #1: resuming from the latest checkpoint" in text and "resumed from" in text, text[-5000:]
    assert summary(run)["steps"] == STEPS
    assert_same_weights(straight / "checkpoints", run / "checkpoints")


def test_sigterm_to_the_launcher_checkpoints_and_exits_zero(data, tmp_path):
    run = tmp_path / "term"
    j = Journey()
    proc = j.start(["./launcher/train.sh", *train_args(data, run, "--train.log_every=5")], env_for(data, NPROC="2"),
                   tmp_path / "term.log")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline, "no log step in time"
        time.sleep(0.02)
    assert proc.poll() is None, j.log.read_text()[-3000:]
    # One node: the ranks listen on loopback only (torchrun's own stores cannot be told to).
    ranks = [p for p in descendants(proc.pid) if "deepfm_dist.train" in Path(f"/proc/{p}/cmdline").read_text()
             and "torchrun" not in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(ranks) == 2
    for rank in ranks:
        addresses = listening_addresses(rank)
        assert addresses and addresses <= LOOPBACK, addresses
    os.kill(proc.pid, signal.SIGTERM)  # the PID of ./launcher/train.sh
    rc, text = j.finish()
    assert rc == 0, text[-5000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-5000:]
    assert text.count("SIGTERM received: the ranks wrote a checkpoint and stopped") == 1, text[-3000:]
    s = summary(run)
    assert s["stopped_by_signal"] is True and 0 < s["steps"] < 48
    assert ckpt.list_complete(str(run / "checkpoints"))[-1][0] == s["steps"]


def test_two_rank_predict_scores_every_row_once(data, straight, tmp_path):
    out = tmp_path / "preds"
    j = Journey()
    j.start([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "deepfm_dist.predict",
             "--model", str(straight / "checkpoints"), "--data", str(data / "val"), "--out", str(out)],
            env_for(data), tmp_path / "predict.log")
    rc, text = j.finish()
    assert rc == 0, text[-5000:]
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 2
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    assert rows == VAL_ROWS == json.loads((out / "_summary.json").read_text())["rows"]
    got = torch.cat([torch.from_numpy(pq.read_table(p, columns=["logit"]).column(0).to_numpy()) for p in parts])
    assert got.shape == (VAL_ROWS,) and torch.isfinite(got).all()


def test_resume_on_one_rank_with_another_sharding(data, straight, tmp_path):
    run = tmp_path / "reshard"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    rc, text = run_train(data, run, f"--train.max_steps={STEPS}", "--resume", "--sharding.type=row_wise",
                         "--checkpoint.keep=10", nproc=1)
    assert rc == 0, text[-5000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000000040'}" in text
    assert {p["sharding"] for p in json.loads((run / "plan.json").read_text())["tables"]} == {"row_wise"}
    assert abs(summary(run)["val_auc"] - summary(straight)["val_auc"]) < 1e-6
    assert_same_weights(straight / "checkpoints", run / "checkpoints")  # re-saved by the 1-rank run


def test_deepfm_plan_prints_the_plan_the_run_got(data, straight, tmp_path, capsys):
    """One planning path: deepfm-plan for 2 CPU ranks on the default configuration gives the
    plan (tables, kernels, ranks, bytes per table and rank) that the 2-rank run wrote."""
    from deepfm_dist.plan import main

    out = tmp_path / "plan.json"
    args = [a for a in train_args(data, tmp_path / "unused") if a.startswith("--data.")]
    assert main(["--world-size", "2", "--device", "cpu", "--json", str(out), *args]) == 0
    planned, ran = json.loads(out.read_text()), json.loads((straight / "plan.json").read_text())
    assert planned["tables"] == ran["tables"] and planned["ranks"] == ran["ranks"]
    assert (planned["world_size"], planned["local_world_size"], planned["fits"]) == (2, 2, True)
    assert "t_C1" in capsys.readouterr().out


def test_export_of_the_default_checkpoint(data, straight, tmp_path):
    out = tmp_path / "model.pt"
    j = Journey()
    j.start([str(BIN / "deepfm-export"), str(straight / "checkpoints"), "--out", str(out)], env_for(data),
            tmp_path / "export.log")
    rc, text = j.finish()
    assert rc == 0, text
    exported = torch.load(out, weights_only=True)
    want, _, _ = consolidate(str(straight / "checkpoints"))
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)


@pytest.mark.parametrize("bad, message", [
    ("--model.foo=1", "deepfm-train: error: unknown key model.foo"),
    ("--model.mlp=", "deepfm-train: error: model.mlp='': empty"),
    ("--optimizer.dense_lr=1e38", "deepfm-train: error: optimizer.dense_lr=1e+38"),
])
def test_config_errors_stop_the_launcher_before_any_rank(data, tmp_path, bad, message):
    j = Journey()
    j.start(["./launcher/train.sh", *train_args(data, tmp_path / "run", bad)], env_for(data), tmp_path / "bad.log")
    rc, text = j.finish(timeout=120)
    assert rc == 2, text
    assert text.strip() == message or text.strip().startswith(message), text
    assert "Traceback" not in text and "torchrun" not in text and not (tmp_path / "run").exists(), text
